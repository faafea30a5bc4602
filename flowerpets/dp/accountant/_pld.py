"""The PLD accountant: privacy loss distributions composed by dp-accounting, the default.

Meiser and Mohammadi 2018, Koskela et al. 2020, Doroshenko et al. 2022; fixed-size
cohorts through :mod:`flowerpets.dp.accountant._without_replacement`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import lru_cache
from typing import Any, ClassVar

from flowerpets._validation import real
from flowerpets.dp.accountant._base import (
    ADD,
    REPLACE,
    Accountant,
    _check_delta,
    _Converter,
    _dpa,
    _gaussian,
    _relation,
    _same_under_zero_out,
)
from flowerpets.dp.accountant._without_replacement import sampled_without_replacement_gaussian_pld
from flowerpets.dp.accountant.events import (
    DistributedDiscreteGaussianEvent,
    FixedSizeSampledGaussian,
    FullParticipationGaussian,
    Laplace,
    Neighbouring,
    PoissonSampledGaussian,
    PrivacyEvent,
    SkellamEvent,
)
from flowerpets.exceptions import PrivacyAccountingError

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
_PLD_CONVERT = _same_under_zero_out(
    _PLD_CONVERT, (FullParticipationGaussian, PoissonSampledGaussian, Laplace)
)

_NO_EXACT_PLD = (
    "no exact PLD of a sum of discrete noise shares is known: in d dimensions the worst "
    "case over every update of bounded L1 and L2 norm has no closed form (the papers' "
    "bounds are RDP bounds), so use RdpAccountant, the default for this event"
)


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
        SkellamEvent: _NO_EXACT_PLD,
        DistributedDiscreteGaussianEvent: _NO_EXACT_PLD,
    }

    def __init__(
        self, *, neighbouring: Neighbouring = ADD, value_discretization_interval: float = 1e-4
    ) -> None:
        self._interval = real(
            "value_discretization_interval", value_discretization_interval, above=0
        )
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
