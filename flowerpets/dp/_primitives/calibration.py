"""Calibrating Gaussian mechanisms: the analytic Gaussian, and adaptive clipping's noise split.

**Analytic Gaussian mechanism** (Balle and Wang, ICML 2018, Theorem 8). Adding
N(0, sigma^2) to a function of L2 sensitivity ``Delta`` is (epsilon, delta)-DP
if and only if

    Phi(Delta / (2 sigma) - epsilon sigma / Delta)
        - e^epsilon Phi(-Delta / (2 sigma) - epsilon sigma / Delta)  <=  delta.

The smallest such sigma is found by a root search; dp-accounting's
``get_sigma_gaussian`` implements exactly this condition (its
``_get_log_delta``, with ``Delta = 1``), and we scale by ``Delta``. It is valid
for every epsilon > 0, unlike the classic ``sigma = Delta sqrt(2 ln(1.25 /
delta)) / epsilon``, which is proven only for epsilon < 1 (Dwork and Roth,
Theorem A.1) and, at epsilon = 16, delta = 1e-5, really gives epsilon = 18.9.

**Adaptive clipping's budget split** (Andrew, Thakkar, McMahan and Ramaswamy,
NeurIPS 2021, Section 3.1). A round releases two Gaussian sums: the clipped
updates (sensitivity C, noise z_update * C) and the shifted unclipped
indicators ``b_i - 1/2`` (sensitivity 1/2, noise sigma_b). Together they are one
Gaussian mechanism with noise multiplier ``z`` where
``z^-2 = z_update^-2 + (2 sigma_b)^-2``, so for a total ``z`` the update's share is
``z_update = (z^-2 - (2 sigma_b)^-2)^(-1/2)``, which exists only if ``2 sigma_b > z``.

**A client's norm after conditional randomized rounding** (Kairouz, Liu and
Steinke, "The distributed discrete Gaussian mechanism for federated learning
with secure aggregation", ICML 2021, Section 4.1). Distributed DP scales a
clipped update (L2 norm at most ``c`` once scaled: the clip times the scale
``1 / gamma``) and rounds each coordinate up or down at random, unbiased. The
rounded integer vector of dimension ``d`` always has

    ||x~||_2 <= c + sqrt(d),

and *conditional* randomized rounding (rounding again until the norm is within
the bound, which with ``beta > 0`` fails with probability at most ``beta`` each
try) also guarantees

    ||x~||_2^2 <= c^2 + d / 4 + sqrt(2 log(1 / beta)) (c + sqrt(d) / 2).

The sensitivity of the sum is the smaller of the two (only the first when
``beta = 0``, plain randomized rounding). An integer vector's L1 norm is at
most ``sqrt(d)`` times its L2 norm and at most its L2 norm squared (every
non-zero coordinate has ``|x_j| <= x_j^2``), which is the L1 sensitivity the
Skellam bound also needs (Agarwal, Kairouz and Liu, NeurIPS 2021).
"""

from __future__ import annotations

import math
from functools import lru_cache

from flowerpets._validation import integer, probability, real
from flowerpets.exceptions import InfeasibleParametersError

__all__ = [
    "analytic_gaussian_sigma",
    "classic_gaussian_sigma",
    "gaussian_epsilon",
    "rounded_l1_bound",
    "rounded_l2_bound",
    "split_noise_multiplier",
]


def _epsilon_delta(epsilon: object, delta: object) -> tuple[float, float]:
    return real("epsilon", epsilon, above=0), probability("delta", delta, zero=False, one=False)


def analytic_gaussian_sigma(epsilon: float, delta: float, *, sensitivity: float = 1.0) -> float:
    """The smallest sigma for which N(0, sigma^2) noise is (epsilon, delta)-DP (Balle and Wang)."""
    epsilon, delta = _epsilon_delta(epsilon, delta)
    sensitivity = real("sensitivity", sensitivity, above=0)
    from dp_accounting import get_sigma_gaussian  # imported late: dp-accounting loads scipy

    return float(get_sigma_gaussian(epsilon, delta)) * sensitivity


def gaussian_epsilon(noise_multiplier: float, delta: float) -> float:
    """The exact epsilon at ``delta`` of one Gaussian mechanism with this noise multiplier.

    By Balle and Wang's condition, through dp-accounting's ``get_epsilon_gaussian``.
    """
    noise_multiplier = real("noise_multiplier", noise_multiplier, at_least=0)
    delta = probability("delta", delta, zero=False, one=False)
    if noise_multiplier == 0:
        return math.inf
    return _gaussian_epsilon(noise_multiplier, delta)


@lru_cache(maxsize=4096)  # every node asks for the same few values, round after round
def _gaussian_epsilon(noise_multiplier: float, delta: float) -> float:
    from dp_accounting import get_epsilon_gaussian

    return float(get_epsilon_gaussian(noise_multiplier, delta))


def classic_gaussian_sigma(epsilon: float, delta: float, *, sensitivity: float = 1.0) -> float:
    """``Delta sqrt(2 ln(1.25 / delta)) / epsilon``: proven only for epsilon < 1.

    For comparison only: never calibrate with it.
    """
    epsilon, delta = _epsilon_delta(epsilon, delta)
    return sensitivity * math.sqrt(2.0 * math.log(1.25 / delta)) / epsilon


def split_noise_multiplier(noise_multiplier: float, count_stddev: float) -> float:
    """The update's noise multiplier when ``count_stddev`` noises the unclipped count.

    Raises :class:`~flowerpets.exceptions.InfeasibleParametersError` unless
    ``2 * count_stddev > noise_multiplier``.
    """
    z = real("noise_multiplier", noise_multiplier, above=0)
    sigma_b = real("count_stddev", count_stddev, above=0)
    if not 2.0 * sigma_b > z:
        raise InfeasibleParametersError(
            f"adaptive clipping cannot keep a total noise multiplier of {z}: the count's noise "
            f"sigma_b = {sigma_b} must exceed z / 2 = {z / 2} (raise count_stddev, or lower z)"
        )
    return float((z**-2 - (2.0 * sigma_b) ** -2) ** -0.5)


def rounded_l2_bound(norm: float, *, dimension: int, beta: float = 0.0) -> float:
    """The L2 norm bound after (conditional) randomized rounding of a vector of L2 norm ``norm``.

    ``norm`` is already scaled (the clip times the scale); ``beta`` in [0, 1) is
    the conditional rounding's parameter (0: plain randomized rounding). See
    the module docstring (Kairouz, Liu and Steinke 2021).
    """
    norm = real("norm", norm, at_least=0)
    dimension = integer("dimension", dimension, at_least=1)
    beta = probability("beta", beta, one=False)
    always = norm + math.sqrt(dimension)
    if beta == 0:
        return always
    conditional = (
        norm**2
        + dimension / 4
        + math.sqrt(2 * math.log(1 / beta)) * (norm + math.sqrt(dimension) / 2)
    )
    return min(always, math.sqrt(conditional))


def rounded_l1_bound(l2_bound: float, *, dimension: int) -> float:
    """L1 bound of an integer vector, ``dimension`` coordinates, L2 norm at most ``l2_bound``."""
    l2_bound = real("l2_bound", l2_bound, at_least=0)
    dimension = integer("dimension", dimension, at_least=1)
    return l2_bound * min(math.sqrt(dimension), l2_bound)
