"""The accountants' shared interface: :class:`Accountant`, and dp-accounting on first use.

An accountant keeps a count per distinct event; a subclass says how one event
becomes dp-accounting's (its ``_CONVERT`` table) and how the counts compose
(``_composed``). See :mod:`flowerpets.dp.accountant.accountants` for the
conventions the tables follow.
"""

from __future__ import annotations

import copy
import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from functools import cache
from types import ModuleType
from typing import Any, ClassVar, Self

from flowerpets._validation import instance, integer, probability, real
from flowerpets.dp.accountant.events import Neighbouring, PrivacyEvent
from flowerpets.exceptions import PrivacyAccountingError

ADD = Neighbouring.ADD_OR_REMOVE
REPLACE = Neighbouring.REPLACE_ONE
ZERO = Neighbouring.ZERO_OUT

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
    # A central event's pair of outputs is the same under zero-out as under add-or-remove.
    names = {ADD: "ADD_OR_REMOVE_ONE", REPLACE: "REPLACE_ONE", ZERO: "ADD_OR_REMOVE_ONE"}
    return getattr(_dpa().NeighboringRelation, names[neighbouring])


def _same_under_zero_out(
    table: Mapping[tuple[type, Neighbouring], _Converter], kinds: tuple[type, ...]
) -> dict[tuple[type, Neighbouring], _Converter]:
    """``table`` with each central event of ``kinds`` under zero-out as under add-or-remove.

    The server's noise does not depend on who takes part, so replacing one
    participant's contribution by zeros gives the same two output laws as
    removing it (with or without Poisson sampling).
    """
    return {**table, **{(kind, ZERO): table[(kind, ADD)] for kind in kinds}}


def _check_delta(delta: float) -> float:
    return probability("delta", delta, zero=False, one=False)


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
        self._neighbouring = instance("neighbouring", neighbouring, Neighbouring)
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
        count = integer("count", count, at_least=0)
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
        epsilon = real("epsilon", epsilon, at_least=0, finite=False)
        if self._noiseless:
            return 1.0
        if not self._counts:
            return 0.0
        return float(self._composed().get_delta(epsilon))

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
