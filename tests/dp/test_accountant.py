"""Accountants against exact formulas, published values, and Opacus's own accountants."""

from __future__ import annotations

import math

import pytest

from flowerpets.core import FixedSizeSampling, FullParticipation, PoissonSampling
from flowerpets.dp.accountant import (
    ACCOUNTANTS,
    FixedSizeSampledGaussian,
    FullParticipationGaussian,
    Laplace,
    Neighbouring,
    PldAccountant,
    PoissonSampledGaussian,
    RdpAccountant,
    calibrate_noise_multiplier,
    default_accountant,
    event_for_round,
)
from flowerpets.exceptions import PrivacyAccountingError

ADD, REPLACE = Neighbouring.ADD_OR_REMOVE, Neighbouring.REPLACE_ONE
DELTA = 1e-5


def phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def exact_gaussian_epsilon(z: float, delta: float) -> float:
    """Balle and Wang's Theorem 8 for sensitivity 1, solved for epsilon by bisection."""

    def delta_of(eps: float) -> float:
        return phi(1 / (2 * z) - eps * z) - math.exp(eps) * phi(-1 / (2 * z) - eps * z)

    lo, hi = 0.0, 1.0
    while delta_of(hi) > delta:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if delta_of(mid) > delta else (lo, mid)
    return hi


# -- exact answers -------------------------------------------------------------------------------
@pytest.mark.parametrize(("z", "rounds"), [(2.0, 50), (1.0, 1), (5.0, 200)])
def test_full_participation_composes_to_one_gaussian(z: float, rounds: int) -> None:
    expected = exact_gaussian_epsilon(z / math.sqrt(rounds), DELTA)
    pld = PldAccountant().compose(FullParticipationGaussian(z), rounds)
    assert pld.get_epsilon(DELTA) == pytest.approx(expected, rel=1e-6)
    # One round at a time gives the same.
    stepwise = PldAccountant()
    for _ in range(rounds):
        stepwise.compose(FullParticipationGaussian(z))
    assert stepwise.get_epsilon(DELTA) == pytest.approx(expected, rel=1e-6)
    # RDP is a valid but looser bound.
    rdp = RdpAccountant().compose(FullParticipationGaussian(z), rounds).get_epsilon(DELTA)
    assert expected <= rdp <= 1.15 * expected


def test_the_discretized_pld_path_agrees_with_the_exact_formula() -> None:
    # A sample rate of 1 takes dp-accounting's discretized PLD, not the exact shortcut.
    pld = PldAccountant().compose(PoissonSampledGaussian(2.0, 1.0), 50).get_epsilon(DELTA)
    assert pld == pytest.approx(exact_gaussian_epsilon(2.0 / math.sqrt(50), DELTA), rel=1e-4)


def test_replace_one_doubles_the_sensitivity_in_both_accountants() -> None:
    # Swapping one contribution of norm C for another moves the sum by up to 2C.
    exact = exact_gaussian_epsilon(1.5 / 2, DELTA)
    pld = PldAccountant(neighbouring=REPLACE).compose(FullParticipationGaussian(1.5))
    assert pld.get_epsilon(DELTA) == pytest.approx(exact, rel=1e-6)
    lib_pld = PldAccountant(neighbouring=REPLACE).compose(PoissonSampledGaussian(1.5, 1.0))
    assert lib_pld.get_epsilon(DELTA) == pytest.approx(exact, rel=1e-4)
    rdp = RdpAccountant(neighbouring=REPLACE).compose(FullParticipationGaussian(1.5))
    halved = RdpAccountant().compose(FullParticipationGaussian(0.75))
    assert rdp.get_epsilon(DELTA) == halved.get_epsilon(DELTA)
    assert exact <= rdp.get_epsilon(DELTA) <= 1.15 * exact


def test_fixed_size_cohort_of_everyone_is_full_participation() -> None:
    whole = RdpAccountant(neighbouring=REPLACE).compose(FixedSizeSampledGaussian(1.2, 40, 40), 3)
    full = RdpAccountant(neighbouring=REPLACE).compose(FullParticipationGaussian(1.2), 3)
    assert whole.get_epsilon(DELTA) == pytest.approx(full.get_epsilon(DELTA), rel=1e-9)
    smaller = RdpAccountant(neighbouring=REPLACE).compose(FixedSizeSampledGaussian(1.2, 10, 40), 3)
    assert smaller.get_epsilon(DELTA) < whole.get_epsilon(DELTA)  # sampling amplifies


