"""The DistributedDpMod client mod: the node's update, encoded and noised before it is masked.

Around the train handler, inside the SecAgg+ client mod:

.. code-block:: python

    client_app = ClientApp(mods=[secaggplus_mod, DistributedDpMod()])

For a train message the mod

1. refuses unless the config says its reply will be summed modulo
   (:data:`~flowerpets.core.MODULUS_BITS_KEY`, which only the SecAgg+ client mod
   outside it sets): outside secure aggregation the residues would leave in the
   clear, one node's noise alone on them (the check holds only with the SecAgg+
   client mod outside this one: it removes any value of the key the server
   sent itself, so install both, in that order);
2. reads the round's public encoding (:mod:`._round_config`) and checks it
   against the model it received and the domain SecAgg+ announced, and that its
   digest is the domain's :attr:`~flowerpets.core.QuantizedDomain.binding` (set by
   the server's DistributedDp, carried by SecAgg+ in the round configuration it
   signs in malicious mode; refused if absent or different);
3. lets the handler train, computes the update (new weights minus the weights
   received, the float arrays flattened in the model's order), and encodes it
   (:func:`~flowerpets.dp._primitives.distributed.encode`: clip, rotate with the
   round's public seed, scale, round conditionally, add this node's noise
   share, wrap), the rounding and the noise drawn from the secure keystream
   with the exact samplers;
4. replies with the residues in ``dp.residues`` only (and, with adaptive
   clipping, ``dp.clipped``: its clipped bit as ``+1`` (clipped) or ``-1``, plus its
   own share of the count's noise, a residue summed inside the secure sum too,
   never seen alone), and no metric: the handler's metrics (a loss, the number
   of examples) are facts about the node's data the noise does not cover, and
   a secure aggregator that sums metrics under the masks (SecAgg+'s
   ``secure_metrics``) would release their exact sum. Such an aggregator then
   refuses the reply (the metric is missing): run it with no secure metric.

A refusal (an error reply with code ``REFUSED``) says what was wrong, never a
value. Other messages pass through untouched.

**What the node trusts the server with.** The encoding is the server's choice:
the node checks its form, its dimension and modulus against the model and the
domain, but a dishonest server could send a tiny noise share (0 included), or
a huge scale or clip beside a share that is small for it, and the node would
add less noise than the run's epsilon claims. ``min_share_multiplier`` is the
node's own floor against that: it refuses a round whose share carries a noise
multiplier below it, ``sqrt(share) / Delta_2`` (``Delta_2`` the rounded update's
L2 bound at the encoding's clip, scale and beta: whatever the server chose, the
node's noise stands against that sensitivity), and the same for the clipped
count's share (sensitivity 1). The floor holds for this node's own share
whatever the server does. **Every node gets the same encoding** in SecAgg+'s
malicious mode: the encoding's digest is the round's quantized-domain binding,
which SecAgg+'s round configuration carries and its signed digest covers, so
the nodes that exchange keys agree on it (or refuse each other's keys), and
each checks its encoding against it. So ``k`` honest shares carry
``f sqrt(k)`` together, and a node sets ``z / sqrt(k)`` to rely on ``k`` honest
others. In semi-honest mode the server is trusted by definition (nothing
signs the configuration), and only the node's own floor holds against it. The
default, 0, trusts the server's calibration. The rotation seed needs no trust:
the rounding's norm bound, hence the sensitivity, holds for every rotation
(the seed only spreads the mass).
"""

from __future__ import annotations

import hmac
import math
import warnings
from collections.abc import Callable

import numpy as np

from flowerpets._validation import instance, real
from flowerpets.core import (
    ArrayRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
    domain_of,
)
from flowerpets.dp._primitives.clip import update_between
from flowerpets.dp._primitives.discrete import RandomWords
from flowerpets.dp._primitives.distributed import encode
from flowerpets.dp._primitives.noise import LazySecureGaussian
from flowerpets.dp._protocol import CLIPPED, RESIDUES, read_config
from flowerpets.dp.distributed._mechanism import draw_share
from flowerpets.dp.distributed._round_config import RoundEncoding, read_encoding
from flowerpets.exceptions import (
    FlowerpetsError,
    InsecureRandomnessWarning,
    RequestRefusedError,
)

__all__ = ["DistributedDpMod"]

CallNext = Callable[[Message, Context], Message]


