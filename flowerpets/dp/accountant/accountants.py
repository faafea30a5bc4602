"""Privacy accountants over dp-accounting, behind one small interface.

:class:`PldAccountant` (privacy loss distributions; Meiser and Mohammadi 2018,
Koskela et al. 2020, Doroshenko et al. 2022) is the default: its epsilon is the
tightest valid bound dp-accounting computes, with pessimistic discretization.
It also analyses fixed-size cohorts (sampling without replacement, replace-one)
through a dominating pair built from dp-accounting's parts (see
:mod:`flowerpets.dp.accountant._without_replacement`): 2-11% above an
attack's lower bound in the settings tested, where RDP's bound is 1.4-4.3 times it.
:class:`RdpAccountant` (Renyi DP; Mironov 2017, Mironov, Talwar and Zhang 2019)
is the fast path: about 8-12% looser at epsilon 3-8 and several times looser at
small epsilon; for fixed-size cohorts it uses Wang, Balle and Kasiviswanathan's
bound (AISTATS 2019).

Conventions. Our events give noise relative to the clip C. dp-accounting's two
accountants read ``GaussianDpEvent`` differently under ``REPLACE_ONE``: the PLD
accountant takes the noise relative to C and doubles the shift itself
(``mu(x + C)`` against ``mu(x - C)``), while the RDP accountant ignores the
relation for a plain Gaussian and takes the noise relative to the replace-one
sensitivity (2C), as does its sampled-without-replacement bound. The tables of
:mod:`._pld` and :mod:`._rdp` do that translation, and a test checks that both agree with the exact
Gaussian formula.

Every mathematical step for the central events is dp-accounting's; nothing
here computes a privacy loss itself (for fixed-size cohorts this package
chooses which of dp-accounting's divergences to discretize, by a cited
theorem). The distributed events (:class:`~.events.SkellamEvent`,
:class:`~.events.DistributedDiscreteGaussianEvent`) are the exception: their
RDP curves are the papers' bounds (:mod:`._discrete`) amplified by general
published bounds (:mod:`._amplification`), since dp-accounting has neither;
dp-accounting still converts the composed curve to epsilon.
:func:`calibrate_distributed_noise` finds the per-client noise for them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol

from flowerpets._validation import instance, integer, is_integer, real
from flowerpets.core.sampling import (
    CohortSampling,
    FixedSizeSampling,
    FullParticipation,
    PoissonSampling,
)
from flowerpets.dp.accountant._base import ADD, REPLACE, ZERO, Accountant, _check_delta, _dpa
from flowerpets.dp.accountant._pld import PldAccountant
from flowerpets.dp.accountant._rdp import RdpAccountant
from flowerpets.dp.accountant.events import (
    DistributedDiscreteGaussianEvent,
    DistributedEvent,
    DropoutPolicy,
    FixedSizeSampledGaussian,
    FullParticipationGaussian,
    Neighbouring,
    PoissonSampledGaussian,
    PrivacyEvent,
    SkellamEvent,
)
from flowerpets.exceptions import ParameterTypeError, ParameterValueError, PrivacyAccountingError

__all__ = [
    "ACCOUNTANTS",
    "Accountant",
    "AccountantFactory",
    "PldAccountant",
    "RdpAccountant",
    "calibrate_distributed_noise",
    "calibrate_noise_multiplier",
    "default_accountant",
    "default_neighbouring",
    "event_for_round",
]


class AccountantFactory(Protocol):
    """Makes a fresh accountant for a neighbouring relation (the accountant classes are ones)."""

    def __call__(self, *, neighbouring: Neighbouring = ...) -> Accountant: ...


ACCOUNTANTS: dict[str, AccountantFactory] = {
    PldAccountant.name: PldAccountant,
    RdpAccountant.name: RdpAccountant,
}
"""The accountants by name (``pld``, ``rdp``), as the CLI offers them."""


def default_neighbouring(event: PrivacyEvent) -> Neighbouring:
    """Replace-one for fixed-size cohorts (their population is public), zero-out for a
    distributed sum (each client's noise share is in it whatever its data), else add-or-remove.
    """
    if isinstance(event, DistributedEvent):
        return ZERO
    return REPLACE if isinstance(event, FixedSizeSampledGaussian) else ADD


def default_accountant(event: PrivacyEvent) -> Accountant:
    """The tightest accountant that analyses ``event``: PLD where it can, RDP where it must."""
    neighbouring = default_neighbouring(event)
    for factory in (PldAccountant, RdpAccountant):
        accountant = factory(neighbouring=neighbouring)
        if accountant.supports(event):
            return accountant
    raise PrivacyAccountingError(f"no accountant analyses {event!r}")


_EVENT_FOR_SAMPLING: dict[type, Callable[[Any, int, float], PrivacyEvent]] = {
    FullParticipation: lambda s, n, z: FullParticipationGaussian(z),
    PoissonSampling: lambda s, n, z: PoissonSampledGaussian(z, float(s.rate)),
    FixedSizeSampling: lambda s, n, z: FixedSizeSampledGaussian(z, min(s.size, n), n),
}


def event_for_round(
    sampling: CohortSampling, population: int, noise_multiplier: float
) -> PrivacyEvent:
    """The event of one round of a Gaussian sum over a cohort drawn by ``sampling``.

    The sampling decides the amplification: Poisson sampling at its rate,
    fixed-size sampling without replacement from ``population``, or none for
    full participation. An unknown sampling scheme is refused rather than
    guessed at.
    """
    make = _EVENT_FOR_SAMPLING.get(type(sampling))
    if make is None:
        raise PrivacyAccountingError(
            f"cannot tell how much {sampling!r} amplifies privacy: use FullParticipation, "
            "FixedSizeSampling or PoissonSampling"
        )
    if not is_integer(population) or population < 1:
        raise PrivacyAccountingError(f"a round needs a population >= 1, got {population!r}")
    return make(sampling, int(population), noise_multiplier)


def calibrate_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    make_event: Callable[[float], PrivacyEvent],
    count: int = 1,
    accountant: AccountantFactory | None = None,
    neighbouring: Neighbouring | None = None,
    tol: float = 1e-3,
) -> float:
    """The smallest noise multiplier (within ``tol``) whose ``count`` events stay within epsilon.

    ``make_event(z)`` builds one event for noise multiplier ``z``. The result
    ``z`` satisfies ``epsilon(count x make_event(z), delta) <= target_epsilon``
    under ``accountant`` (default: :func:`default_accountant`'s choice for the
    event), by dp-accounting's ``calibrate_dp_mechanism`` (Brent's method, then
    a check on the safe side) asking our accountant for each candidate's epsilon.
    """
    target_epsilon = real("target_epsilon", target_epsilon, above=0)
    delta = _check_delta(delta)
    count = integer("count", count, at_least=1)
    tol = real("tol", tol, above=0)
    probe = make_event(1.0)
    relation = neighbouring if neighbouring is not None else default_neighbouring(probe)
    template = (
        default_accountant(probe) if accountant is None else accountant(neighbouring=relation)
    )
    if template.neighbouring is not relation:
        template = type(template)(neighbouring=relation)
    template._convert(probe)  # refuse an unsupported event before searching
    dpa = _dpa()

    class _Fresh:
        """What calibrate_dp_mechanism asks of a fresh accountant, answered by ours."""

        ledger = dpa.NoOpDpEvent()

        def __init__(self) -> None:
            self._ours = template.fresh()

        def compose(self, event: PrivacyEvent) -> _Fresh:
            self._ours.compose(event, count)
            return self

        def get_epsilon(self, target_delta: float) -> float:
            return self._ours.get_epsilon(target_delta)

    def epsilon(z: float) -> float:
        return _Fresh().compose(make_event(z)).get_epsilon(delta)

    # RDP is fast and (almost always) looser, so its answer is a good upper end for PLD's.
    high = 1.0
    if not isinstance(template, RdpAccountant):
        rdp = RdpAccountant(neighbouring=relation)
        if rdp.supports(probe):
            high = calibrate_noise_multiplier(
                target_epsilon=target_epsilon,
                delta=delta,
                make_event=make_event,
                count=count,
                accountant=RdpAccountant,
                neighbouring=relation,
                tol=tol,
            )
    low = 0.9 * high
    while epsilon(high) > target_epsilon:
        low, high = high, high * 2
        if high > 2.0**30:
            raise PrivacyAccountingError(
                f"no noise multiplier up to 2^30 reaches epsilon {target_epsilon} at delta {delta}"
            )
    while epsilon(low) <= target_epsilon:
        if low < tol:
            return low  # even (almost) no noise meets the target
        low, high = low / 2, low
    result = dpa.calibrate_dp_mechanism(
        _Fresh,
        make_event,
        target_epsilon,
        delta,
        dpa.ExplicitBracketInterval(low, high),
        tol=tol,
    )
    return float(result)


def calibrate_distributed_noise(
    *,
    target_epsilon: float,
    delta: float,
    rounds: int,
    clip: float,
    scale: float,
    dimension: int,
    expected_clients: int,
    min_clients: int,
    beta: float = 0.0,
    mechanism: type[SkellamEvent] | type[DistributedDiscreteGaussianEvent] = SkellamEvent,
    dropout: DropoutPolicy = DropoutPolicy.WORST_CASE,
    sampling: CohortSampling | None = None,
    population: int | None = None,
    accountant: AccountantFactory | None = None,
    neighbouring: Neighbouring | None = None,
    tol: float = 1e-3,
) -> float:
    """Each client's noise (``local_variance``) for ``rounds`` rounds within ``target_epsilon``.

    ``mechanism`` is :class:`~.events.SkellamEvent` (the default; the result is
    the Skellam share's variance ``mu``) or
    :class:`~.events.DistributedDiscreteGaussianEvent` (the result is the
    discrete Gaussian's ``sigma^2``). ``clip``, ``scale``, ``dimension`` and
    ``beta`` are the pipeline's (see
    :meth:`~.events.DistributedEvent.from_pipeline`); ``expected_clients`` is
    how many clients are expected in each sum, ``min_clients`` the fewest
    survivors the secure sum still releases a sum for (SecAgg+'s threshold),
    less any client that may collude with the server.

    ``dropout`` decides how many shares the calibration counts on:
    ``WORST_CASE`` (the default) ``min_clients``, so the target holds however
    many drop out; ``SURVIVORS`` ``expected_clients``, so fewer survivors
    overspend the target (see :class:`~.events.DropoutPolicy`). ``sampling``
    and ``population`` give the amplification: fixed-size sampling at its
    size, Poisson sampling at its expected cohort (rounded up), none by
    default. Amplification holds only against whoever does not see who took
    part, which excludes the server: give no sampling for the epsilon against it.

    The search is :func:`calibrate_noise_multiplier`'s, over the summed noise's
    standard deviation in units of the rounded L2 sensitivity, through
    ``accountant`` (default: :func:`default_accountant`'s choice, RDP).
    """
    rounds = integer("rounds", rounds, at_least=1)
    expected_clients = integer("expected_clients", expected_clients, at_least=1)
    min_clients = integer("min_clients", min_clients, at_least=1, at_most=expected_clients)
    dropout = instance("dropout", dropout, DropoutPolicy)
    if not (isinstance(mechanism, type) and issubclass(mechanism, DistributedEvent)):
        raise ParameterTypeError(
            f"mechanism must be SkellamEvent or DistributedDiscreteGaussianEvent, got {mechanism!r}"
        )
    counted = dropout.counted(expected_clients, min_clients)
    cohort_size = None
    if isinstance(sampling, PoissonSampling) and population is not None:
        cohort_size = max(expected_clients, math.ceil(sampling.expected_size(population)))
    probe = mechanism.from_pipeline(
        clip=clip,
        scale=scale,
        dimension=dimension,
        local_variance=0.0,
        clients_in_sum=counted,
        beta=beta,
        sampling=sampling,
        population=population,
        cohort_size=cohort_size,
    )
    if probe.cohort_size is not None and expected_clients > probe.cohort_size:
        raise ParameterValueError(
            f"{expected_clients} clients expected in a sum from a cohort of {probe.cohort_size}"
        )

    def event(z: float) -> PrivacyEvent:
        made: PrivacyEvent = probe.with_noise_multiplier(z)
        return made

    z = calibrate_noise_multiplier(
        target_epsilon=target_epsilon,
        delta=delta,
        make_event=event,
        count=rounds,
        accountant=accountant,
        neighbouring=neighbouring,
        tol=tol,
    )
    return probe.with_noise_multiplier(z).local_variance
