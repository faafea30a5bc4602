"""Client mods for central DP: clip the model update to the norm the server sends.

With :class:`~flowerpets.dp.CentralDp` clipping on the clients, each client
runs one of these around its train handler:

.. code-block:: python

    app = ClientApp(mods=[fixed_clipping_mod])        # CentralDp(..., adaptive=None)
    app = ClientApp(mods=[adaptive_clipping_mod])     # CentralDp(..., adaptive=AdaptiveClipping())

The handler trains as usual and returns new weights. The mod computes the
update (new weights minus the weights received), scales it to L2 norm at most
the clip ``C`` from the request's config (``dp.clip``), and replies with the
**clipped update**, not the weights: the server adds its noise to the sum of
updates and adds the global model back (see :class:`~flowerpets.dp.CentralDp`).
Replying with updates also keeps a secure sum's quantization range small.
When the server cannot read the global model (it is sealed, for example under
homomorphic encryption) it sets ``dp.reply-model`` and the mod replies with
``received + clipped update`` instead.

``adaptive_clipping_mod`` also reports whether the update's norm was at most
``C`` (the *unclipped* indicator of Andrew et al., 2021), shifted to
``b - 1/2``, in the reserved array ``dp.unclipped``, which is summed with the
update: under secure aggregation the server learns only the count. Place the
mod inside any masking or encryption mod, so the reply is clipped before it is
protected (the digits demo composes them in that order).

Each mod refuses (an error reply with code ``REFUSED``) a request without a
valid clip, and a request for the other kind of clipping, so a mismatch
between the server's and the clients' configuration fails loudly. Other
message types pass through untouched.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from flowerpets.core import ArrayRecord, Context, Message, MessageType, RecordDict
from flowerpets.dp._primitives.clip import clip_update, update_between
from flowerpets.dp._protocol import INDICATOR, read_clip, read_config, reply_model
from flowerpets.exceptions import RequestRefusedError

__all__ = ["adaptive_clipping_mod", "fixed_clipping_mod"]

CallNext = Callable[[Message, Context], Message]


def _with_arrays(body: RecordDict, arrays: ArrayRecord) -> RecordDict:
    out = body.copy()
    out["arrays"] = arrays
    return out


def _clip_reply(msg: Message, context: Context, call_next: CallNext, *, adaptive: bool) -> Message:
    if msg.message_type != MessageType.TRAIN:
        return call_next(msg, context)
    body = msg.require_content()
    if "config" not in body or "arrays" not in body:
        raise RequestRefusedError("a DP clipping mod needs a train request with arrays and config")
    config = read_config(body)
    clip, as_model = read_clip(config), reply_model(config)
    arrays = body.get_typed("arrays", ArrayRecord)
    if (INDICATOR in arrays) != adaptive:
        wanted = "adaptive_clipping_mod" if INDICATOR in arrays else "fixed_clipping_mod"
        raise RequestRefusedError(
            f"the server runs {'adaptive' if INDICATOR in arrays else 'fixed'} clipping: "
            f"this node needs {wanted}"
        )
    received = ArrayRecord({name: a for name, a in arrays.items() if name != INDICATOR})
    forward = Message(metadata=msg.metadata, content=_with_arrays(body, received))
    reply = call_next(forward, context)
    if reply.error is not None:
        return reply
    reply_body = reply.require_content()
    update = update_between(reply_body.get_typed("arrays", ArrayRecord), received)
    clipped = clip_update(update, clip, dtypes={n: a.dtype for n, a in received.items()})
    arrays_out = clipped.arrays
    if as_model:  # the server cannot add the (sealed) model back: send received + update
        arrays_out = {
            n: (received[n].numpy() + a).astype(a.dtype, copy=False) for n, a in arrays_out.items()
        }
    out = ArrayRecord.from_numpy(arrays_out, copy=False)
    if adaptive:
        out[INDICATOR] = np.array([0.5 if clipped.unclipped else -0.5])
    return Message(metadata=reply.metadata, content=_with_arrays(reply_body, out))


def fixed_clipping_mod(msg: Message, context: Context, call_next: CallNext) -> Message:
    """Reply with the update clipped to the server's ``dp.clip`` (for fixed clipping)."""
    return _clip_reply(msg, context, call_next, adaptive=False)


def adaptive_clipping_mod(msg: Message, context: Context, call_next: CallNext) -> Message:
    """Reply with the clipped update and the shifted unclipped indicator (adaptive clipping)."""
    return _clip_reply(msg, context, call_next, adaptive=True)
