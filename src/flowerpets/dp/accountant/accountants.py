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
sensitivity (2C), as does its sampled-without-replacement bound. The tables
below do that translation, and a test checks that both agree with the exact
Gaussian formula.

Every mathematical step is dp-accounting's; nothing here computes a privacy
loss itself (for fixed-size cohorts this package chooses which of
dp-accounting's divergences to discretize, by a cited theorem).
"""

from __future__ import annotations

import copy
import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from functools import cache, lru_cache
from types import ModuleType
from typing import Any, ClassVar, Protocol, Self

from flowerpets.core.sampling import (
    CohortSampling,
    FixedSizeSampling,
    FullParticipation,
    PoissonSampling,
)
from flowerpets.dp.accountant._without_replacement import sampled_without_replacement_gaussian_pld
from flowerpets.dp.accountant.events import (
    FixedSizeSampledGaussian,
    FullParticipationGaussian,
    Laplace,
    Neighbouring,
    PoissonSampledGaussian,
    PrivacyEvent,
)
from flowerpets.exceptions import PrivacyAccountingError

__all__ = [
    "ACCOUNTANTS",
    "Accountant",
    "AccountantFactory",
    "PldAccountant",
    "RdpAccountant",
    "calibrate_noise_multiplier",
    "default_accountant",
    "default_neighbouring",
    "event_for_round",
]

ADD = Neighbouring.ADD_OR_REMOVE
REPLACE = Neighbouring.REPLACE_ONE

_Converter = Callable[[ModuleType, Any], Any]


class _QuietRdpOrders(logging.Filter):
    """Drops dp-accounting's notice that an RDP order failed to converge and was skipped.

    Skipping an order only drops one candidate of the minimum over orders: the
    epsilon stays a valid bound. The notice is logged for every such order of
    every query, which drowns a run's output.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "failed to converge" not in record.getMessage()


@cache
def _dpa() -> Any:
    """dp-accounting, imported on first use (it loads scipy, about a second)."""
    import dp_accounting

    logging.getLogger("absl").addFilter(_QuietRdpOrders())
    return dp_accounting


def _relation(neighbouring: Neighbouring) -> Any:
    names = {ADD: "ADD_OR_REMOVE_ONE", REPLACE: "REPLACE_ONE"}
    return getattr(_dpa().NeighboringRelation, names[neighbouring])


def _check_delta(delta: float) -> float:
    if isinstance(delta, bool) or not (isinstance(delta, int | float) and 0 < delta < 1):
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    return float(delta)


class Accountant(ABC):
    """Composes privacy events and answers "what epsilon at this delta?".

    ``compose(event, count)`` adds ``count`` repetitions of ``event``;
    ``get_epsilon(delta)`` is the epsilon of everything composed so far (0 for
    nothing, infinity once a noiseless event was composed). An event the
    accountant cannot analyse under its neighbouring relation raises
    :class:`~flowerpets.exceptions.PrivacyAccountingError` and changes nothing.

    Composition is commutative, so the accountant keeps a count per distinct
    event and hands each to dp-accounting once, with its total count, when an
    epsilon is asked for: dp-accounting then self-composes it in one step (by
    FFT for a PLD, by multiplication for RDP), which is what keeps one query
    per round cheap after hundreds of rounds.
    """

    name: ClassVar[str]
    _CONVERT: ClassVar[Mapping[tuple[type, Neighbouring], _Converter]]
    _WHY_NOT: ClassVar[Mapping[type, str]]

    def __init__(self, *, neighbouring: Neighbouring = ADD) -> None:
        if not isinstance(neighbouring, Neighbouring):
            raise TypeError(f"neighbouring must be a Neighbouring, got {neighbouring!r}")
        self._neighbouring = neighbouring
        self._counts: dict[PrivacyEvent, int] = {}
        self._library: Any = None  # built from _counts on demand

    @property
    def neighbouring(self) -> Neighbouring:
        return self._neighbouring

    @property
    def ledger(self) -> dict[PrivacyEvent, int]:
        """Every distinct event composed so far, with its total count."""
        return dict(self._counts)

    def supports(self, event: PrivacyEvent) -> bool:
        return (type(event), self._neighbouring) in self._CONVERT

    def _convert(self, event: PrivacyEvent) -> Any:
        converter = self._CONVERT.get((type(event), self._neighbouring))
        if converter is None:
            hint = self._WHY_NOT.get(type(event), "")
            raise PrivacyAccountingError(
                f"{type(self).__name__} under {self._neighbouring.value} neighbouring cannot "
                f"account for {event!r}" + (f": {hint}" if hint else "")
            )
        return converter(_dpa(), event)

    def compose(self, event: PrivacyEvent, count: int = 1) -> Self:
        """Add ``count`` repetitions of ``event``; returns this accountant."""
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"count must be an integer >= 0, got {count!r}")
        self._convert(event)  # refuse an unsupported event before changing anything
        if count:
            self._counts[event] = self._counts.get(event, 0) + count
            self._library = None
        return self

    @property
    def _noiseless(self) -> bool:
        return any(event.noise_multiplier == 0 for event in self._counts)

    @abstractmethod
    def _composed(self) -> Any:
        """Everything composed so far, as an object with ``get_epsilon`` and ``get_delta``.

        Built from ``_counts`` and kept in ``_library`` until the next compose.
        """

    def get_epsilon(self, delta: float) -> float:
        """The epsilon of everything composed so far, at ``delta``."""
        delta = _check_delta(delta)
        if self._noiseless:
            return math.inf  # no noise, no privacy (the libraries disagree on how to say so)
        if not self._counts:
            return 0.0
        return float(self._composed().get_epsilon(delta))

    def get_delta(self, epsilon: float) -> float:
        """The delta of everything composed so far, at ``epsilon``."""
        if not (isinstance(epsilon, int | float) and epsilon >= 0):
            raise ValueError(f"epsilon must be >= 0, got {epsilon!r}")
        if self._noiseless:
            return 1.0
        if not self._counts:
            return 0.0
        return float(self._composed().get_delta(float(epsilon)))

    def copy(self) -> Self:
        """An independent copy: composing into it leaves this one unchanged."""
        clone = copy.copy(self)
        clone._counts = dict(self._counts)
        clone._library = None
        return clone

    def fresh(self) -> Self:
        """A new, empty accountant with the same settings."""
        clone = self.copy()
        clone._counts = {}
        return clone

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(neighbouring={self._neighbouring.name}, "
            f"rounds={sum(self._counts.values())})"
        )


