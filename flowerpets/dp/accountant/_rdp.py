"""The RDP accountant: Renyi DP composed by dp-accounting, the fast path.

Mironov 2017, Mironov, Talwar and Zhang 2019; fixed-size cohorts by Wang, Balle
and Kasiviswanathan (AISTATS 2019).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any, ClassVar

from flowerpets._validation import instance, real
from flowerpets.dp.accountant._base import (
    ADD,
    REPLACE,
    Accountant,
    _Converter,
    _dpa,
    _gaussian,
    _relation,
)
from flowerpets.dp.accountant.events import (
    FixedSizeSampledGaussian,
    FullParticipationGaussian,
    Laplace,
    Neighbouring,
    PoissonSampledGaussian,
    PrivacyEvent,
)
from flowerpets.exceptions import ParameterValueError

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
        if orders is not None:
            orders = tuple(instance("orders", orders, (tuple, list)))
            if not orders:
                raise ParameterValueError("orders must not be empty")
            for order in orders:
                real("every RDP order", order, above=1)
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
