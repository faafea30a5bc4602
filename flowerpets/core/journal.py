"""What a ServerApp needs of a run store: where a run resumes, and where each round goes.

The core knows no database: :class:`flowerpets.store.RunWriter` implements
:class:`RunJournal`, and a ServerApp given one commits every round to it and,
if it already holds rounds, continues after the last one committed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from flowerpets.core.history import History, RoundRecord
from flowerpets.core.records import ArrayRecord

__all__ = ["Resumption", "RunJournal"]


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

    def commit_round(
        self, record: RoundRecord, *, arrays: ArrayRecord, sampler: np.random.Generator
    ) -> None:
        """Commit a finished round, whole or not at all, before the next one starts."""
        ...
