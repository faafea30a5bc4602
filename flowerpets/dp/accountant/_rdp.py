"""The RDP accountant: Renyi DP composed by dp-accounting, the fast path.

Mironov 2017, Mironov, Talwar and Zhang 2019; fixed-size cohorts by Wang, Balle
and Kasiviswanathan (AISTATS 2019).

The distributed events (Skellam, distributed discrete Gaussian) have RDP curves
dp-accounting does not know: their converters return a :class:`_Tabulated`
curve, computed from the papers' bounds (:mod:`._discrete`) and amplified by
general bounds (:mod:`._amplification`), which is summed with dp-accounting's
curves at the same orders and converted to epsilon by dp-accounting as well.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any, ClassVar

import numpy as np
from numpy.typing import NDArray

from flowerpets._validation import instance, real
from flowerpets.dp.accountant._amplification import mixed_cohort_rdp, without_replacement_rdp
from flowerpets.dp.accountant._base import (
    ADD,
    REPLACE,
    ZERO,
    Accountant,
    _Converter,
    _dpa,
    _gaussian,
    _relation,
    _same_under_zero_out,
)
from flowerpets.dp.accountant._discrete import (
    IntegerRdp,
    at_orders,
    distributed_discrete_gaussian_rdp,
    skellam_rdp,
)
from flowerpets.dp.accountant.events import (
    DistributedDiscreteGaussianEvent,
    DistributedEvent,
    FixedSizeSampledGaussian,
    FullParticipationGaussian,
    Laplace,
    Neighbouring,
    PoissonSampledGaussian,
    PrivacyEvent,
    SkellamEvent,
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
_RDP_CONVERT = _same_under_zero_out(
    _RDP_CONVERT, (FullParticipationGaussian, PoissonSampledGaussian, Laplace)
)


def _bound(event: DistributedEvent, factor: float) -> IntegerRdp:
    """The paper's bound for ``event`` with its sensitivities times ``factor``."""
    l2, l1 = factor * event.l2_sensitivity, factor * event.l1_sensitivity
    if isinstance(event, SkellamEvent):
        return skellam_rdp(event.total_variance, l2, l1)
    return distributed_discrete_gaussian_rdp(
        event.local_variance, event.clients_in_sum, l2, l1, event.dimension
    )


class _Tabulated:
    """A distributed event's RDP under a relation, at any orders (what its converter returns).

    Without a cohort: the paper's bound, the sensitivities times the
    relation's factor (1 under zero-out, 2 under replace-one). With a random
    cohort: the smallest of that, Wang, Balle and Kasiviswanathan's bound for
    sampling without replacement (whose cohorts may differ in who is in them,
    so it takes the replace-one sensitivities under either relation) and the
    joint-convexity bound (cohorts that differ in the one client's data only,
    so the relation's own sensitivities).
    """

    def __init__(self, event: DistributedEvent, neighbouring: Neighbouring) -> None:
        self.event, self.neighbouring = event, neighbouring

    def __call__(self, orders: NDArray[np.float64]) -> NDArray[np.float64]:
        same = _bound(self.event, self.neighbouring.sensitivity_factor)
        direct = self._at_any_order(orders)
        if self.event.cohort_size is None:
            return np.minimum(at_orders(same, orders), direct)
        gamma = self.event.sample_rate
        replaced = without_replacement_rdp(_bound(self.event, REPLACE.sensitivity_factor), gamma)
        mixed = mixed_cohort_rdp(same, gamma)

        def smallest(alphas: NDArray[np.int64]) -> NDArray[np.float64]:
            return np.asarray(np.minimum.reduce([same(alphas), replaced(alphas), mixed(alphas)]))

        # The unamplified bound holds for the sampled mechanism too.
        return np.minimum(at_orders(smallest, orders), direct)

    def _at_any_order(self, orders: NDArray[np.float64]) -> NDArray[np.float64]:
        """The unamplified bound where it is stated for every real order (else infinity)."""
        event = self.event
        if not isinstance(event, DistributedDiscreteGaussianEvent):
            return np.full(orders.shape, np.inf)
        factor = self.neighbouring.sensitivity_factor
        theorem_1 = distributed_discrete_gaussian_rdp(
            event.local_variance,
            event.clients_in_sum,
            factor * event.l2_sensitivity,
            factor * event.l1_sensitivity,
            event.dimension,
            theorem_1_only=True,
        )
        return theorem_1(orders)


def _tabulated(neighbouring: Neighbouring) -> _Converter:
    return lambda dpa, event: _Tabulated(event, neighbouring)


for _kind in (SkellamEvent, DistributedDiscreteGaussianEvent):
    for _neighbouring in (ZERO, REPLACE):
        _RDP_CONVERT[(_kind, _neighbouring)] = _tabulated(_neighbouring)

_NOT_ADD_OR_REMOVE = (
    "under add-or-remove the number of noise shares in a distributed sum differs between "
    "the neighbours, which the distributed bounds do not cover: use "
    "RdpAccountant(neighbouring=Neighbouring.ZERO_OUT) (the default for this event) or REPLACE_ONE"
)


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


@lru_cache(maxsize=256)  # a run that counts its survivors has an event per count
def _single_event_rdp(
    event: PrivacyEvent, neighbouring: Neighbouring, orders: tuple[float, ...] | None
) -> tuple[Any, Any]:
    """The orders and RDP values of one ``event``, from dp-accounting's RdpAccountant."""
    accountant = RdpAccountant(neighbouring=neighbouring, orders=orders)
    library = accountant._new_library()
    converted = accountant._convert(event)
    if isinstance(converted, _Tabulated):
        return library.orders, converted(np.asarray(library.orders, dtype=np.float64))
    library.compose(converted)
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
        SkellamEvent: _NOT_ADD_OR_REMOVE,
        DistributedDiscreteGaussianEvent: _NOT_ADD_OR_REMOVE,
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
