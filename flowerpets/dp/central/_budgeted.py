"""What the DP server mods share: the run's ledger, its budget, and its place in a run store.

:class:`BudgetedMod` is the base of :class:`~flowerpets.dp.CentralDp` and
:class:`~flowerpets.dp.DistributedDp`. It keeps the run's privacy state in the
run's context (:mod:`._ledger`, under the mod's own key) and, with a run store,
each spend on the population's ledger before the release (:mod:`._durable`);
:meth:`BudgetedMod.charge` refuses a round over ``max_epsilon`` before anything is
recorded. A subclass says what its settings are (:meth:`BudgetedMod.settings`),
under which key and mechanism name it keeps its state, and sets ``noise_multiplier``,
``clipping_norm``, ``adaptive``, ``delta``, ``max_epsilon``, ``accountant`` and
``population``.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

from flowerpets.core import DurableState, ServerContext
from flowerpets.dp.accountant import AccountantFactory, PrivacyEvent
from flowerpets.dp.central import _durable, _ledger
from flowerpets.dp.central._adaptive import AdaptiveClipping
from flowerpets.exceptions import ConfigurationError

__all__ = ["BudgetedMod"]


class BudgetedMod(DurableState):
    """A DP server mod whose spends go to a ledger (see the module docstring)."""

    state_key: ClassVar[str]
    mechanism_name: ClassVar[str]

    noise_multiplier: float | None
    clipping_norm: float
    adaptive: AdaptiveClipping | None
    delta: float
    max_epsilon: float | None
    accountant: AccountantFactory | None
    population: str | None

    @abc.abstractmethod
    def settings(self) -> dict[str, object]:
        """What the budget a run spent depends on: a resume must run with the same."""

    @property
    def state_name(self) -> str:
        return self.state_key

    def spent(self, context: ServerContext) -> float:
        """The epsilon (at ``delta``) this mod has spent in the run ``context`` belongs to.

        With a run store: what the run's population has spent, every run's events.
        """
        journal = _durable.spend_journal(context)
        if journal is not None:
            ledger = _durable.population_ledger(journal.spends())
        else:
            ledger = self.load(context).ledger
        return _ledger.spent(ledger, self.accountant, self.delta)

    def load(self, context: ServerContext) -> _ledger.RunState:
        """The run's privacy state (a new one at the initial clip)."""
        return _ledger.load(context, self.clipping_norm, key=self.state_key)

    def store(self, context: ServerContext, run: _ledger.RunState) -> None:
        _ledger.store(context, run, key=self.state_key)

    def durable_state(self, context: ServerContext) -> bytes:
        """The run's ledger, clip and last spend, with the settings they were spent under."""
        return _durable.encode_state(self.load(context), self.settings())

    def restore(self, context: ServerContext, state: bytes | None, *, round: int) -> None:
        """Continue the run's stored privacy state, checked against the store's ledger.

        Raises a :class:`~flowerpets.exceptions.PrivacyLedgerError` if it is
        missing, does not match the population's ledger, or was spent under
        other settings; never starts the budget again.
        """
        journal = _durable.spend_journal(context)
        if journal is None:
            raise ConfigurationError(
                f"{type(self).__name__} restores its state from a run store only"
            )
        run = _durable.restored(
            journal,
            state,
            round=round,
            settings=self.settings(),
            population=self.population,
            clip=self.clipping_norm,
        )
        self.store(context, run)

    def charge(
        self,
        context: ServerContext,
        run: _ledger.RunState,
        events: Sequence[PrivacyEvent],
        *,
        round: int,
        max_epsilon: float | None,
        dry: bool = False,
    ) -> tuple[_ledger.RunState, float]:
        """``run`` with ``events`` spent, and the epsilon; refuses a round over ``max_epsilon``.

        Every check runs before anything is recorded. With a run store each event
        is committed to the population's ledger (its own transaction) before this
        returns, so before the caller releases anything: a crash from here on
        over-counts, never under. The caller stores the state it returns.
        ``dry``: check only, record nothing in the store.
        """
        journal = _durable.spend_journal(context)
        if journal is None and self.population is not None:
            raise ConfigurationError(
                f"{type(self).__name__}(population=...) keeps the population's budget in a run "
                "store: give the ServerApp store=..."
            )
        budget = None if journal is None else _durable.population_ledger(journal.spends())
        charged, epsilon = run, 0.0
        counted = budget
        for event in events:  # in memory first: a refusal leaves nothing recorded
            charged, epsilon = _ledger.charged(
                charged,
                event,
                factory=self.accountant,
                delta=self.delta,
                max_epsilon=max_epsilon,
                round=round,
                budget=counted,
            )
            if counted is not None:
                counted = _ledger.added(counted, event)
        if journal is not None and not dry:
            so_far = budget or ()
            for event in events:
                counted_by = _ledger.accountant_for(so_far, event, self.accountant)
                spend = journal.record_spend(
                    _durable.spend_entry(
                        event,
                        delta=self.delta,
                        accountant=counted_by.name,
                        mechanism=self.mechanism_name,
                    ),
                    round=round,
                )
                so_far = _ledger.added(so_far, event)
                charged = dataclasses.replace(charged, spend_seq=spend.seq)
        return charged, epsilon

    def settings_of(self, **extra: Any) -> dict[str, object]:
        """The settings every budgeted mod has, with ``extra`` (the subclass's own)."""
        factory, adaptive = self.accountant, self.adaptive
        return {
            "noise_multiplier": self.noise_multiplier,
            "clipping_norm": self.clipping_norm,
            "adaptive": None
            if adaptive is None
            else [adaptive.target_quantile, adaptive.learning_rate, adaptive.count_stddev],
            "delta": self.delta,
            "max_epsilon": self.max_epsilon,
            "accountant": None
            if factory is None
            else getattr(factory, "__qualname__", type(factory).__qualname__),
            "population": self.population,
            **extra,
        }
