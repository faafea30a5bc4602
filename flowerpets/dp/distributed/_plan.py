"""One round's numbers: the scale from SecAgg+'s modulus, and each node's noise share.

Everything the clients do happens in the integer domain ``scale`` steps per model
unit, so the clip there is ``u = clip * scale``. Given the noise multiplier ``z``
(the summed noise's standard deviation over the rounded L2 sensitivity
``Delta_2(u)``, as :class:`~flowerpets.dp.accountant.DistributedEvent` defines it),
the summed noise has variance ``V = (z Delta_2(u))^2`` and each of the
``planned`` shares carries ``V / planned``.

**The scale.** The secure sum is taken modulo ``M = 2**bits``; the server reads it
as a centred residue, so it is right unless a coordinate of the true sum leaves
``[-M/2, M/2)`` (a *wrap*, which costs utility, never privacy: the modular sum is
still a function of the noised sum). The rotated sum of ``n`` clipped updates has
coordinates sub-Gaussian with variance proxy ``(n u)^2 / D`` (Hoeffding, over the
rotation's random signs), rounding adds less than ``n``, and ``n`` noise shares add
a discrete Gaussian (sub-Gaussian with proxy ``V n / planned``) or a Skellam
(Chernoff on its moment generating function, ``exp(V (cosh t - 1))``). A union
bound over the ``D`` coordinates bounds the probability that any coordinate
wraps; the scale is the largest ``u`` for which that bound is at most
``max_wrap`` (default :data:`WRAP_LIMIT`) and each share at most
:data:`MAX_SHARE` (the exact samplers' tables stay small: beyond it the rounding
error is already far below the noise). A configuration for which no scale
keeps the bound is refused (:class:`~flowerpets.exceptions.InfeasibleParametersError`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from flowerpets.dp._primitives.calibration import rounded_l2_bound
from flowerpets.dp.distributed._mechanism import Mechanism
from flowerpets.exceptions import InfeasibleParametersError

__all__ = ["MAX_SHARE", "WRAP_LIMIT", "Plan", "plan", "wrap_bound"]

WRAP_LIMIT = 1e-6
"""The default bound on the probability that a round's sum wraps around the modulus."""

MAX_SHARE = float(1 << 24)
"""The largest noise share a node draws (sigma 4096 per share)."""

_SPLITS = 64  # how finely the margin is split between signal and noise in the union bound


@dataclass(frozen=True, slots=True)
class Plan:
    """A round's scale (``u = clip * scale``), each node's share, and the wrap bound."""

    units: float  # the clip in integer steps, u
    share: float  # each node's noise parameter
    wrap: float  # the bound on the probability that some coordinate wraps


def _noise_tail(mechanism: Mechanism, variance: float, a: float) -> float:
    """P(|noise| >= a) for a sum of shares of total ``variance``, bounded from above."""
    if variance == 0:
        return 0.0 if a > 0 else 1.0
    if mechanism is Mechanism.DISCRETE_GAUSSIAN:
        exponent = a * a / (2 * variance)
    else:  # Skellam: Chernoff at t = asinh(a / V)
        r = a / variance
        exponent = a * math.asinh(r) - variance * (math.sqrt(1 + r * r) - 1)
    return min(1.0, 2 * math.exp(-exponent))


def wrap_bound(
    *,
    units: float,
    clients: int,
    noise_variance: float,
    padded: int,
    modulus_bits: int,
    mechanism: Mechanism,
) -> float:
    """A bound on the probability that any of the ``padded`` coordinates of a sum wraps.

    ``clients`` inputs, each of L2 norm at most ``units`` before rounding, and summed
    noise of total ``noise_variance``.
    """
    margin = (1 << (modulus_bits - 1)) - clients  # rounding moves each input < 1 per coordinate
    if margin <= 0:
        return 1.0
    proxy = (clients * units) ** 2 / padded
    best = 1.0
    for k in range(1, _SPLITS):
        a_signal = margin * k / _SPLITS
        signal = min(1.0, 2 * math.exp(-(a_signal**2) / (2 * proxy))) if proxy else 0.0
        noise = _noise_tail(mechanism, noise_variance, margin - a_signal)
        best = min(best, padded * (signal + noise))
    return min(1.0, best)


@functools.lru_cache(maxsize=64)
def plan(
    *,
    noise_multiplier: float,
    padded: int,
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

    def share_at(units: float) -> float:
        l2 = rounded_l2_bound(units, dimension=padded, beta=beta)
        return (noise_multiplier * l2) ** 2 / planned

    def wrap_at(units: float) -> float:
        return wrap_bound(
            units=units,
            clients=cohort,
            noise_variance=share_at(units) * cohort,
            padded=padded,
            modulus_bits=modulus_bits,
            mechanism=mechanism,
        )

    def fits(units: float) -> bool:
        return share_at(units) <= MAX_SHARE and wrap_at(units) <= max_wrap

    low, high = 1e-3, float(1 << modulus_bits)
    if not fits(low):
        raise InfeasibleParametersError(
            f"no scale keeps a sum of {cohort} inputs of dimension {padded} within "
            f"2**{modulus_bits} (wrap probability <= {max_wrap:g}) at noise multiplier "
            f"{noise_multiplier:g}: raise modulus_bits, or lower the noise"
        )
    for _ in range(200):  # bisection on log(units)
        if high / low < 1 + 1e-9:
            break
        middle = math.sqrt(low * high)
        low, high = (middle, high) if fits(middle) else (low, middle)
    return Plan(units=low, share=share_at(low), wrap=wrap_at(low))
