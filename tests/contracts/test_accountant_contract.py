"""The accountant contract: every accountant in flowerpets.dp.accountant passes the same suite.

For each accountant class, each neighbouring relation and each kind of event
the pair supports: ``compose`` composes in place and returns the accountant
(as documented), refuses an event it cannot analyse without changing anything,
epsilon grows with the rounds and shrinks with the noise, ``get_delta`` and
``get_epsilon`` answer for the same curve, calibration through the accountant
inverts ``get_epsilon``, copies are independent, and the events are frozen.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import pytest

from flowerpets.dp import accountant as acc
from flowerpets.dp.accountant import (
    Accountant,
    DistributedDiscreteGaussianEvent,
    FixedSizeSampledGaussian,
    FullParticipationGaussian,
    Laplace,
    Neighbouring,
    PoissonSampledGaussian,
    PrivacyEvent,
    SkellamEvent,
    calibrate_noise_multiplier,
)
from flowerpets.exceptions import ParameterTypeError, ParameterValueError, PrivacyAccountingError

DELTA = 1e-5
EventMaker = Callable[[float], PrivacyEvent]

# A distributed sum of 10 clients' shares, rounded updates of L2 norm <= 20 in dimension 64, alone
# and from a random cohort of 12 of 200.
SUM = {"clients_in_sum": 10, "l2_sensitivity": 20.0, "l1_sensitivity": 160.0, "dimension": 64}
COHORT = {"cohort_size": 12, "population": 200}

# One event of each kind, as a function of its noise multiplier.
EVENTS: dict[str, EventMaker] = {
    "full": FullParticipationGaussian,
    "poisson": lambda z: PoissonSampledGaussian(z, 0.05),
    "fixed-size": lambda z: FixedSizeSampledGaussian(z, 10, 200),
    "laplace": Laplace,
    "skellam": lambda z: SkellamEvent(0.0, **SUM).with_noise_multiplier(z),
    "skellam-cohort": lambda z: SkellamEvent(0.0, **SUM, **COHORT).with_noise_multiplier(z),
    "dgauss": lambda z: DistributedDiscreteGaussianEvent(0.0, **SUM).with_noise_multiplier(z),
    "dgauss-cohort": lambda z: DistributedDiscreteGaussianEvent(
        0.0, **SUM, **COHORT
    ).with_noise_multiplier(z),
}

# Every accountant the package offers, found through its public registry (a new one joins the
# suite by being registered).
CLASSES: list[type[Accountant]] = sorted(
    {
        value
        for value in vars(acc).values()
        if isinstance(value, type) and issubclass(value, Accountant) and value is not Accountant
    }
    | set(acc.ACCOUNTANTS.values()),
    key=lambda cls: cls.__name__,
)

# Coarser than the defaults, to keep the suite fast; the contract holds at any setting.
FAST: dict[str, dict[str, Any]] = {"PldAccountant": {"value_discretization_interval": 1e-2}}


def make(cls: type[Accountant], relation: Neighbouring) -> Accountant:
    return cls(neighbouring=relation, **FAST.get(cls.__name__, {}))


CASES = [
    pytest.param(cls, relation, kind, id=f"{cls.__name__}-{relation.name}-{kind}")
    for cls in CLASSES
    for relation in Neighbouring
    for kind in EVENTS
    if cls(neighbouring=relation).supports(EVENTS[kind](1.0))
]
REFUSED = [
    pytest.param(cls, relation, kind, id=f"{cls.__name__}-{relation.name}-{kind}")
    for cls in CLASSES
    for relation in Neighbouring
    for kind in EVENTS
    if not cls(neighbouring=relation).supports(EVENTS[kind](1.0))
]


def epsilon(cls: type[Accountant], relation: Neighbouring, event: PrivacyEvent, n: int) -> float:
    return make(cls, relation).compose(event, n).get_epsilon(DELTA)


def test_the_suite_covers_every_accountant_and_event() -> None:
    assert {cls.__name__ for cls in CLASSES} >= {"PldAccountant", "RdpAccountant"}
    assert len(CASES) >= 8 and REFUSED  # each class analyses most pairs and refuses some


@pytest.mark.parametrize(("cls", "relation", "kind"), CASES)
def test_compose_composes_in_place_and_returns_the_accountant(
    cls: type[Accountant], relation: Neighbouring, kind: str
) -> None:
    accountant = make(cls, relation)
    event = EVENTS[kind](1.0)
    assert accountant.get_epsilon(DELTA) == 0.0 and accountant.ledger == {}
    assert accountant.compose(event, 3) is accountant
    after_three = accountant.get_epsilon(DELTA)
    assert after_three == pytest.approx(epsilon(cls, relation, event, 3))
    assert accountant.compose(event) is accountant
    assert accountant.ledger == {event: 4}
    assert accountant.compose(event, 0) is accountant and accountant.ledger == {event: 4}
    # What was asked before does not stick: the same total however it was composed.
    after_four = accountant.get_epsilon(DELTA)
    assert after_four > after_three
    assert after_four == pytest.approx(epsilon(cls, relation, event, 4))
    assert accountant.get_delta(after_three) > DELTA
    assert accountant.neighbouring is relation
    assert cls.__name__ in repr(accountant) and "rounds=4" in repr(accountant)


@pytest.mark.parametrize(("cls", "relation", "kind"), CASES)
def test_epsilon_grows_with_rounds_and_shrinks_with_noise(
    cls: type[Accountant], relation: Neighbouring, kind: str
) -> None:
    event_of = EVENTS[kind]
    by_rounds = [epsilon(cls, relation, event_of(1.0), n) for n in (1, 3, 9)]
    assert 0 < by_rounds[0] < by_rounds[1] < by_rounds[2] < math.inf
    by_noise = [epsilon(cls, relation, event_of(z), 3) for z in (0.7, 1.0, 2.0)]
    assert by_noise[0] > by_noise[1] > by_noise[2] > 0
    assert epsilon(cls, relation, event_of(0.0), 1) == math.inf  # no noise, no privacy
    assert make(cls, relation).compose(event_of(0.0)).get_delta(1.0) == 1.0


@pytest.mark.parametrize(("cls", "relation", "kind"), CASES)
def test_get_delta_and_get_epsilon_describe_one_curve(
    cls: type[Accountant], relation: Neighbouring, kind: str
) -> None:
    accountant = make(cls, relation).compose(EVENTS[kind](1.0), 4)
    eps = accountant.get_epsilon(DELTA)
    # Both are valid bounds on the same privacy profile: at the epsilon reported for DELTA the
    # delta is at most DELTA (up to the libraries' conversions), and a little more epsilon
    # (1% here) needs less delta.
    assert accountant.get_delta(eps) <= DELTA * 1.01
    assert accountant.get_delta(eps * 1.01) < accountant.get_delta(eps * 0.99)


@pytest.mark.parametrize(("cls", "relation", "kind"), REFUSED)
def test_an_unsupported_event_is_refused_and_changes_nothing(
    cls: type[Accountant], relation: Neighbouring, kind: str
) -> None:
    accountant = make(cls, relation)
    supported = next(EVENTS[k](1.0) for k in EVENTS if accountant.supports(EVENTS[k](1.0)))
    accountant.compose(supported, 2)
    before = accountant.get_epsilon(DELTA)
    with pytest.raises(PrivacyAccountingError):
        accountant.compose(EVENTS[kind](1.0), 5)
    assert accountant.ledger == {supported: 2}
    assert accountant.get_epsilon(DELTA) == before


@pytest.mark.parametrize("cls", CLASSES)
def test_bad_arguments_are_typed_errors(cls: type[Accountant]) -> None:
    with pytest.raises(ParameterTypeError):
        cls(neighbouring="add-or-remove")  # type: ignore[arg-type]
    accountant = cls()
    # A wrong type is a TypeError, a wrong value a ValueError; both ours (FlowerpetsError).
    for count, error in (
        (-1, ParameterValueError),
        (1.5, ParameterTypeError),
        (True, ParameterTypeError),
    ):
        with pytest.raises(error):
            accountant.compose(FullParticipationGaussian(1.0), count)  # type: ignore[arg-type]
    for delta, error in (
        (0, ParameterValueError),
        (1, ParameterValueError),
        (-0.1, ParameterValueError),
        (True, ParameterTypeError),
    ):
        with pytest.raises(error):
            accountant.get_epsilon(delta)
    assert accountant.ledger == {}  # nothing refused was composed


@pytest.mark.parametrize("cls", CLASSES)
def test_copies_are_independent_and_fresh_is_empty(cls: type[Accountant]) -> None:
    accountant = make(cls, Neighbouring.ADD_OR_REMOVE).compose(FullParticipationGaussian(1.0), 2)
    before = accountant.get_epsilon(DELTA)
    clone = accountant.copy()
    assert type(clone) is cls and clone.ledger == accountant.ledger
    clone.compose(FullParticipationGaussian(1.0), 10)
    assert accountant.ledger == {FullParticipationGaussian(1.0): 2}
    assert accountant.get_epsilon(DELTA) == before < clone.get_epsilon(DELTA)
    fresh = accountant.fresh()
    assert type(fresh) is cls and fresh.ledger == {} and fresh.get_epsilon(DELTA) == 0.0
    assert fresh.neighbouring is accountant.neighbouring
    # The ledger is a copy: editing it cannot change what was spent.
    accountant.ledger.clear()
    assert accountant.get_epsilon(DELTA) == before


CALIBRATED = [
    pytest.param(cls, relation, kind, id=f"{cls.__name__}-{relation.name}-{kind}")
    for cls in CLASSES
    for relation in Neighbouring
    # The sampled-without-replacement PLD is slow to search.
    for kind in ("full", "poisson", "skellam", "dgauss", "skellam-cohort")
    if cls(neighbouring=relation).supports(EVENTS[kind](1.0))
]


@pytest.mark.parametrize(("cls", "relation", "kind"), CALIBRATED)
def test_calibration_through_the_accountant_inverts_get_epsilon(
    cls: type[Accountant], relation: Neighbouring, kind: str
) -> None:
    target, rounds, tol = 2.0, 5, 1e-2
    z = calibrate_noise_multiplier(
        target_epsilon=target,
        delta=DELTA,
        make_event=EVENTS[kind],
        count=rounds,
        accountant=functools.partial(cls, **FAST.get(cls.__name__, {})),
        neighbouring=relation,
        tol=tol,
    )
    # On the safe side of the target, and the smallest such noise within the tolerance.
    assert epsilon(cls, relation, EVENTS[kind](z), rounds) <= target
    assert epsilon(cls, relation, EVENTS[kind](z - 2 * tol), rounds) > target


@pytest.mark.parametrize("kind", EVENTS)
def test_events_are_frozen_and_hashable(kind: str) -> None:
    event = EVENTS[kind](1.0)
    assert dataclasses.is_dataclass(event)
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.noise_multiplier = 0.0  # type: ignore[misc]
    assert hash(event) == hash(EVENTS[kind](1.0)) and event == EVENTS[kind](1.0)
    assert event != EVENTS[kind](2.0)
    with pytest.raises((TypeError, ValueError)):
        EVENTS[kind](-1.0)
