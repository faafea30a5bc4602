"""What the DP server mod and the DP client mods say to each other, by name.

Reserved names start with ``dp.``; no model array or config key may use them.
A refusal says what was wrong and never echoes a value: error replies travel
in the clear (``tests/dp/test_refusal_reasons.py`` checks every DP mod's).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

from flowerpets.core import RecordDict
from flowerpets.core.fields import Fields
from flowerpets.exceptions import MessageFieldError, RequestRefusedError

__all__ = [
    "CLIPPED",
    "CLIP_KEY",
    "ENCODING_KEY",
    "INDICATOR",
    "REPLY_MODEL_KEY",
    "RESERVED_PREFIX",
    "RESIDUES",
    "read_clip",
    "read_config",
    "reply_model",
]

RESERVED_PREFIX = "dp."

# Config key: the L2 norm the client clips its update to this round.
CLIP_KEY = "dp.clip"

# Config key, true when the server cannot read the global model (it is sealed, for example
# encrypted): the client then replies with received + clipped update, a model, instead of the
# clipped update alone, because the server cannot add the model back itself.
REPLY_MODEL_KEY = "dp.reply-model"

# Array sent with the model when the server runs adaptive clipping. A client replies with
# b - 1/2 in it, b = 1 if its update's norm was at most the clip: the array is summed with
# the updates (inside a secure sum, if there is one), so the server only sees the count.
INDICATOR = "dp.unclipped"

# Distributed DP. Config key: the round's encoding (JSON: rotation seed, scale, clip,
# dimension, modulus bits, rounding's beta, mechanism and each node's noise share), the same
# for every node of the round and public (the server chose it).
ENCODING_KEY = "dp.distributed"

# Reply arrays of distributed DP, residues modulo 2**bits summed by the secure aggregator:
# the node's encoded, noised update, and (adaptive clipping) its clipped bit plus its share
# of that count's noise.
RESIDUES = "dp.residues"
CLIPPED = "dp.clipped"


def read_config(content: RecordDict) -> Fields:
    """The request's config record; refuses the request if it is not a ConfigRecord."""
    with _refused_if_malformed():
        return Fields.of(content, "config")


def read_clip(config: Fields) -> float:
    """The clipping norm the server sent; refuses the request if it is missing or nonsense."""
    if CLIP_KEY not in config:
        raise RequestRefusedError(
            f"the request carries no clipping norm ({CLIP_KEY!r}): a DP clipping mod needs "
            "CentralDp(clip_on=ClipOn.CLIENTS) on the server"
        )
    with _refused_if_malformed():
        clip = config.get(CLIP_KEY, float)
    if not (math.isfinite(clip) and clip > 0):
        raise RequestRefusedError(f"the clipping norm {CLIP_KEY!r} must be finite and > 0")
    return clip


def reply_model(config: Fields) -> bool:
    """Whether the server asks for a model (received + clipped update) instead of the update."""
    with _refused_if_malformed():
        return config.get(REPLY_MODEL_KEY, bool, False)


@contextmanager
def _refused_if_malformed() -> Iterator[None]:
    # A field of the wrong type is the server's fault: this node refuses the request.
    try:
        yield
    except MessageFieldError as exc:
        raise RequestRefusedError(str(exc)) from None
