"""Adaptive clipping (Andrew, Thakkar, McMahan and Ramaswamy, NeurIPS 2021): settings and step.

Each client reports ``b_i - 1/2`` with ``b_i = 1`` if its update's norm was at
most ``C``; the server noises the sum with N(0, sigma_b^2), estimates the
unclipped fraction ``b = (sum + noise) / m + 1/2`` and moves the clip
geometrically towards the target quantile, ``C <- C exp(-eta (b - gamma))``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from flowerpets._validation import probability, real
from flowerpets.dp._primitives.noise import GaussianSource

__all__ = ["AdaptiveClipping", "next_clip"]


@dataclass(frozen=True, slots=True)
class AdaptiveClipping:
    """Adaptive clipping's settings (Andrew et al., 2021); defaults are the paper's.

    ``target_quantile`` (gamma): the fraction of updates the clip should leave
    unclipped. ``learning_rate`` (eta): the geometric step, ``C <- C exp(-eta (b -
    gamma))``. ``count_stddev`` (sigma_b): the noise on the unclipped count; None
    means ``m / 20`` for an expected cohort of ``m``.
    """

    target_quantile: float = 0.5
    learning_rate: float = 0.2
    count_stddev: float | None = None

    def __post_init__(self) -> None:
        probability("target_quantile", self.target_quantile)
        real("learning_rate", self.learning_rate, above=0)
        if self.count_stddev is not None:
            real("count_stddev", self.count_stddev, above=0)

    def count_noise(self, expected_cohort: float) -> float:
        """sigma_b for an expected cohort of ``expected_cohort`` clients."""
        return self.count_stddev if self.count_stddev is not None else expected_cohort / 20.0

    def next_clip(self, clip: float, unclipped_fraction: float) -> float:
        """The geometric update ``C exp(-eta (b - gamma))``."""
        return clip * math.exp(-self.learning_rate * (unclipped_fraction - self.target_quantile))


def next_clip(
    adaptive: AdaptiveClipping,
    clip: float,
    unclipped: float,
    *,
    expected: float,
    noise: GaussianSource,
) -> tuple[float, float]:
    """The next round's clip and the noised unclipped fraction it follows from.

    ``unclipped`` is the round's sum of the shifted indicators (``b_i - 1/2``),
    ``expected`` the expected cohort ``m``: the count is noised with sigma_b
    before anything is derived from it.
    """
    noisy = unclipped + float(noise.normal(adaptive.count_noise(expected), (1,))[0])
    fraction = noisy / expected + 0.5
    return adaptive.next_clip(clip, fraction), fraction