def test_laplace_reaches_its_pure_epsilon() -> None:
    # Laplace with scale b over L1 sensitivity 1 is (1/b, 0)-DP.
    eps = PldAccountant().compose(Laplace(2.0)).get_epsilon(1e-12)
    assert 0.49 <= eps <= 0.5 + 1e-3
    assert RdpAccountant().compose(Laplace(2.0)).get_epsilon(1e-6) >= eps


# -- published values and Opacus ----------------------------------------------------------------
def test_abadi_et_al_moments_accountant_example() -> None:
    # Abadi et al. (CCS 2016): q = 0.01, sigma = 4, T = 10000, delta = 1e-5 gives epsilon
    # 1.26 with the moments accountant; today's RDP conversion and PLD are tighter.
    event = PoissonSampledGaussian(4.0, 0.01)
    rdp = RdpAccountant().compose(event, 10_000).get_epsilon(DELTA)
    pld = PldAccountant().compose(event, 10_000).get_epsilon(DELTA)
    assert pld < rdp < 1.26
    assert rdp == pytest.approx(1.0355, abs=1e-3)
    assert pld == pytest.approx(0.947, abs=1e-3)


def test_dp_sgd_example_against_opacus_accountants() -> None:
    opacus = pytest.importorskip("opacus.accountants")
    q, z, steps = 0.01, 1.1, 10_000
    event = PoissonSampledGaussian(z, q)
    rdp = RdpAccountant().compose(event, steps).get_epsilon(DELTA)
    pld = PldAccountant().compose(event, steps).get_epsilon(DELTA)
    theirs_rdp = opacus.RDPAccountant()
    theirs_rdp.history = [(z, q, steps)]
    theirs_prv = opacus.PRVAccountant()
    theirs_prv.history = [(z, q, steps)]
    # Same RDP mathematics, slightly different grids of orders.
    assert rdp == pytest.approx(theirs_rdp.get_epsilon(DELTA), rel=1e-4)
    # PLD and PRV are both numerical tight accountants: they agree closely.
    assert pld == pytest.approx(theirs_prv.get_epsilon(DELTA), rel=0.01)
    assert pld == pytest.approx(5.19, abs=0.01) and rdp == pytest.approx(5.63, abs=0.01)
    assert 1.05 <= rdp / pld <= 1.12  # RDP 8% looser here, as Opacus's RDP and PRV also say


@pytest.mark.parametrize(
    "event",
    [
        PoissonSampledGaussian(1.0, 0.05),
        PoissonSampledGaussian(0.8, 0.2),
        FullParticipationGaussian(3),
    ],
)
def test_rdp_is_never_tighter_than_pld(event: PoissonSampledGaussian) -> None:
    pld = PldAccountant().compose(event, 100).get_epsilon(DELTA)
    rdp = RdpAccountant().compose(event, 100).get_epsilon(DELTA)
    assert pld <= rdp


def test_amplification_by_sampling_is_real() -> None:
    full = PldAccountant().compose(FullParticipationGaussian(1.0), 100).get_epsilon(DELTA)
    sampled = PldAccountant().compose(PoissonSampledGaussian(1.0, 0.01), 100).get_epsilon(DELTA)
    # Amplification by sampling (Abadi et al., CCS 2016; Balle, Barthe and Gaboardi, NeurIPS
    # 2018): 100 rounds at q = 0.01 cost orders of magnitude less than without sampling.
    assert sampled < full / 20


