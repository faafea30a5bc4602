"""What a ServerApp needs of a run store: where a run resumes, and where each round goes.

The core knows no database: :class:`flowerpets.store.RunWriter` implements
:class:`RunJournal`, and a ServerApp given one commits every round (or every
N rounds and the last) to it and, if it already holds rounds, continues after
the last one committed.

A server mod whose own state must outlive the process (a privacy ledger)
declares it by subclassing :class:`DurableState`: the ServerApp restores its
state from the journal before the first round and commits it with every round.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from flowerpets.core.context import Context
from flowerpets.core.history import History, RoundRecord
from flowerpets.core.message import Message
from flowerpets.core.records import ArrayRecord
from flowerpets.core.round import ServerContext

__all__ = ["DurableState", "NodeBudget", "Resumption", "RunJournal"]


@dataclass(frozen=True, slots=True)
class Resumption:
    """A run as of its last committed round: the model, the history, the cohort generator."""

    round: int
    arrays: ArrayRecord
    history: History
    rng: np.random.Generator


@runtime_checkable
class RunJournal(Protocol):
    """Where a ServerApp commits each round, and reads where to resume from."""

    def resumption(self) -> Resumption | None:
        """The last committed round's state, or None if no round was committed yet."""
        ...

    def pet_state(self, name: str) -> bytes | None:
        """The state the mod named ``name`` committed with the last round (None if none)."""
        ...

    def commit_round(
        self,
        record: RoundRecord,
        *,
        arrays: ArrayRecord,
        sampler: np.random.Generator,
        pet_states: Mapping[str, bytes] | None = None,
        since: Sequence[RoundRecord] = (),
    ) -> None:
        """Commit a finished round, whole or not at all, before the next one starts.

        ``pet_states`` are the :class:`DurableState` mods' states after it, by
        name; ``since`` the records of the rounds run after the last commit and
        before this one (``ServerApp(commit_every=N)``), committed with it.
        """
        ...


class DurableState(abc.ABC):
    """A server mod that keeps its run state in the run's store.

    Subclassing it is how a mod declares the capability. A ServerApp with a
    ``store`` then calls :meth:`restore` once before the run's first round
    (also for a new run), puts the journal in ``context.journal`` for the
    rounds, and commits :meth:`durable_state` under :attr:`state_name` with
    every round, in the round's transaction. A mod whose state must be on disk
    before a release (spent privacy budget) writes it itself through
    ``context.journal``.
    """

    __slots__ = ()

    @property
    @abc.abstractmethod
    def state_name(self) -> str:
        """The name the state is stored under (one per mod of an app)."""

    @abc.abstractmethod
    def durable_state(self, context: ServerContext) -> bytes:
        """The mod's state in the run ``context`` belongs to, to commit with the round."""

    @abc.abstractmethod
    def restore(self, context: ServerContext, state: bytes | None, *, round: int) -> None:
        """Continue from ``state``, committed with round ``round`` (None, 0: nothing committed).

        Raises if the state cannot be continued: a state that is missing or
        damaged is never taken for a fresh one.
        """


class NodeBudget(abc.ABC):
    """A client mod that keeps a privacy budget in its node's context, across rounds.

    Subclassing it is how a mod declares it (``LocalDpMod`` does). The budget
    lives on the node, which need not trust the server, so a server's run
    store never holds it and cannot carry it across a restart: in a deployment
    the nodes keep it as long as they keep their contexts, but a runtime that
    rebuilds its nodes when a stored run resumes (the simulation) would count
    it from zero again. ``run_simulation`` therefore refuses a ServerApp with
    a store over a ClientApp with such a mod.
    """

    __slots__ = ()

    @abc.abstractmethod
    def __call__(
        self, msg: Message, context: Context, call_next: Callable[[Message, Context], Message]
    ) -> Message:
        """The client mod itself (Flower's shape)."""
