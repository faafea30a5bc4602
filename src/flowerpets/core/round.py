"""What a server mod receives and returns: one round's request and its result."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from flowerpets.core.context import Context
from flowerpets.core.grid import Grid
from flowerpets.core.message import Error, MessageType
from flowerpets.core.records import ArrayRecord, ConfigRecord, MetricRecord
from flowerpets.core.sampling import CohortSampling, FullParticipation

__all__ = [
    "WEIGHT_KEY",
    "Failure",
    "RoundRequest",
    "RoundResult",
    "ServerContext",
    "ServerMod",
]

# The reply metric that weighs a node's update (Flower's convention).
WEIGHT_KEY = "num-examples"


@dataclass(frozen=True, slots=True)
class Failure:
    """Why a node did not contribute to a round, and at which stage."""

    stage: str
    error: Error

    def __str__(self) -> str:
        return f"{self.stage}: {self.error}"


@dataclass(frozen=True, slots=True)
class RoundRequest:
    """One round, as the strategy configured it, before any node has seen it.

    A server mod may return a changed copy (``request.replace(config=...)``),
    for example to add a clipping norm to the config every node receives.
    """

    round: int
    cohort: tuple[int, ...]
    arrays: ArrayRecord
    config: ConfigRecord
    sampling: CohortSampling = field(default_factory=FullParticipation)
    population: int = 0
    message_type: str = MessageType.TRAIN
    # Reply metric that weighs each update; None sums the updates unweighted.
    weight_key: str | None = WEIGHT_KEY
    timeout: float | None = None

    def replace(self, **changes: Any) -> RoundRequest:
        return replace(self, **changes)


@dataclass(frozen=True, slots=True)
class RoundResult:
    """A round's outcome: the weighted *sum* of the updates, and who made it.

    ``aggregate`` is the sum of ``weight_i * update_i`` over the participants
    and ``total_weight`` the sum of their weights, so the mean is
    ``aggregate / total_weight`` (see :meth:`mean`). Keeping the sum lets a mod
    change the denominator (central DP divides by the expected cohort size) or
    keep the aggregate encrypted (HE) without undoing a division.
    """

    round: int
    aggregate: ArrayRecord
    total_weight: float
    participants: tuple[int, ...]
    failures: Mapping[int, Failure] = field(default_factory=dict)
    metrics: MetricRecord = field(default_factory=MetricRecord)

    def replace(self, **changes: Any) -> RoundResult:
        return replace(self, **changes)

    def mean(self) -> dict[str, np.ndarray[Any, Any]]:
        """``aggregate / total_weight`` as float64 numpy arrays."""
        if self.total_weight <= 0:
            raise ValueError(f"round {self.round}: total weight is {self.total_weight}, no mean")
        return {
            name: np.asarray(a.numpy(), dtype=np.float64) / self.total_weight
            for name, a in self.aggregate.items()
        }


@dataclass(slots=True)
class ServerContext(Context):
    """The server's context: a Context plus the Grid that reaches the nodes.

    A mod that runs its own protocol stages (secure aggregation, key set-up)
    sends them through ``context.grid``.
    """

    grid: Grid | None = None

    def require_grid(self) -> Grid:
        if self.grid is None:
            raise RuntimeError("this server context has no grid: run the app through a runtime")
        return self.grid


ServerMod = Callable[
    [RoundRequest, ServerContext, Callable[[RoundRequest, ServerContext], RoundResult]],
    RoundResult,
]
