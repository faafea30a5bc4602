"""What the server tells every node of a distributed-DP round: the round's public encoding.

One JSON text under :data:`~flowerpets.dp._protocol.ENCODING_KEY` in the round's
config, the same for every node: the public rotation seed (fresh each round),
the scale, the clip, the model's dimension, SecAgg+'s modulus bits, conditional
rounding's beta, the mechanism, each node's noise share, and with adaptive
clipping the share of the clipped count's noise. Nothing in it is secret: the
server chose all of it, and the privacy guarantee holds for a public seed.
A node refuses a config it cannot read, with a reason that names the field,
never its value.

The server binds the encoding into the round's quantized domain
(:attr:`~flowerpets.core.QuantizedDomain.binding` = :meth:`RoundEncoding.binding`,
a SHA-256 of its canonical JSON); SecAgg+ carries that digest in the round
configuration it signs in malicious mode, and the node refuses an encoding
whose digest is not the domain's, so every node that exchanges keys was sent
the same encoding.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

from flowerpets._validation import instance, integer, probability, real
from flowerpets.core.fields import Fields
from flowerpets.dp._primitives.distributed import Encoding
from flowerpets.dp._primitives.rotation import RandomizedHadamard
from flowerpets.dp._protocol import ENCODING_KEY
from flowerpets.dp.distributed._mechanism import Mechanism
from flowerpets.exceptions import (
    FlowerpetsError,
    MessageFieldError,
    ParameterTypeError,
    ParameterValueError,
    RequestRefusedError,
)

__all__ = ["SEED_BYTES", "RoundEncoding", "read_encoding"]

SEED_BYTES = 32
_BINDING_DOMAIN = b"flowerpets/dp/distributed/v1/encoding\x00"

_FIELDS = frozenset(
    {
        "seed",
        "scale",
        "clip",
        "dimension",
        "modulus_bits",
        "beta",
        "mechanism",
        "share",
        "count_share",
    }
)


@dataclass(frozen=True, slots=True)
class RoundEncoding:
    """One round's public encoding; ``share`` and ``count_share`` are each node's noise
    parameters (the variance, or the discrete Gaussian's sigma^2) for the update and for
    the clipped bit (None: no adaptive clipping)."""

    seed: bytes
    scale: float
    clip: float
    dimension: int
    modulus_bits: int
    beta: float
    mechanism: Mechanism
    share: float
    count_share: float | None = None

    def __post_init__(self) -> None:
        seed = instance("seed", self.seed, bytes)
        if len(seed) != SEED_BYTES:
            raise ParameterValueError(f"the rotation seed must be {SEED_BYTES} bytes")
        real("scale", self.scale, above=0)
        real("clip", self.clip, above=0, secret=True)  # adaptive clipping learns it from data
        integer("dimension", self.dimension, at_least=1)
        integer("modulus_bits", self.modulus_bits, at_least=2, at_most=32)
        probability("beta", self.beta, one=False)
        instance("mechanism", self.mechanism, Mechanism)
        real("share", self.share, at_least=0)
        if self.count_share is not None:
            real("count_share", self.count_share, at_least=0)

    @property
    def adaptive(self) -> bool:
        return self.count_share is not None

    def pipeline(self) -> Encoding:
        """The primitives' encoding of this round (what :func:`encode` and :func:`decode` take)."""
        return Encoding(
            scale=self.scale,
            clip=self.clip,
            dimension=self.dimension,
            modulus_bits=self.modulus_bits,
            beta=self.beta,
        )

    def rotation(self) -> RandomizedHadamard:
        """The round's randomized Hadamard rotation, from its public seed."""
        return RandomizedHadamard(self.seed, self.dimension)

    def to_json(self) -> str:
        value: dict[str, Any] = {
            "seed": self.seed.hex(),
            "scale": self.scale,
            "clip": self.clip,
            "dimension": self.dimension,
            "modulus_bits": self.modulus_bits,
            "beta": self.beta,
            "mechanism": self.mechanism.value,
            "share": self.share,
            "count_share": self.count_share,
        }
        return json.dumps(value, sort_keys=True, allow_nan=False)

    def binding(self) -> bytes:
        """SHA-256 of the canonical encoding (its :meth:`to_json`, domain-separated): what
        the server puts in the round's quantized domain and each node checks."""
        return hashlib.sha256(_BINDING_DOMAIN + self.to_json().encode()).digest()

    @classmethod
    def from_json(cls, text: str) -> RoundEncoding:
        """The encoding ``text`` holds; ValueError or TypeError (naming no value) otherwise."""
        value = json.loads(text)
        if not isinstance(value, dict) or set(value) != _FIELDS:
            raise ParameterValueError("the encoding's fields are not the expected ones")
        for name in ("scale", "clip", "beta", "share"):
            if not isinstance(value[name], int | float) or isinstance(value[name], bool):
                raise ParameterTypeError(f"the encoding's {name} must be a number")
            value[name] = float(value[name])
        if value["count_share"] is not None:
            value["count_share"] = float(value["count_share"])
        if not isinstance(value["seed"], str):
            raise ParameterTypeError("the encoding's seed must be hex text")
        return cls(
            seed=bytes.fromhex(value["seed"]),
            scale=value["scale"],
            clip=value["clip"],
            dimension=value["dimension"],
            modulus_bits=value["modulus_bits"],
            beta=value["beta"],
            mechanism=Mechanism(value["mechanism"]),
            share=value["share"],
            count_share=value["count_share"],
        )


def read_encoding(config: Fields) -> RoundEncoding:
    """The round's encoding from a train config; refuses the request if it is absent or bad."""
    if ENCODING_KEY not in config:
        raise RequestRefusedError(
            f"the request carries no distributed-DP encoding ({ENCODING_KEY!r}): "
            "DistributedDpMod needs DistributedDp on the server"
        )
    try:
        encoding = RoundEncoding.from_json(config.get(ENCODING_KEY, str))
    except (FlowerpetsError, MessageFieldError, ValueError, TypeError, KeyError):
        # The reason says what is wrong, never the config's values (it may travel in the clear).
        raise RequestRefusedError(
            f"the distributed-DP encoding {ENCODING_KEY!r} is malformed"
        ) from None
    if not math.isfinite(encoding.scale):
        raise RequestRefusedError(f"the distributed-DP encoding {ENCODING_KEY!r} is malformed")
    return encoding
