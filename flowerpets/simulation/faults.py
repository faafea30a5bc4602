"""Fault injection: make chosen nodes drop out, answer late, or answer with an error.

Faults name a node by its index in the simulation (its ``partition-id``, 0 to
``num_nodes - 1``), a round, and optionally a protocol step: the message's
``stage`` if it has one, else its type (``"train"``, ``"evaluate"``...). PET
protocols name their stages so that a test can hit exactly one of them:

.. code-block:: python

    faults = [
        Dropout(node=3, round=2, stage="share-keys"),  # gone from that step on, for good
        Delay(node=5, round=1, seconds=2.0),             # answers every round-1 message late
        ErrorReply(node=7, round=4, stage="train"),      # one error reply instead of training
    ]
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from flowerpets._validation import integer, real
from flowerpets.core import Metadata
from flowerpets.exceptions import ParameterTypeError, ParameterValueError

__all__ = ["Delay", "Dropout", "ErrorReply", "Fault", "FaultPlan", "step_of"]


def _check_node_round(kind: str, node: int, round: int) -> None:
    integer(f"{kind} node (an index)", node, at_least=0)
    integer(f"{kind} round", round, at_least=1)


def step_of(metadata: Metadata) -> str:
    """The protocol step a fault names: the message's stage if it has one, else its type."""
    return metadata.stage or metadata.message_type


def _step_matches(stage: str | None, metadata: Metadata) -> bool:
    return stage is None or stage == step_of(metadata)


@dataclass(frozen=True, slots=True)
class Dropout:
    """From ``round`` (at ``stage``, or at its first message if None) on, the node never answers.

    Messages of earlier rounds, and of earlier stages of ``round``, are answered normally.
    """

    node: int
    round: int
    stage: str | None = None

    def __post_init__(self) -> None:
        _check_node_round("Dropout", self.node, self.round)

    def triggers(self, metadata: Metadata) -> bool:
        return metadata.round > self.round or (
            metadata.round == self.round and _step_matches(self.stage, metadata)
        )


@dataclass(frozen=True, slots=True)
class Delay:
    """In ``round`` (only at ``stage`` if given), the node's replies arrive ``seconds`` late."""

    node: int
    round: int
    seconds: float
    stage: str | None = None

    def __post_init__(self) -> None:
        _check_node_round("Delay", self.node, self.round)
        real("Delay seconds", self.seconds, at_least=0, finite=False)

    def triggers(self, metadata: Metadata) -> bool:
        return metadata.round == self.round and _step_matches(self.stage, metadata)


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """In ``round`` (only at ``stage`` if given), the node answers with an error.

    The node does not run its app for that message; later messages are answered normally.
    """

    node: int
    round: int
    stage: str | None = None
    reason: str = "injected fault"

    def __post_init__(self) -> None:
        _check_node_round("ErrorReply", self.node, self.round)

    def triggers(self, metadata: Metadata) -> bool:
        return metadata.round == self.round and _step_matches(self.stage, metadata)


Fault = Dropout | Delay | ErrorReply


class FaultPlan:
    """The faults of one simulation, looked up per node and message."""

    def __init__(self, faults: Iterable[Fault] = ()) -> None:
        self._by_node: dict[int, list[Fault]] = {}
        for fault in faults:
            if not isinstance(fault, Dropout | Delay | ErrorReply):
                raise ParameterTypeError(
                    f"not a fault: {fault!r} (use Dropout, Delay or ErrorReply)"
                )
            self._by_node.setdefault(fault.node, []).append(fault)

    def __bool__(self) -> bool:
        return bool(self._by_node)

    def nodes(self) -> set[int]:
        return set(self._by_node)

    def check(self, num_nodes: int) -> None:
        """Refuse faults that name a node the simulation does not have."""
        bad = sorted(n for n in self._by_node if n >= num_nodes)
        if bad:
            raise ParameterValueError(
                f"faults name node indices {bad}, but there are only {num_nodes} nodes"
            )

    def find(self, node: int, metadata: Metadata, kind: type[Fault]) -> Fault | None:
        """The first fault of ``kind`` for ``node`` that this message triggers."""
        for fault in self._by_node.get(node, ()):
            if isinstance(fault, kind) and fault.triggers(metadata):
                return fault
        return None
