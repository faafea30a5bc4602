"""Calibration against the papers: Balle and Wang's analytic Gaussian, Andrew et al.'s noise split.

The analytic Gaussian condition is re-implemented here from the paper (Theorem 8
of Balle and Wang, ICML 2018) with nothing but ``math.erfc``, so the library the
code relies on is checked against the formula, not against itself.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowerpets.dp._primitives.calibration import (
    analytic_gaussian_sigma,
    classic_gaussian_sigma,
    gaussian_epsilon,
    scale_for_bits,
    split_noise_multiplier,
)
from flowerpets.exceptions import InfeasibleParametersError


def phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def balle_wang_delta(sigma: float, epsilon: float, sensitivity: float = 1.0) -> float:
    """delta(epsilon) of N(0, sigma^2) noise on a function of L2 sensitivity ``sensitivity``."""
    a = sensitivity / (2 * sigma)
    b = epsilon * sigma / sensitivity
    return phi(a - b) - math.exp(epsilon) * phi(-a - b)


@settings(max_examples=40, deadline=None)
@given(
    st.floats(0.05, 30.0),
    st.sampled_from([1e-3, 1e-5, 1e-7]),
    st.floats(0.1, 10.0),
)
def test_analytic_sigma_meets_balle_wang_with_equality(
    epsilon: float, delta: float, sensitivity: float
) -> None:
    sigma = analytic_gaussian_sigma(epsilon, delta, sensitivity=sensitivity)
    assert balle_wang_delta(sigma, epsilon, sensitivity) == pytest.approx(delta, rel=1e-6)
    # Minimal: a little less noise breaks the guarantee.
    assert balle_wang_delta(sigma * 0.99, epsilon, sensitivity) > delta


def test_sigma_scales_with_the_sensitivity() -> None:
    one = analytic_gaussian_sigma(2.0, 1e-5)
    assert analytic_gaussian_sigma(2.0, 1e-5, sensitivity=3.0) == pytest.approx(3 * one)


def test_the_classic_formula_is_wrong_at_large_epsilon() -> None:
    # The classic sigma = sqrt(2 ln(1.25 / delta)) / epsilon (Dwork and Roth, 2014, Theorem
    # A.1) is proven for epsilon < 1 only; Balle and Wang (ICML 2018, Section 2) show it fails
    # for large epsilon. By their exact condition (Theorem 8), at epsilon = 16 it gives 18.90.
    sigma = classic_gaussian_sigma(16.0, 1e-5)
    assert gaussian_epsilon(sigma, 1e-5) == pytest.approx(18.90, abs=0.01)
    assert analytic_gaussian_sigma(16.0, 1e-5) > sigma


@pytest.mark.parametrize("epsilon", [0.1, 0.5, 0.9])
def test_the_classic_formula_is_valid_but_loose_below_one(epsilon: float) -> None:
    classic = classic_gaussian_sigma(epsilon, 1e-5)
    assert gaussian_epsilon(classic, 1e-5) <= epsilon
    assert analytic_gaussian_sigma(epsilon, 1e-5) < classic


def test_gaussian_epsilon_inverts_the_calibration() -> None:
    sigma = analytic_gaussian_sigma(4.0, 1e-6)
    assert gaussian_epsilon(sigma, 1e-6) == pytest.approx(4.0, rel=1e-6)
    assert gaussian_epsilon(0.0, 1e-6) == math.inf


@pytest.mark.parametrize(
    ("epsilon", "delta", "match"),
    [
        (0.0, 1e-5, "epsilon must be a number > 0"),
        (-1.0, 1e-5, "epsilon"),
        (math.inf, 1e-5, "epsilon"),
        (math.nan, 1e-5, "epsilon"),
        (1.0, 0.0, "delta must be in"),
        (1.0, 1.0, "delta"),
        (1.0, -0.1, "delta"),
    ],
)
def test_nonsense_privacy_parameters_are_refused(epsilon: float, delta: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        analytic_gaussian_sigma(epsilon, delta)


def test_noise_split_recombines_to_the_total() -> None:
    # Andrew et al.: z^-2 = z_update^-2 + (2 sigma_b)^-2.
    z, sigma_b = 1.0, 50 / 20
    z_update = split_noise_multiplier(z, sigma_b)
    assert (z_update**-2 + (2 * sigma_b) ** -2) ** -0.5 == pytest.approx(z)
    assert z_update > z  # the update needs a little more noise than the total


def test_noise_split_needs_enough_count_noise() -> None:
    with pytest.raises(InfeasibleParametersError, match="must exceed z / 2"):
        split_noise_multiplier(1.0, 0.5)  # 2 sigma_b == z
    with pytest.raises(ValueError, match="count_stddev"):
        split_noise_multiplier(1.0, 0.0)


# -- the scale for a bit width (Kairouz, Liu and Steinke 2021, Sections 4.2 and 4.4) -------------
def scale_of(bits: int, case: tuple[float, int, int, float, float]) -> float:
    """``scale_for_bits`` for (clip, dimension, clients, local stddev, wrap probability)."""
    clip, dimension, clients, sigma, wrap = case
    return scale_for_bits(
        bits,
        clip=clip,
        dimension=dimension,
        clients=clients,
        local_stddev=sigma,
        wrap_probability=wrap,
    )


@settings(max_examples=40, deadline=None)
@given(
    st.integers(8, 32),
    st.floats(0.01, 10.0),
    st.integers(1, 2**20),
    st.integers(1, 200),
    st.floats(0.0, 5.0),
    st.sampled_from([1e-2, 1e-4, 1e-6]),
)
def test_the_scale_solves_the_papers_equation(
    bits: int, clip: float, dimension: int, clients: int, sigma: float, wrap: float
) -> None:
    from scipy import stats

    k = float(stats.norm.isf(wrap / 2))  # two-sided: P(|N(0, 1)| > k) = wrap
    case = (clip, dimension, clients, sigma, wrap)
    if 2.0 ** (2 * bits) <= clients * k**2:
        with pytest.raises(InfeasibleParametersError, match="bits cannot hold"):
            scale_of(bits, case)
        return
    scale = scale_of(bits, case)
    gamma = 1 / scale
    spread = (clip * clients) ** 2 / dimension + (gamma**2 / 4 + sigma**2) * clients
    assert 2 * k * math.sqrt(spread) / gamma == pytest.approx(2.0**bits, rel=1e-9)


def test_the_scale_wraps_the_worst_case_sum_about_as_often_as_asked() -> None:
    # Every client sends the same update (the sum's norm is then n C, the worst case), in a
    # random direction (what the rotation makes of any vector), rounded at random and noised.
    rng = np.random.default_rng(7)  # the test's data, not privacy noise
    bits, clip, dimension, clients, sigma, wrap = 11, 1.0, 2**14, 20, 0.05, 0.01
    case = (clip, dimension, clients, sigma, wrap)
    scale = scale_of(bits, case)
    direction = rng.standard_normal(dimension)
    update = clip * scale * direction / np.linalg.norm(direction)
    total = np.zeros(dimension)
    for _ in range(clients):
        low = np.floor(update)
        rounded = low + (rng.random(dimension) < update - low)
        total += rounded + np.rint(rng.normal(0.0, sigma * scale, dimension))
    wrapped = np.mean(np.abs(total) >= 2 ** (bits - 1))
    # About as often as asked (the estimate's own standard deviation is 8% of it here).
    assert 0.7 * wrap < wrapped < 1.4 * wrap, wrapped
    # One more bit more than doubles the room the sum has.
    assert scale_of(bits + 1, case) > 2 * scale