class DistributedDpMod:
    """Client mod of distributed DP (see the module docstring); place it inside SecAgg+'s.

    ``min_share_multiplier`` is the least noise multiplier this node's own share must
    carry, or it refuses the round (see the module docstring; default 0: trust the
    server's calibration). ``source`` replaces the secure keystream (rounding and
    noise) with another source of 64-bit words, for tests only (it warns unless it
    says it is secure). The mod keeps no state; one instance serves every node.
    """

    def __init__(
        self, *, min_share_multiplier: float = 0.0, source: RandomWords | None = None
    ) -> None:
        self.min_share_multiplier = real("min_share_multiplier", min_share_multiplier, at_least=0)
        if source is None:
            source = LazySecureGaussian()
        else:
            source = instance("source", source, RandomWords)
            if not source.secure:
                warnings.warn(
                    "DistributedDpMod: rounding and noise drawn from an insecure source; "
                    "use source= for tests only",
                    InsecureRandomnessWarning,
                    stacklevel=2,
                )
        self._source: RandomWords = source

    def __repr__(self) -> str:
        return f"DistributedDpMod(min_share_multiplier={self.min_share_multiplier})"

    def __call__(self, msg: Message, context: Context, call_next: CallNext) -> Message:
        if msg.message_type != MessageType.TRAIN:
            return call_next(msg, context)
        body = msg.require_content()
        if "config" not in body or "arrays" not in body:
            raise RequestRefusedError(
                "DistributedDpMod needs a train request with arrays and config"
            )
        config = read_config(body)
        try:
            domain = domain_of(config.record)
        except FlowerpetsError:
            raise RequestRefusedError("the quantized domain in the config is malformed") from None
        if domain is None:
            raise RequestRefusedError(
                "this round's reply would not be summed modulo by secure aggregation (no "
                "quantized domain in the config): DistributedDpMod runs inside the SecAgg+ "
                "client mod only, or its noised update would leave in the clear"
            )
        encoding = read_encoding(config)
        if not domain.binding or not hmac.compare_digest(domain.binding, encoding.binding()):
            raise RequestRefusedError(
                "the distributed-DP encoding is not the one the round's quantized domain binds "
                "(or the domain binds none): the server may have sent nodes different encodings"
            )
        wanted = (RESIDUES, CLIPPED) if encoding.adaptive else (RESIDUES,)
        if sorted(domain.names) != sorted(wanted) or domain.modulus_bits != encoding.modulus_bits:
            raise RequestRefusedError(
                "the secure aggregator's quantized domain is not the one the distributed-DP "
                "encoding needs"
            )
        self._check_noise(encoding)
        received = body.get_typed("arrays", ArrayRecord)
        if any(a.dtype.kind != "f" for a in received.values()):
            raise RequestRefusedError("DistributedDpMod encodes float model arrays only")
        if sum(int(np.prod(a.shape)) for a in received.values()) != encoding.dimension:
            raise RequestRefusedError("the encoding's dimension is not the model's")
        reply = call_next(msg, context)
        if reply.error is not None:
            return reply
        reply_body = reply.require_content()
        update = update_between(reply_body.get_typed("arrays", ArrayRecord), received)
        flat = np.concatenate([u.reshape(-1) for u in update.values()])
        out = ArrayRecord(self._encoded(flat, encoding))
        replied = RecordDict(dict(reply_body.items()))
        replied["arrays"] = out
        replied["metrics"] = MetricRecord()  # not noised: never summed un-noised either
        return Message(metadata=reply.metadata, content=replied)

    def _check_noise(self, e: RoundEncoding) -> None:
        """Refuses a share (or the count's) whose noise multiplier is below this node's floor."""
        floor = self.min_share_multiplier
        if floor == 0:
            return
        update = math.sqrt(e.share) / e.pipeline().norm_bound
        count = math.inf if e.count_share is None else math.sqrt(e.count_share)
        if min(update, count) < floor:
            raise RequestRefusedError(
                "the round's noise share is below this node's min_share_multiplier: "
                "the server asked for less noise than the node accepts"
            )

    def _encoded(self, update: np.ndarray, e: RoundEncoding) -> dict[str, np.ndarray]:
        """The reply's residue arrays: the encoded update, and the noised clipped bit."""
        encoding = e.pipeline()
        source = self._source
        residues, clipped = encode(
            update,
            encoding=encoding,
            rotation=e.rotation(),
            noise=lambda size: draw_share(e.mechanism, e.share, size, source),
            source=source,
        )
        out = {RESIDUES: residues}
        if e.count_share is not None:
            sign = 1 if clipped else -1  # +-1: the clipped bit shifted, sensitivity 1
            bit = sign + int(draw_share(e.mechanism, e.count_share, 1, source)[0])
            out[CLIPPED] = np.array([bit % encoding.modulus], dtype=np.uint32)
        return out