# -- the interface --------------------------------------------------------------------------------
def test_cached_pld_construction_equals_dp_accounting() -> None:
    import dp_accounting as dpa

    for neighbouring, relation in ((ADD, "ADD_OR_REMOVE_ONE"), (REPLACE, "REPLACE_ONE")):
        ours = PldAccountant(neighbouring=neighbouring)
        theirs = dpa.pld.PLDAccountant(getattr(dpa.NeighboringRelation, relation))
        ours.compose(PoissonSampledGaussian(1.0, 0.3), 7).compose(FullParticipationGaussian(3.0), 2)
        theirs.compose(dpa.PoissonSampledDpEvent(0.3, dpa.GaussianDpEvent(1.0)), 7)
        theirs.compose(dpa.GaussianDpEvent(3.0), 2)
        assert ours.get_epsilon(DELTA) == pytest.approx(theirs.get_epsilon(DELTA), rel=1e-9)
        assert ours.get_delta(2.0) == pytest.approx(theirs.get_delta(2.0), rel=1e-9)


def test_cached_rdp_composition_equals_dp_accounting() -> None:
    import dp_accounting as dpa

    ours = RdpAccountant().compose(PoissonSampledGaussian(1.0, 0.3), 7)
    ours.compose(FullParticipationGaussian(3.0), 2).compose(Laplace(4.0), 3)
    theirs = dpa.rdp.RdpAccountant()
    theirs.compose(dpa.PoissonSampledDpEvent(0.3, dpa.GaussianDpEvent(1.0)), 7)
    theirs.compose(dpa.GaussianDpEvent(3.0), 2).compose(dpa.LaplaceDpEvent(4.0), 3)
    assert ours.get_epsilon(DELTA) == pytest.approx(theirs.get_epsilon(DELTA), rel=1e-12)
    assert ours.get_delta(3.0) == pytest.approx(theirs.get_delta(3.0), rel=1e-12)
    fixed = RdpAccountant(neighbouring=REPLACE).compose(FixedSizeSampledGaussian(1.2, 10, 50), 4)
    lib = dpa.rdp.RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
    lib.compose(dpa.SampledWithoutReplacementDpEvent(50, 10, dpa.GaussianDpEvent(0.6)), 4)
    assert fixed.get_epsilon(DELTA) == pytest.approx(lib.get_epsilon(DELTA), rel=1e-12)


def test_unsupported_events_are_refused_with_a_reason_and_change_nothing() -> None:
    fixed = FixedSizeSampledGaussian(1.0, 10, 100)
    pld = PldAccountant().compose(FullParticipationGaussian(2.0))
    before = pld.get_epsilon(DELTA)
    with pytest.raises(PrivacyAccountingError, match="replace-one"):
        pld.compose(fixed)
    assert pld.get_epsilon(DELTA) == before and not pld.supports(fixed)
    assert PldAccountant(neighbouring=REPLACE).supports(fixed)
    with pytest.raises(PrivacyAccountingError, match="replace-one"):
        RdpAccountant().compose(fixed)
    with pytest.raises(PrivacyAccountingError, match="add-or-remove"):
        RdpAccountant(neighbouring=REPLACE).compose(PoissonSampledGaussian(1.0, 0.1))
    with pytest.raises(PrivacyAccountingError, match="Laplace"):
        PldAccountant(neighbouring=REPLACE).compose(Laplace(1.0))


def test_empty_noiseless_and_counted_compositions() -> None:
    for make in ACCOUNTANTS.values():
        accountant = make(neighbouring=ADD)
        assert accountant.get_epsilon(DELTA) == 0.0 and accountant.get_delta(1.0) == 0.0
        accountant.compose(FullParticipationGaussian(2.0), 0)
        assert accountant.get_epsilon(DELTA) == 0.0
        copy = accountant.copy().compose(FullParticipationGaussian(0.0))
        assert copy.get_epsilon(DELTA) == math.inf and copy.get_delta(5.0) == 1.0
        assert accountant.get_epsilon(DELTA) == 0.0  # the copy is independent
        with pytest.raises(ValueError, match="count"):
            accountant.compose(FullParticipationGaussian(2.0), -1)
        with pytest.raises(ValueError, match="delta"):
            accountant.get_epsilon(0.0)