def _gaussian(dpa: ModuleType, z: float) -> Any:
    return dpa.GaussianDpEvent(z)


_PLD_CONVERT: dict[tuple[type, Neighbouring], _Converter] = {
    # PLD under REPLACE_ONE takes the noise relative to C and doubles the shift itself.
    (FullParticipationGaussian, ADD): lambda dpa, e: _gaussian(dpa, e.noise_multiplier),
    (FullParticipationGaussian, REPLACE): lambda dpa, e: _gaussian(dpa, e.noise_multiplier),
    (PoissonSampledGaussian, ADD): lambda dpa, e: dpa.PoissonSampledDpEvent(
        e.sample_rate, _gaussian(dpa, e.noise_multiplier)
    ),
    (PoissonSampledGaussian, REPLACE): lambda dpa, e: dpa.PoissonSampledDpEvent(
        e.sample_rate, _gaussian(dpa, e.noise_multiplier)
    ),
    # dp-accounting's PLDAccountant cannot compose this event: _single_event_pld builds its PLD.
    (FixedSizeSampledGaussian, REPLACE): lambda dpa, e: dpa.SampledWithoutReplacementDpEvent(
        e.population, e.sample_size, _gaussian(dpa, e.noise_multiplier)
    ),
    (Laplace, ADD): lambda dpa, e: dpa.LaplaceDpEvent(e.noise_multiplier),
}

_RDP_CONVERT: dict[tuple[type, Neighbouring], _Converter] = {
    (FullParticipationGaussian, ADD): lambda dpa, e: _gaussian(dpa, e.noise_multiplier),
    # RDP ignores the relation for a plain Gaussian: give it the noise over 2C.
    (FullParticipationGaussian, REPLACE): lambda dpa, e: _gaussian(
        dpa, e.noise_multiplier / REPLACE.sensitivity_factor
    ),
    (PoissonSampledGaussian, ADD): lambda dpa, e: dpa.PoissonSampledDpEvent(
        e.sample_rate, _gaussian(dpa, e.noise_multiplier)
    ),
    # Wang, Balle and Kasiviswanathan (2019), Theorem 27: noise over the replace-one sensitivity.
    (FixedSizeSampledGaussian, REPLACE): lambda dpa, e: dpa.SampledWithoutReplacementDpEvent(
        e.population,
        e.sample_size,
        _gaussian(dpa, e.noise_multiplier / REPLACE.sensitivity_factor),
    ),
    (Laplace, ADD): lambda dpa, e: dpa.LaplaceDpEvent(e.noise_multiplier),
}


