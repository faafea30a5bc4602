"""Distributed differential privacy: the server only ever sees a noised sum.

With :class:`~flowerpets.dp.CentralDp` the server adds the noise, so it sees
the exact sum first. Here each node adds a small share of *discrete* noise to
its quantized update before SecAgg+ masks it, and SecAgg+ unmasks only the sum
of the shares: no party ever holds an un-noised sum (Kairouz, Liu and Steinke,
ICML 2021; Agarwal, Kairouz and Liu, NeurIPS 2021).

.. code-block:: python

    from flowerpets.dp import DistributedDp, DistributedDpMod
    from flowerpets.secagg import SecAggPlus, secaggplus_mod

    client_app = ClientApp(mods=[secaggplus_mod, DistributedDpMod()])
    server_app = ServerApp(..., mods=[
        DistributedDp(noise_multiplier=1.0, clipping_norm=0.5, delta=1e-5, max_epsilon=8.0),
        SecAggPlus(),  # innermost: it sums the residues
    ])

Each round :class:`DistributedDp`

1. refuses to run without a secure aggregator inside it
   (:class:`~flowerpets.exceptions.IncompatibleModsError`), and learns the fewest
   inputs it releases a sum of (``context.fewest_inputs``; SecAgg+: ``t + 1``);
2. plans the round: each node's share of the noise so that the sum carries
   variance ``(z Delta_2)^2``, ``Delta_2`` the rounded update's L2 bound, over the
   shares the dropout policy counts on, and the scale, the largest for which the
   sum wraps around SecAgg+'s modulus with probability at most ``max_wrap``
   (a configuration that cannot is refused);
3. accounts for the round, or refuses it over the budget (``StopRunError``),
   with the ledger, budget and run-store spends CentralDp keeps;
4. sends the round's public encoding (a fresh random rotation seed, scale,
   clip, modulus, mechanism, each node's share) in the config, and asks the
   secure aggregator to sum ``dp.residues`` modulo ``2**modulus_bits``
   (``request.quantized``);
5. decodes the residues' sum (centred lift, unscale, unrotate) and releases
   ``w + (noised sum of clipped updates) / m`` with the fixed denominator ``m``,
   the expected cohort, as CentralDp does; epsilon goes to the round's metrics.

Every node runs :class:`DistributedDpMod` inside the SecAgg+ client mod: it
clips, rotates, scales, rounds and noises its update (the exact samplers, from
the secure keystream) and replies with residues only.

**Dropouts** take their noise with them. ``DropoutPolicy.WORST_CASE`` (the
default): each share is sized so that the fewest inputs the aggregator
releases carry the whole noise; the epsilon is the same whoever drops out (or
is declared dropped by the server) and is committed before any node sees the
round. ``DropoutPolicy.SURVIVORS``: shares sized for the expected cohort, each
round's epsilon counted from the shares actually in the sum (larger when fewer
survive); the budget check before the round assumes the fewest. Either way no
epsilon is reported below what the noise in the released sum supports.

**What the server sees**: masked vectors, and the sum of the noised residues.
**Whom you must trust**: that at least the counted nodes are honest (they add
their share and do not collude with the server: ``colluding`` discounts those
that might), the nodes' clipping (the server cannot check a masked update),
and SecAgg+'s own assumptions. Not the server's arithmetic: the noise is in
the sum before the server sees it. Epsilon is reported without amplification
by sampling, since the server knows who took part.

Adaptive clipping (:class:`~flowerpets.dp.AdaptiveClipping`): each node also
sends its clipped bit plus its own share of the count's noise, inside the secure
sum (``dp.clipped``); the clip follows CentralDp's geometric rule from the noised
count, and the count's event is composed beside the update's.
"""

from __future__ import annotations

from flowerpets.dp.distributed._client import DistributedDpMod
from flowerpets.dp.distributed._mechanism import Mechanism
from flowerpets.dp.distributed._mod import STATE_KEY as STATE_KEY
from flowerpets.dp.distributed._mod import DistributedDp

__all__ = ["DistributedDp", "DistributedDpMod", "Mechanism"]