def test_ledger_groups_identical_events() -> None:
    accountant = RdpAccountant()
    event = PoissonSampledGaussian(1.0, 0.1)
    for _ in range(5):
        accountant.compose(event)
    assert accountant.ledger == {event: 5}
    batch = RdpAccountant().compose(event, 5)
    assert accountant.get_epsilon(DELTA) == batch.get_epsilon(DELTA)
    assert accountant.fresh().ledger == {}


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: PoissonSampledGaussian(1.0, 0.0), "sample_rate"),
        (lambda: PoissonSampledGaussian(1.0, 1.5), "sample_rate"),
        (lambda: PoissonSampledGaussian(-1.0, 0.5), "noise_multiplier"),
        (lambda: FullParticipationGaussian(math.inf), "noise_multiplier"),
        (lambda: FixedSizeSampledGaussian(1.0, 11, 10), "exceeds"),
        (lambda: FixedSizeSampledGaussian(1.0, 0, 10), "sample_size"),
    ],
)
def test_events_validate_their_fields(make: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()  # type: ignore[operator]


# -- events of rounds, default accountants, calibration -------------------------------------------
def test_the_sampling_that_happened_decides_the_event() -> None:
    assert event_for_round(FullParticipation(), 30, 1.0) == FullParticipationGaussian(1.0)
    assert event_for_round(PoissonSampling(0.1), 30, 1.0) == PoissonSampledGaussian(1.0, 0.1)
    assert event_for_round(FixedSizeSampling(5), 30, 1.0) == FixedSizeSampledGaussian(1.0, 5, 30)
    assert event_for_round(FixedSizeSampling(50), 30, 1.0) == FixedSizeSampledGaussian(1.0, 30, 30)

    class Mystery:
        def sample(self, node_ids: object, rng: object) -> tuple[int, ...]:
            return ()

        def expected_size(self, population: int) -> float:
            return 1.0

    with pytest.raises(PrivacyAccountingError, match="cannot tell how much"):
        event_for_round(Mystery(), 30, 1.0)  # type: ignore[arg-type]
    with pytest.raises(PrivacyAccountingError, match="population"):
        event_for_round(FullParticipation(), 0, 1.0)


def test_default_accountant_is_pld_under_the_relation_the_sampling_needs() -> None:
    poisson = default_accountant(PoissonSampledGaussian(1.0, 0.1))
    assert isinstance(poisson, PldAccountant) and poisson.neighbouring is ADD
    fixed = default_accountant(FixedSizeSampledGaussian(1.0, 5, 30))
    assert isinstance(fixed, PldAccountant) and fixed.neighbouring is REPLACE


def test_calibrated_noise_is_the_smallest_within_the_target() -> None:
    def event(z: float) -> PoissonSampledGaussian:
        return PoissonSampledGaussian(z, 0.02)

    z = calibrate_noise_multiplier(
        target_epsilon=2.0, delta=DELTA, make_event=event, count=500, accountant=RdpAccountant
    )
    assert RdpAccountant().compose(event(z), 500).get_epsilon(DELTA) <= 2.0
    assert RdpAccountant().compose(event(z - 0.01), 500).get_epsilon(DELTA) > 2.0


def test_calibration_through_pld_and_for_fixed_cohorts() -> None:
    z = calibrate_noise_multiplier(
        target_epsilon=5.0, delta=DELTA, make_event=FullParticipationGaussian, count=20
    )
    assert z == pytest.approx(
        math.sqrt(20)
        * calibrate_noise_multiplier(
            target_epsilon=5.0, delta=DELTA, make_event=FullParticipationGaussian
        ),
        rel=2e-3,
    )
    assert exact_gaussian_epsilon(z / math.sqrt(20), DELTA) <= 5.0
    # RDP stays available for fixed cohorts (the PLD calibration: test_accountant_fixed_size.py).
    fixed = calibrate_noise_multiplier(
        target_epsilon=8.0,
        delta=DELTA,
        make_event=lambda z: FixedSizeSampledGaussian(z, 10, 100),
        count=10,
        accountant=RdpAccountant,
    )
    spent = RdpAccountant(neighbouring=REPLACE).compose(
        FixedSizeSampledGaussian(fixed, 10, 100), 10
    )
    assert spent.get_epsilon(DELTA) <= 8.0
    with pytest.raises(PrivacyAccountingError, match="replace-one"):
        calibrate_noise_multiplier(
            target_epsilon=8.0,
            delta=DELTA,
            make_event=lambda z: FixedSizeSampledGaussian(z, 10, 100),
            accountant=PldAccountant,
            neighbouring=ADD,
        )