class _ComposedPld:
    """A composed PrivacyLossDistribution, answering as a library accountant does."""

    def __init__(self, pld: Any) -> None:
        self._pld = pld

    def get_epsilon(self, delta: float) -> float:
        return float(self._pld.get_epsilon_for_delta(delta))

    def get_delta(self, epsilon: float) -> float:
        return float(self._pld.get_delta_for_epsilon(epsilon))


@lru_cache(maxsize=16)  # a run uses one or two distinct events; calibration tries a dozen
def _single_event_pld(event: PrivacyEvent, neighbouring: Neighbouring, interval: float) -> Any:
    """The PLD of one sampled event (immutable in dp-accounting, so safe to share)."""
    pld = _dpa().pld.privacy_loss_distribution
    if isinstance(event, PoissonSampledGaussian):
        return pld.from_gaussian_mechanism(
            standard_deviation=event.noise_multiplier,
            value_discretization_interval=interval,
            sampling_prob=event.sample_rate,
            neighboring_relation=_relation(neighbouring),
        )
    if isinstance(event, FixedSizeSampledGaussian):
        return sampled_without_replacement_gaussian_pld(
            noise_multiplier=event.noise_multiplier,
            sample_rate=event.sample_rate,
            value_discretization_interval=interval,
        )
    if isinstance(event, Laplace):
        return pld.from_laplace_mechanism(
            parameter=event.noise_multiplier, value_discretization_interval=interval
        )
    raise PrivacyAccountingError(f"no cached PLD for {event!r}")  # unreachable: _CONVERT refuses


def _event_pld(event: PrivacyEvent, count: int, neighbouring: Neighbouring, interval: float) -> Any:
    """``count`` repetitions of ``event`` as one PLD, as dp-accounting's PLDAccountant builds it."""
    if isinstance(event, FullParticipationGaussian):
        # dp-accounting's reduction: count Gaussians are one with sigma / sqrt(count).
        return _dpa().pld.privacy_loss_distribution.from_gaussian_mechanism(
            standard_deviation=event.noise_multiplier / math.sqrt(count),
            value_discretization_interval=interval,
            neighboring_relation=_relation(neighbouring),
        )
    return _single_event_pld(event, neighbouring, interval).self_compose(count)


class _ComposedRdp:
    """Summed RDP values, answering as dp-accounting's RdpAccountant does (same conversions)."""

    def __init__(self, orders: Any, rdp: Any) -> None:
        self._orders, self._rdp = orders, rdp

    def get_epsilon(self, delta: float) -> float:
        return float(
            _dpa().rdp.rdp_privacy_accountant.compute_epsilon(self._orders, self._rdp, delta)[0]
        )

    def get_delta(self, epsilon: float) -> float:
        return float(
            _dpa().rdp.rdp_privacy_accountant.compute_delta(self._orders, self._rdp, epsilon)[0]
        )


@lru_cache(maxsize=16)
def _single_event_rdp(
    event: PrivacyEvent, neighbouring: Neighbouring, orders: tuple[float, ...] | None
) -> tuple[Any, Any]:
    """The orders and RDP values of one ``event``, from dp-accounting's RdpAccountant."""
    accountant = RdpAccountant(neighbouring=neighbouring, orders=orders)
    library = accountant._new_library()
    library.compose(accountant._convert(event))
    return library.orders, library.rdp


