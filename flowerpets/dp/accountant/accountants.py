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

Every mathematical step is dp-accounting's; nothing here computes a privacy
loss itself (for fixed-size cohorts this package chooses which of
dp-accounting's divergences to discretize, by a cited theorem).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from flowerpets._validation import integer, is_integer, real
from flowerpets.core.sampling import (
    CohortSampling,
    FixedSizeSampling,
    FullParticipation,
    PoissonSampling,
)
from flowerpets.dp.accountant._base import ADD, REPLACE, Accountant, _check_delta, _dpa
from flowerpets.dp.accountant._pld import PldAccountant
from flowerpets.dp.accountant._rdp import RdpAccountant
from flowerpets.dp.accountant.events import (
    FixedSizeSampledGaussian,
    FullParticipationGaussian,
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
