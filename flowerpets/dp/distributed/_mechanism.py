"""Distributed DP's two mechanisms: each one's privacy event and its exact noise sampler.

A table, not a chain of ifs: the server mod builds the mechanism's event for the
accountant, the client mod draws its noise share with the mechanism's sampler
(exact, integer arithmetic, from a secure keystream: :mod:`flowerpets.dp._primitives.discrete`).
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from fractions import Fraction

import numpy as np
from numpy.typing import NDArray

from flowerpets.dp._primitives.discrete import (
    RandomWords,
    sample_discrete_gaussian,
    sample_skellam,
)
from flowerpets.dp.accountant import DistributedDiscreteGaussianEvent, SkellamEvent

__all__ = ["Mechanism", "draw_share"]

Sampler = Callable[[Fraction, int, RandomWords], NDArray[np.int64]]


class Mechanism(Enum):
    """The discrete noise each client adds before its update is masked."""

    SKELLAM = "skellam"
    """Skellam noise (Agarwal, Kairouz and Liu, NeurIPS 2021): a sum of Skellams is Skellam,
    so the accounting of the summed noise is exact. The default."""
    DISCRETE_GAUSSIAN = "discrete-gaussian"
    """The distributed discrete Gaussian (Kairouz, Liu and Steinke, ICML 2021); each
    client's share needs sigma >= 1/2."""

    @property
    def event(self) -> type[SkellamEvent] | type[DistributedDiscreteGaussianEvent]:
        """The accountant's event for a sum of this mechanism's shares."""
        return _EVENTS[self]


_EVENTS: dict[Mechanism, type[SkellamEvent] | type[DistributedDiscreteGaussianEvent]] = {
    Mechanism.SKELLAM: SkellamEvent,
    Mechanism.DISCRETE_GAUSSIAN: DistributedDiscreteGaussianEvent,
}

# The share's parameter is its variance (Skellam: Poisson(v/2) - Poisson(v/2)) or sigma^2.
_SAMPLERS: dict[Mechanism, Sampler] = {
    Mechanism.SKELLAM: lambda v, n, source: sample_skellam(v / 2, n, source=source),
    Mechanism.DISCRETE_GAUSSIAN: lambda v, n, source: sample_discrete_gaussian(v, n, source=source),
}


def draw_share(
    mechanism: Mechanism, variance: float, size: int, source: RandomWords
) -> NDArray[np.int64]:
    """``size`` coordinates of one client's noise share of parameter ``variance``, exactly.

    The float ``variance`` is taken at its exact binary value (no rounding on the way
    to the integer sampler); 0 adds no noise.
    """
    if variance == 0:
        return np.zeros(size, dtype=np.int64)
    return _SAMPLERS[mechanism](Fraction(variance), size, source)