class PldAccountant(Accountant):
    """dp-accounting's PLD accountant: the tightest valid epsilon, the default.

    Fixed-size sampling without replacement is analysed under replace-one
    neighbouring, through the dominating pair of
    :mod:`flowerpets.dp.accountant._without_replacement`, composed by
    dp-accounting.
    """

    name = "pld"
    _CONVERT = _PLD_CONVERT
    _WHY_NOT: ClassVar[Mapping[type, str]] = {
        FixedSizeSampledGaussian: (
            "sampling without replacement is analysed under replace-one neighbouring: "
            "use PldAccountant(neighbouring=Neighbouring.REPLACE_ONE)"
        ),
        Laplace: "the Laplace PLD is defined under add-or-remove neighbouring only",
    }

    def __init__(
        self, *, neighbouring: Neighbouring = ADD, value_discretization_interval: float = 1e-4
    ) -> None:
        if not (math.isfinite(value_discretization_interval) and value_discretization_interval > 0):
            raise ValueError(
                "value_discretization_interval must be finite and > 0, "
                f"got {value_discretization_interval!r}"
            )
        self._interval = float(value_discretization_interval)
        super().__init__(neighbouring=neighbouring)

    def _composed(self) -> Any:
        """The composed privacy loss distribution, from cached single-event PLDs.

        The same construction as dp-accounting's ``PLDAccountant`` (one PLD per
        event, self-composed by FFT, then composed), except that the PLD of one
        sampled event, the slow part, is built once and reused: a server that
        asks for its epsilon every round pays for a self-composition, not for
        the whole construction again.
        """
        if self._library is None:
            composed = None
            for event, count in self._counts.items():
                pld = _event_pld(event, count, self._neighbouring, self._interval)
                composed = pld if composed is None else composed.compose(pld)
            self._library = _ComposedPld(composed)
        return self._library

    def get_epsilon(self, delta: float) -> float:
        """The epsilon at ``delta``; exact, without discretization, when no event is sampled.

        Gaussians without sampling compose to one Gaussian whose noise
        multiplier is ``(sum_i count_i z_i^-2)^(-1/2)`` (dp-accounting's PLD
        accountant makes the same reduction for a self-composed Gaussian), and
        dp-accounting's ``get_epsilon_gaussian`` gives that Gaussian's epsilon by
        Balle and Wang's exact condition, faster and without a grid.
        """
        delta = _check_delta(delta)
        if (
            self._counts
            and not self._noiseless
            and all(type(event) is FullParticipationGaussian for event in self._counts)
        ):
            factor = self._neighbouring.sensitivity_factor
            precision = sum(n * (factor / e.noise_multiplier) ** 2 for e, n in self._counts.items())
            return float(_dpa().get_epsilon_gaussian(precision**-0.5, delta))
        return super().get_epsilon(delta)


class RdpAccountant(Accountant):
    """dp-accounting's RDP accountant: fast, a little looser (much looser on fixed-size cohorts)."""

    name = "rdp"
    _CONVERT = _RDP_CONVERT
    _WHY_NOT: ClassVar[Mapping[type, str]] = {
        FixedSizeSampledGaussian: (
            "sampling without replacement is analysed under replace-one neighbouring: "
            "use RdpAccountant(neighbouring=Neighbouring.REPLACE_ONE)"
        ),
        PoissonSampledGaussian: "dp-accounting's RDP analyses Poisson sampling under add-or-remove",
        Laplace: "the Laplace RDP is defined under add-or-remove neighbouring only",
    }

    def __init__(
        self, *, neighbouring: Neighbouring = ADD, orders: tuple[float, ...] | None = None
    ) -> None:
        if orders is not None and not (orders and all(o > 1 for o in orders)):
            raise ValueError(f"orders must be a non-empty sequence of numbers > 1, got {orders!r}")
        self._orders = orders
        super().__init__(neighbouring=neighbouring)

    def _new_library(self) -> Any:
        return _dpa().rdp.RdpAccountant(
            orders=None if self._orders is None else list(self._orders),
            neighboring_relation=_relation(self._neighbouring),
        )

    def _composed(self) -> Any:
        """RDP composes by addition: the sum of each distinct event's RDP times its count.

        dp-accounting's RdpAccountant does exactly this sum; the RDP of one event
        (slow for sampling without replacement) is computed once and reused.
        """
        if self._library is None:
            orders: Any = None
            total: Any = 0.0
            for event, count in self._counts.items():
                orders, rdp = _single_event_rdp(event, self._neighbouring, self._orders)
                total = total + count * rdp
            self._library = _ComposedRdp(orders, total)
        return self._library


class AccountantFactory(Protocol):
    """Makes a fresh accountant for a neighbouring relation (the accountant classes are ones)."""

    def __call__(self, *, neighbouring: Neighbouring = ...) -> Accountant: ...


ACCOUNTANTS: dict[str, AccountantFactory] = {
    PldAccountant.name: PldAccountant,
    RdpAccountant.name: RdpAccountant,
}
"""The accountants by name (``pld``, ``rdp``), as the CLI offers them."""


def default_neighbouring(event: PrivacyEvent) -> Neighbouring:
    """Replace-one for fixed-size cohorts (their population is public), else add-or-remove."""
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
    if isinstance(population, bool) or not isinstance(population, int) or population < 1:
        raise PrivacyAccountingError(f"a round needs a population >= 1, got {population!r}")
    return make(sampling, population, noise_multiplier)


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
    if not (isinstance(target_epsilon, int | float) and 0 < target_epsilon < math.inf):
        raise ValueError(f"target_epsilon must be finite and > 0, got {target_epsilon!r}")
    delta = _check_delta(delta)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be an integer >= 1, got {count!r}")
    if not (math.isfinite(tol) and tol > 0):
        raise ValueError(f"tol must be finite and > 0, got {tol!r}")
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
