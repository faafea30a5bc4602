"""One round's numbers: the scale from SecAgg+'s modulus, and each node's noise share.

Everything the clients do happens in the integer domain ``scale`` steps per model
unit, so the clip there is ``u = clip * scale``. Given the noise multiplier ``z``
(the summed noise's standard deviation over the rounded L2 sensitivity
``Delta_2(u)``, as :class:`~flowerpets.dp.accountant.DistributedEvent` defines it),
the summed noise has variance ``V = (z Delta_2(u))^2`` and each of the
``planned`` shares carries ``V / planned``.

**The scale.** The secure sum is taken modulo ``M = 2**bits``, and a coordinate of
the true sum outside SecAgg+'s centred interval wraps (an accuracy failure, never
a privacy one). :func:`~flowerpets.dp._primitives.distributed.wrap_probability`
bounds the chance that any coordinate of a round's sum wraps, for the most
nodes that may reply (the cohort, each with its share). The scale is the largest
``u`` for which that bound is at most ``max_wrap`` (default :data:`WRAP_LIMIT`)
and each share at most :data:`MAX_SHARE` (the exact samplers' tables stay small;
beyond it the rounding error is already far below the noise). A configuration
for which no scale keeps the bound is refused
(:class:`~flowerpets.exceptions.InfeasibleParametersError`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from flowerpets.dp._primitives.distributed import Encoding, wrap_probability
from flowerpets.dp.distributed._mechanism import Mechanism
from flowerpets.exceptions import InfeasibleParametersError

__all__ = ["MAX_SHARE", "WRAP_LIMIT", "Plan", "plan"]

WRAP_LIMIT = 1e-6
"""The default bound on the probability that a round's sum wraps around the modulus."""

MAX_SHARE = float(1 << 24)
"""The largest noise share a node draws (sigma 4096 per share)."""


@dataclass(frozen=True, slots=True)
class Plan:
    """A round's scale (``u = clip * scale``), each node's share, and the wrap bound."""

    units: float  # the clip in integer steps, u
    share: float  # each node's noise parameter
    wrap: float  # the bound on the probability that some coordinate wraps


@functools.lru_cache(maxsize=64)
def plan(
    *,
    noise_multiplier: float,
    dimension: int,
    beta: float,
    cohort: int,
    planned: int,
    modulus_bits: int,
    mechanism: Mechanism,
    max_wrap: float = WRAP_LIMIT,
) -> Plan:
    """The largest clip in integer steps whose round keeps the wrap bound and the share cap.

    ``cohort`` nodes may reply (each adds its share: the noise in the sum is at most
    ``cohort / planned`` times the calibrated variance); ``planned`` is the number of
    shares the calibrated variance is split into.
    """

    def encoding(units: float) -> Encoding:
        # The clip in integer steps is all that matters: clip 1 at scale u.
        return Encoding(
            scale=units, clip=1.0, dimension=dimension, modulus_bits=modulus_bits, beta=beta
        )

    def share_at(units: float) -> float:
        return (noise_multiplier * encoding(units).norm_bound) ** 2 / planned

    def wrap_at(units: float) -> float:
        return wrap_probability(
            encoding(units),
            clients=cohort,
            local_variance=share_at(units),
            mechanism=mechanism.event,
        )

    def fits(units: float) -> bool:
        return share_at(units) <= MAX_SHARE and wrap_at(units) <= max_wrap

    low, high = 1e-3, float(1 << modulus_bits)
    if not fits(low):
        raise InfeasibleParametersError(
            f"no scale keeps a sum of {cohort} inputs of dimension {dimension} within "
            f"2**{modulus_bits} (wrap probability <= {max_wrap:g}) at noise multiplier "
            f"{noise_multiplier:g}: raise modulus_bits, or lower the noise"
        )
    for _ in range(200):  # bisection on log(units)
        if high / low < 1 + 1e-9:
            break
        middle = math.sqrt(low * high)
        low, high = (middle, high) if fits(middle) else (low, middle)
    return Plan(units=low, share=share_at(low), wrap=wrap_at(low))
