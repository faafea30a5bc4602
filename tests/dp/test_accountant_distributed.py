"""Distributed DP accounting: the Skellam and distributed discrete Gaussian bounds, attacked.

Independent computations: the exact Renyi divergence between the summed noise
and the summed noise shifted by an integer update, computed by brute force from
the exact probability mass functions (the Skellam pmf from scipy, the sum of
discrete Gaussians by convolving the exact pmf), must never exceed the bound the
accountant uses; the Skellam bound must tend to the Gaussian's as the noise
grows; the general sampling-without-replacement bound applied to a Gaussian
must never be below dp-accounting's Gaussian-specific one (and equal it where
the two theorems coincide). Dropouts: fewer shares in the sum never lower the
epsilon, and the calibration keeps its promise for the clients it counts.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import special, stats

from flowerpets.core.sampling import FixedSizeSampling, FullParticipation, PoissonSampling
from flowerpets.dp._primitives.calibration import rounded_l1_bound, rounded_l2_bound
from flowerpets.dp.accountant import (
    DistributedDiscreteGaussianEvent,
    DropoutPolicy,
    FixedSizeSampledGaussian,
    FullParticipationGaussian,
    Laplace,
    Neighbouring,
    PldAccountant,
    PoissonSampledGaussian,
    RdpAccountant,
    SkellamEvent,
    calibrate_distributed_noise,
    default_accountant,
    default_neighbouring,
)
from flowerpets.dp.accountant._amplification import mixed_cohort_rdp, without_replacement_rdp
from flowerpets.dp.accountant._rdp import _Tabulated
from flowerpets.dp.central._ledger import event_from_json, event_json
from flowerpets.exceptions import ParameterTypeError, ParameterValueError, PrivacyAccountingError

ZERO, REPLACE, ADD = (
    Neighbouring.ZERO_OUT,
    Neighbouring.REPLACE_ONE,
    Neighbouring.ADD_OR_REMOVE,
)
DELTA = 1e-5
ORDERS = np.array([1.2, 1.5, 2.0, 2.5, 3.0, 4.0, 6.0, 8.0, 16.0])


def curve(event: SkellamEvent | DistributedDiscreteGaussianEvent, relation=ZERO, orders=ORDERS):
    """The RDP the accountant composes for one ``event``, at ``orders``."""
    return _Tabulated(event, relation)(np.asarray(orders, dtype=np.float64))


def renyi(p: np.ndarray, q: np.ndarray, alpha: float) -> float:
    """D_alpha(p || q) of two pmfs on the same grid, over where both are representable.

    The pmfs have full support; where one underflows the other is negligible
    too (the tails fall faster than the likelihood ratio grows).
    """
    keep = (p > 0) & (q > 0)
    return float(special.logsumexp(alpha * np.log(p[keep]) + (1 - alpha) * np.log(q[keep]))) / (
        alpha - 1
    )


def both_ways(pmf: np.ndarray, shift: int, alpha: float) -> float:
    """The larger of the two divergences between ``pmf`` and ``pmf`` shifted by ``shift``."""
    pad = np.zeros(shift)
    here, there = np.concatenate([pmf, pad]), np.concatenate([pad, pmf])
    inner = slice(shift, len(pmf))  # where both are positive (the pmfs have full support)
    return max(
        renyi(here[inner], there[inner], alpha) if alpha > 1 else 0.0,
        renyi(there[inner], here[inner], alpha) if alpha > 1 else 0.0,
    )


def skellam_pmf(variance: float, half_width: int) -> np.ndarray:
    k = np.arange(-half_width, half_width + 1)
    return np.asarray(stats.skellam(variance / 2, variance / 2).pmf(k))


def summed_discrete_gaussian_pmf(sigma_squared: float, clients: int, half_width: int):
    k = np.arange(-half_width, half_width + 1)
    one = np.exp(-(k**2) / (2 * sigma_squared))
    one /= one.sum()
    total = one
    for _ in range(clients - 1):
        total = np.convolve(total, one)
    return total


def skellam(variance: float, l2: float, l1: float, dimension: int = 1, **kw) -> SkellamEvent:
    return SkellamEvent(variance, 1, l2, l1, dimension, **kw)


# --- sensitivities after scaling and rounding (KLS21, Section 4.1) ----------------------------


def test_the_rounded_norm_bound_is_the_papers() -> None:
    # c = 10, d = 16, beta = e^-0.5 (sqrt(2 log(1/beta)) = 1): c^2 + d/4 + (c + sqrt(d)/2) = 116,
    # below (c + sqrt(d))^2 = 196.
    beta = math.exp(-0.5)
    assert rounded_l2_bound(10.0, dimension=16, beta=beta) == pytest.approx(math.sqrt(116))
    assert rounded_l2_bound(10.0, dimension=16) == 14.0  # beta = 0: plain randomized rounding
    # Large dimension, small norm: the conditional bound's sqrt(2 log(1/beta)) term can lose.
    tiny = 1e-12
    assert rounded_l2_bound(0.0, dimension=1, beta=tiny) == 1.0
    assert rounded_l1_bound(3.0, dimension=100) == 9.0  # |x_j| <= x_j^2 for integers
    assert rounded_l1_bound(10.0, dimension=4) == 20.0  # sqrt(d) ||x||_2
    with pytest.raises(ParameterValueError):
        rounded_l2_bound(1.0, dimension=4, beta=1.0)
    with pytest.raises(ParameterTypeError):
        rounded_l2_bound(1.0, dimension=4.0)  # type: ignore[arg-type]


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 40), st.floats(0.0, 50.0), st.integers(0, 2**32 - 1))
def test_randomized_rounding_never_exceeds_the_unconditional_bound(
    dimension: int, norm: float, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=dimension)
    x *= norm / max(float(np.linalg.norm(x)), 1e-300)
    floor = np.floor(x)
    rounded = floor + (rng.random(dimension) < x - floor)  # unbiased randomized rounding
    assert np.linalg.norm(rounded) <= rounded_l2_bound(norm, dimension=dimension) + 1e-9
    l2 = float(np.linalg.norm(rounded))
    assert np.abs(rounded).sum() <= rounded_l1_bound(l2, dimension=dimension) + 1e-9


def test_from_pipeline_carries_the_papers_sensitivities() -> None:
    beta = math.exp(-0.5)
    event = SkellamEvent.from_pipeline(
        clip=0.1, scale=100.0, dimension=16, local_variance=4.0, clients_in_sum=20, beta=beta
    )
    assert event.l2_sensitivity == pytest.approx(math.sqrt(116))
    assert event.l1_sensitivity == pytest.approx(math.sqrt(116) * 4)  # sqrt(d) < ||x||_2
    assert event.total_variance == 80.0 and event.scale == 100.0
    assert event.noise_multiplier == pytest.approx(math.sqrt(80.0) / math.sqrt(116))
    assert event.cohort_size is None and event.sample_rate == 1.0


# --- the Skellam bound (AKL21, Theorem 3.5) ---------------------------------------------------


@pytest.mark.parametrize("variance", [0.5, 1.0, 3.0, 10.0, 40.0])
@pytest.mark.parametrize("shift", [1, 2, 3])
def test_skellam_bound_is_above_the_exact_divergence(variance: float, shift: int) -> None:
    pmf = skellam_pmf(variance, half_width=200)
    bound = curve(skellam(variance, shift, shift))
    for alpha, value in zip(ORDERS, bound, strict=True):
        exact = both_ways(pmf, shift, float(alpha))
        assert exact <= value * (1 + 1e-9), (variance, shift, alpha)


def test_skellam_bound_in_two_dimensions_uses_the_l1_norm() -> None:
    # A shift of (1, 1): the exact divergence is twice the one-dimensional one.
    variance = 2.0
    pmf = skellam_pmf(variance, half_width=150)
    bound = curve(skellam(variance, math.sqrt(2), 2.0, dimension=2))
    for alpha, value in zip(ORDERS, bound, strict=True):
        assert 2 * both_ways(pmf, 1, float(alpha)) <= value


def test_skellam_bound_tends_to_the_gaussian() -> None:
    # As the variance grows (shift fixed) the discrete surcharge vanishes: alpha D^2 / (2 V).
    orders = np.array([2.0, 5.0, 20.0])
    for variance in (1e4, 1e6):
        gaussian = orders * 10.0**2 / (2 * variance)
        ratio = curve(skellam(variance, 10.0, 10.0), orders=orders) / gaussian
        assert (ratio >= 1).all() and (ratio - 1 < 100 / variance).all()
    # And the epsilon: a Skellam sum with noise multiplier z against the Gaussian with z (at an
    # epsilon whose best RDP order is above 2: below it the bound is only known at 2).
    event = SkellamEvent.from_pipeline(
        clip=1.0, scale=1e4, dimension=256, local_variance=0.0, clients_in_sum=50
    ).with_noise_multiplier(5.0)
    distributed = RdpAccountant(neighbouring=ZERO).compose(event, 50).get_epsilon(DELTA)
    central = RdpAccountant().compose(FullParticipationGaussian(5.0), 50).get_epsilon(DELTA)
    assert central <= distributed <= central * 1.01


@settings(max_examples=25, deadline=None)
@given(st.floats(0.5, 1e4), st.floats(1.1, 100.0), st.floats(1.0, 30.0), st.integers(1, 20))
def test_skellam_epsilon_is_monotone(variance: float, growth: float, l2: float, rounds: int):
    def eps(v: float, sensitivity: float, n: int) -> float:
        event = skellam(v, sensitivity, sensitivity * 3)
        return RdpAccountant(neighbouring=ZERO).compose(event, n).get_epsilon(DELTA)

    base = eps(variance, l2, rounds)
    assert eps(variance * growth, l2, rounds) <= base  # more noise, less epsilon
    assert eps(variance, l2 * growth, rounds) >= base  # more sensitivity, more epsilon
    assert eps(variance, l2, rounds + 1) >= base


# --- the distributed discrete Gaussian (KLS21, Theorem 1 and Proposition 14) ----------------


@pytest.mark.parametrize("sigma_squared", [0.25, 0.5, 1.0])
@pytest.mark.parametrize("clients", [1, 2, 3, 6])
@pytest.mark.parametrize("shift", [1, 2])
def test_summed_discrete_gaussian_bound_is_above_the_exact_divergence(
    sigma_squared: float, clients: int, shift: int
) -> None:
    # Wide enough that the truncation's edges are far from where the divergence lives.
    pmf = summed_discrete_gaussian_pmf(sigma_squared, clients, half_width=40)
    event = DistributedDiscreteGaussianEvent(sigma_squared, clients, shift, shift, 1)
    bound = curve(event)
    for alpha, value in zip(ORDERS, bound, strict=True):
        exact = both_ways(pmf, shift, float(alpha))
        assert exact <= value * (1 + 1e-9), (sigma_squared, clients, shift, alpha)


def test_one_discrete_gaussian_is_bounded_like_a_gaussian() -> None:
    # One share, tau = 0: alpha Delta^2 / (2 sigma^2) (Canonne, Kamath and Steinke 2020).
    integers = np.array([2.0, 3.0, 7.0, 30.0])
    event = DistributedDiscreteGaussianEvent(2.0, 1, 3.0, 9.0, 10)
    assert curve(event, orders=integers) == pytest.approx(integers * 9 / 4)


def test_more_discrete_gaussian_shares_never_raise_the_bound() -> None:
    # At sigma = 1/2 the tau term grows with the clients faster than the Gaussian term falls,
    # but the sum of more shares is a post-processing of the sum of fewer.
    values = [
        curve(DistributedDiscreteGaussianEvent(0.25, n, 1.0, 1.0, 1))[3] for n in range(1, 40)
    ]
    assert all(a >= b for a, b in itertools.pairwise(values))
    below_half = DistributedDiscreteGaussianEvent(0.2, 100, 1.0, 1.0, 1)
    assert np.isinf(curve(below_half)).all()  # the theorem needs sigma >= 1/2
    assert RdpAccountant(neighbouring=ZERO).compose(below_half).get_epsilon(DELTA) == math.inf


def test_discrete_gaussian_theorem_1_holds_at_fractional_orders() -> None:
    # KLS21's Theorem 1 is stated for every real order, so with tiny tau a distributed discrete
    # Gaussian's epsilon is the Gaussian's even where the best order is below 2 (Skellam's bound,
    # known at integers, is only interpolated there).
    event = DistributedDiscreteGaussianEvent.from_pipeline(
        clip=1.0, scale=1e4, dimension=256, local_variance=0.0, clients_in_sum=100
    ).with_noise_multiplier(1.0)
    distributed = RdpAccountant(neighbouring=ZERO).compose(event, 100).get_epsilon(DELTA)
    central = RdpAccountant().compose(FullParticipationGaussian(1.0), 100).get_epsilon(DELTA)
    assert distributed == pytest.approx(central, rel=1e-6)


def test_discrete_gaussian_with_much_noise_matches_skellam_and_gaussian() -> None:
    fields = {"clients_in_sum": 100, "l2_sensitivity": 500.0, "l1_sensitivity": 5000.0}
    dg = DistributedDiscreteGaussianEvent(0.0, dimension=100, **fields).with_noise_multiplier(4.0)
    sk = SkellamEvent(0.0, dimension=100, **fields).with_noise_multiplier(4.0)
    eps = [RdpAccountant(neighbouring=ZERO).compose(e, 20).get_epsilon(DELTA) for e in (dg, sk)]
    central = RdpAccountant().compose(FullParticipationGaussian(4.0), 20).get_epsilon(DELTA)
    assert central <= min(eps) and max(eps) <= central * 1.02


# --- amplification by a random cohort ---------------------------------------------------------


@pytest.mark.parametrize("z", [0.7, 1.0, 2.0, 5.0])
@pytest.mark.parametrize("gamma", [0.01, 0.1, 0.5])
def test_general_without_replacement_bound_against_dp_accounting(z: float, gamma: float):
    from dp_accounting.rdp.rdp_privacy_accountant import _compute_rdp_sample_wor_gaussian

    alphas = np.array([2, 3, 4, 8, 16, 32, 64, 128, 256])
    ours = without_replacement_rdp(lambda a: a / (2 * z**2), gamma)(alphas)
    theirs = _compute_rdp_sample_wor_gaussian(gamma, z, alphas)
    # Theorem 9 (any mechanism) is never below Theorem 27 (Gaussians only) ...
    assert (ours >= theirs * (1 - 1e-9)).all()
    # ... and is the same sum where the Gaussian-only term does not help.
    assert ours[0] == pytest.approx(theirs[0], rel=1e-9)
    if z <= 1.0:
        assert ours == pytest.approx(theirs, rel=1e-9)


@settings(max_examples=30, deadline=None)
@given(st.floats(0.001, 1.0), st.floats(0.01, 10.0))
def test_joint_convexity_bound_is_between_zero_and_the_unamplified(gamma: float, scale: float):
    alphas = np.array([2, 3, 8, 64])
    base = lambda a: scale * a / 2.0  # noqa: E731
    mixed = mixed_cohort_rdp(base, gamma)(alphas)
    assert (mixed >= 0).all() and (mixed <= base(alphas) * (1 + 1e-12)).all()
    assert (mixed_cohort_rdp(base, 1.0)(alphas) == base(alphas)).all()


def test_a_random_cohort_amplifies_and_a_bigger_one_less() -> None:
    def eps(cohort: int | None) -> float:
        extra = {} if cohort is None else {"cohort_size": cohort, "population": 1000}
        event = SkellamEvent(0.0, 20, 30.0, 200.0, 64, **extra).with_noise_multiplier(1.0)
        return RdpAccountant(neighbouring=ZERO).compose(event, 100).get_epsilon(DELTA)

    values = [eps(c) for c in (20, 50, 200, 1000)]
    assert all(a < b for a, b in itertools.pairwise(values))
    assert values[-1] == pytest.approx(eps(None))  # everyone sampled: no amplification
    event = SkellamEvent(4.0, 20, 30.0, 200.0, 64, cohort_size=20, population=1000)
    assert event.unamplified() == SkellamEvent(4.0, 20, 30.0, 200.0, 64)


# --- the accountant's interface ---------------------------------------------------------------


def test_relations_for_distributed_sums() -> None:
    event = SkellamEvent(100.0, 10, 20.0, 100.0, 32)
    assert default_neighbouring(event) is ZERO
    assert isinstance(default_accountant(event), RdpAccountant)
    # Replace-one is the zero-out bound with both sensitivities doubled.
    doubled = dataclasses.replace(event, l2_sensitivity=40.0, l1_sensitivity=200.0)
    assert curve(event, REPLACE) == pytest.approx(curve(doubled, ZERO))
    with pytest.raises(PrivacyAccountingError, match="ZERO_OUT"):
        RdpAccountant().compose(event)  # add-or-remove would change the number of shares
    with pytest.raises(PrivacyAccountingError, match="no exact PLD"):
        PldAccountant(neighbouring=ZERO).compose(event)
    assert RdpAccountant(neighbouring=ZERO).compose(dataclasses.replace(event, local_variance=0))
    silent = RdpAccountant(neighbouring=ZERO).compose(dataclasses.replace(event, local_variance=0))
    assert silent.get_epsilon(DELTA) == math.inf  # no noise, no privacy


@pytest.mark.parametrize("cls", [RdpAccountant, PldAccountant])
def test_central_events_under_zero_out_are_as_under_add_or_remove(cls) -> None:
    options = {"value_discretization_interval": 1e-2} if cls is PldAccountant else {}
    for event in (FullParticipationGaussian(1.2), PoissonSampledGaussian(1.0, 0.05), Laplace(2.0)):
        zero = cls(neighbouring=ZERO, **options).compose(event, 10).get_epsilon(DELTA)
        add = cls(neighbouring=ADD, **options).compose(event, 10).get_epsilon(DELTA)
        assert zero == pytest.approx(add)
    with pytest.raises(PrivacyAccountingError, match="replace-one"):
        cls(neighbouring=ZERO, **options).compose(FixedSizeSampledGaussian(1.0, 10, 100))


def test_events_validate_and_round_trip_through_the_ledger() -> None:
    event = DistributedDiscreteGaussianEvent(
        2.5, 8, 12.0, 40.0, 64, scale=30.0, cohort_size=10, population=500
    )
    assert event_from_json(event_json(event)) == event
    assert SkellamEvent(2.5, 8, 12.0, 40.0, 64) != DistributedDiscreteGaussianEvent(
        2.5, 8, 12.0, 40.0, 64
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.local_variance = 1.0  # type: ignore[misc]
    for bad, error in (
        ({"cohort_size": 10}, ParameterValueError),  # a cohort needs its population
        ({"cohort_size": 5, "population": 50}, ParameterValueError),  # 8 in a sum of 5
        ({"cohort_size": 10, "population": 9}, ParameterValueError),
        ({"local_variance": -1.0}, ParameterValueError),
        ({"clients_in_sum": 0}, ParameterValueError),
        ({"dimension": 2.0}, ParameterTypeError),
    ):
        with pytest.raises(error):
            dataclasses.replace(event, **({"cohort_size": None, "population": None} | bad))
    with pytest.raises(ParameterValueError):
        event.with_noise_multiplier(-1.0)


def test_from_pipeline_reads_the_sampling() -> None:
    common = {"clip": 1.0, "scale": 50.0, "dimension": 64, "local_variance": 9.0}
    fixed = SkellamEvent.from_pipeline(
        **common, clients_in_sum=30, sampling=FixedSizeSampling(40), population=400
    )
    assert (fixed.cohort_size, fixed.population, fixed.sample_rate) == (40, 400, 0.1)
    poisson = SkellamEvent.from_pipeline(
        **common, clients_in_sum=30, sampling=PoissonSampling(0.1), population=400, cohort_size=37
    )
    assert (poisson.cohort_size, poisson.population) == (37, 400)
    full = SkellamEvent.from_pipeline(**common, clients_in_sum=30, sampling=FullParticipation())
    assert full.cohort_size is None
    with pytest.raises(ParameterValueError, match="cohort_size"):
        SkellamEvent.from_pipeline(
            **common, clients_in_sum=3, sampling=PoissonSampling(0.1), population=400
        )
    with pytest.raises(ParameterValueError, match="population"):
        SkellamEvent.from_pipeline(**common, clients_in_sum=3, sampling=FixedSizeSampling(4))


# --- dropouts and calibration -----------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 500), st.integers(1, 500))
def test_the_dropout_policy_never_counts_more_than_survive(survivors: int, minimum: int):
    for policy in DropoutPolicy:
        assert 1 <= policy.counted(survivors, minimum) <= survivors
    assert DropoutPolicy.WORST_CASE.counted(survivors, minimum) == min(survivors, minimum)
    assert DropoutPolicy.SURVIVORS.counted(survivors, minimum) == survivors


@settings(max_examples=15, deadline=None)
@given(
    st.sampled_from([SkellamEvent, DistributedDiscreteGaussianEvent]),
    st.integers(2, 200),
    st.integers(1, 199),
    st.floats(0.3, 20.0),
    st.booleans(),
)
def test_fewer_survivors_never_lower_the_epsilon(kind, clients, dropped, share, cohort) -> None:
    dropped = min(dropped, clients - 1)
    extra = {"cohort_size": clients, "population": 10 * clients} if cohort else {}
    full = kind(share, clients, 15.0, 60.0, 16, **extra)
    fewer = dataclasses.replace(full, clients_in_sum=clients - dropped)
    accountant = RdpAccountant(neighbouring=ZERO)
    assert accountant.fresh().compose(fewer, 5).get_epsilon(DELTA) >= accountant.fresh().compose(
        full, 5
    ).get_epsilon(DELTA)


PIPELINE = {"clip": 0.5, "scale": 200.0, "dimension": 128, "beta": math.exp(-0.5)}


def spent(kind, share: float, clients: int, rounds: int, **sampling) -> float:
    event = kind.from_pipeline(**PIPELINE, local_variance=share, clients_in_sum=clients, **sampling)
    return default_accountant(event).compose(event, rounds).get_epsilon(DELTA)


@pytest.mark.parametrize("kind", [SkellamEvent, DistributedDiscreteGaussianEvent])
def test_worst_case_calibration_holds_for_every_survivor_count(kind) -> None:
    target, rounds, expected, minimum = 4.0, 30, 50, 35
    args = {"target_epsilon": target, "delta": DELTA, "rounds": rounds, "mechanism": kind}
    clients = {"expected_clients": expected, "min_clients": minimum}
    share = calibrate_distributed_noise(**args, **clients, **PIPELINE)
    for survivors in (minimum, 40, expected):
        assert spent(kind, share, survivors, rounds) <= target
    assert spent(kind, share, minimum, rounds) > target * 0.99  # and not much more noise
    assert spent(kind, share, minimum - 5, rounds) > target  # below SecAgg+'s threshold: more
    # Calibrating for the survivors expected gives each client less noise, and dropouts then
    # overspend the target.
    hopeful = calibrate_distributed_noise(
        **args, **clients, **PIPELINE, dropout=DropoutPolicy.SURVIVORS
    )
    assert hopeful < share
    assert spent(kind, hopeful, expected, rounds) <= target < spent(kind, hopeful, minimum, rounds)


def test_calibration_with_a_cohort_and_through_the_accountant_it_names() -> None:
    sampling = {"sampling": FixedSizeSampling(50), "population": 2000}
    args = {
        "target_epsilon": 3.0,
        "delta": DELTA,
        "rounds": 200,
        "expected_clients": 45,
        "min_clients": 40,
        **PIPELINE,
    }
    amplified = calibrate_distributed_noise(**args, **sampling)
    assert spent(SkellamEvent, amplified, 40, 200, **sampling) <= 3.0
    assert amplified < calibrate_distributed_noise(**args)  # no amplification: more noise
    poisson = calibrate_distributed_noise(**args, sampling=PoissonSampling(0.025), population=2000)
    assert poisson == pytest.approx(amplified, rel=1e-3)  # the same expected cohort of 50
    with pytest.raises(PrivacyAccountingError):
        calibrate_distributed_noise(**args, accountant=PldAccountant)
    with pytest.raises(ParameterValueError):
        calibrate_distributed_noise(**{**args, "min_clients": 46})
    with pytest.raises(ParameterTypeError):
        calibrate_distributed_noise(**args, mechanism=FullParticipationGaussian)  # type: ignore[arg-type]


# --- the same bounds written in model units, as the papers' experiments state them -----------


def test_the_bounds_in_model_units_match_the_integer_domain() -> None:
    # The papers' experiments keep the clip c and the noise's standard deviation in model units
    # and scale by s = 1 / gamma inside the bound. Writing the two bounds that way, from the
    # theorems, and comparing with the events built by from_pipeline checks the scale's handling.
    c, s, d, n, sigma = 0.3, 40.0, 64, 25, 0.05  # sigma: one client's std in model units
    l2 = rounded_l2_bound(c * s, dimension=d) / s  # model units
    l1 = rounded_l1_bound(l2 * s, dimension=d) / s
    alphas = np.array([2.0, 3.0, 5.0, 9.0, 33.0])
    central_var = n * sigma**2  # the sum's variance, model units

    skellam_model = alphas * l2**2 / (2 * central_var) + np.minimum(
        ((2 * alphas - 1) * s * l2**2 + 6 * l1) / (4 * s**3 * central_var**2),
        3 * l1 / (2 * s * central_var),
    )
    event = SkellamEvent.from_pipeline(
        clip=c, scale=s, dimension=d, local_variance=(sigma * s) ** 2, clients_in_sum=n
    )
    assert curve(event, orders=alphas) == pytest.approx(skellam_model, rel=1e-12)

    tau = 10 * sum(math.exp(-2 * (math.pi * sigma * s) ** 2 * k / (k + 1)) for k in range(1, n))
    l1_scale, l2_scale = l1 / math.sqrt(central_var), l2 / math.sqrt(central_var)
    dgauss_model = np.minimum.reduce(
        [
            alphas / 2 * l2_scale**2 + tau * d,
            alphas / 2 * l2_scale**2 + alphas * tau * d / 4,
            alphas / 2 * (l2_scale**2 + 2 * l1_scale * tau + tau**2 * d),
            alphas / 2 * (l2_scale + math.sqrt(d) * tau) ** 2,
        ]
    )
    event = DistributedDiscreteGaussianEvent.from_pipeline(
        clip=c, scale=s, dimension=d, local_variance=(sigma * s) ** 2, clients_in_sum=n
    )
    # At most the n-client bound (fewer shares can only give a smaller one), and here tau is
    # tiny (sigma * s = 2), so equal to it.
    ours = curve(event, orders=alphas)
    assert (ours <= dgauss_model * (1 + 1e-12)).all()
    assert ours == pytest.approx(dgauss_model, rel=1e-9)


def test_the_brute_force_catches_a_bound_that_is_too_small() -> None:
    # Negative controls: the brute-force divergences reject the bounds one mistake away.
    # Skellam with the variance and the Poissons' mean confused (alpha D^2 / (4 V)):
    pmf = skellam_pmf(40.0, half_width=200)
    assert both_ways(pmf, 1, 2.0) > 2 * 1**2 / (4 * 40.0)
    # The sum of two discrete Gaussians at sigma = 1/2 without KLS21's tau terms (as if it were
    # one discrete Gaussian of twice the variance):
    pmf = summed_discrete_gaussian_pmf(0.25, 2, half_width=40)
    assert both_ways(pmf, 1, 4.0) > 4 * 1**2 / (2 * 2 * 0.25)
