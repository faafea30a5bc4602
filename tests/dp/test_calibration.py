"""Calibration against the papers: Balle and Wang's analytic Gaussian, Andrew et al.'s noise split.

The analytic Gaussian condition is re-implemented here from the paper (Theorem 8
of Balle and Wang, ICML 2018) with nothing but ``math.erfc``, so the library the
code relies on is checked against the formula, not against itself.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowerpets.dp._primitives.calibration import (
    analytic_gaussian_sigma,
    classic_gaussian_sigma,
    gaussian_epsilon,
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
