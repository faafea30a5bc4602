"""A run's history: what happened in each round, for tables, plots and tests."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from flowerpets._validation import one_of
from flowerpets.core.message import Error, ErrorCode
from flowerpets.core.round import Failure, FailureKind
from flowerpets.exceptions import NotFoundError

__all__ = ["History", "RoundRecord"]


@dataclass(slots=True)
class RoundRecord:
    """One round: who took part, who failed and why, and the metrics it produced.

    ``failures`` are the nodes that did not contribute to training (keyed by
    node id), ``evaluate_failures`` those that did not answer federated
    evaluation. ``train_metrics`` are the participants' reported metrics (weighted means)
    plus whatever the server mods added (for example ``epsilon``);
    ``evaluate_metrics`` come from federated evaluation and ``server_metrics``
    from the strategy's centralized evaluation. ``error`` says why a round
    failed (or, with ``stopped``, why a mod ended the run before it); the
    global model is then unchanged. A failed round keeps ``failures`` and
    ``participants`` as far as the round got.
    """

    round: int
    cohort_size: int = 0
    participants: tuple[int, ...] = ()
    failures: Mapping[int, Failure] = field(default_factory=dict)
    evaluate_failures: Mapping[int, Failure] = field(default_factory=dict)
    train_metrics: dict[str, float] = field(default_factory=dict)
    evaluate_metrics: dict[str, float] = field(default_factory=dict)
    server_metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    error: str | None = None
    stopped: bool = False

    @property
    def ok(self) -> bool:
        """The round changed the model."""
        return self.error is None

    @property
    def failed(self) -> bool:
        """The round failed (a run that a mod stopped on purpose is not a failure)."""
        return self.error is not None and not self.stopped

    def to_dict(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "cohort_size": self.cohort_size,
            "participants": len(self.participants),
            "failures": {str(node): str(f) for node, f in self.failures.items()},
            "evaluate_failures": {str(n): str(f) for n, f in self.evaluate_failures.items()},
            "train_metrics": dict(self.train_metrics),
            "evaluate_metrics": dict(self.evaluate_metrics),
            "server_metrics": dict(self.server_metrics),
            "seconds": self.seconds,
            "error": self.error,
            "stopped": self.stopped,
        }

    def to_json_dict(self) -> dict[str, Any]:
        """Every field, losslessly, as JSON-able values (``to_dict`` summarises for tables).

        Node ids become string keys (JSON's only kind), each failure its stage,
        error code, reason and kind; :meth:`from_json_dict` reads it back equal.
        """
        return {
            **self.to_dict(),  # what it keeps whole already, then what it summarises
            "participants": list(self.participants),
            "failures": _failures_to_json(self.failures),
            "evaluate_failures": _failures_to_json(self.evaluate_failures),
        }

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Any]) -> RoundRecord:
        """The record :meth:`to_json_dict` wrote (KeyError or TypeError if it is malformed)."""
        return cls(
            round=int(data["round"]),
            cohort_size=int(data["cohort_size"]),
            participants=tuple(int(n) for n in data["participants"]),
            failures=_failures_from_json(data["failures"]),
            evaluate_failures=_failures_from_json(data["evaluate_failures"]),
            train_metrics={str(k): float(v) for k, v in data["train_metrics"].items()},
            evaluate_metrics={str(k): float(v) for k, v in data["evaluate_metrics"].items()},
            server_metrics={str(k): float(v) for k, v in data["server_metrics"].items()},
            seconds=float(data["seconds"]),
            error=None if data["error"] is None else str(data["error"]),
            stopped=bool(data["stopped"]),
        )


def _failures_to_json(failures: Mapping[int, Failure]) -> dict[str, dict[str, Any]]:
    return {
        str(node): {
            "stage": f.stage,
            "code": int(f.error.code),
            "reason": f.error.reason,
            "kind": f.kind.value,
        }
        for node, f in failures.items()
    }


def _failures_from_json(data: Mapping[str, Mapping[str, Any]]) -> dict[int, Failure]:
    return {
        int(node): Failure(
            stage=str(f["stage"]),
            error=Error(ErrorCode(int(f["code"])), str(f["reason"])),
            kind=FailureKind(str(f["kind"])),
        )
        for node, f in data.items()
    }


_SOURCES = ("train_metrics", "evaluate_metrics", "server_metrics")


@dataclass(slots=True)
class History:
    """The rounds of a run, in order."""

    rounds: list[RoundRecord] = field(default_factory=list)

    def append(self, record: RoundRecord) -> None:
        self.rounds.append(record)

    def __len__(self) -> int:
        return len(self.rounds)

    def __getitem__(self, index: int) -> RoundRecord:
        return self.rounds[index]

    @property
    def every_round_failed(self) -> bool:
        """True if no round changed the model and at least one failed.

        What a command should exit non-zero on: the run trained nothing. A run
        that a mod stopped before its first round (a spent privacy budget) is
        not counted as failed.
        """
        return any(r.failed for r in self.rounds) and not any(r.ok for r in self.rounds)

    def round(self, number: int) -> RoundRecord:
        """The record of round ``number`` (rounds count from 1; indexing counts from 0)."""
        for record in self.rounds:
            if record.round == number:
                return record
        raise NotFoundError(f"no round {number} in this history (it has {len(self.rounds)})")

    def metric(self, name: str, *, source: str = "server_metrics") -> list[tuple[int, float]]:
        """``(round, value)`` for every round that reported ``name`` in ``source``.

        ``source`` is one of ``train_metrics``, ``evaluate_metrics`` or
        ``server_metrics``.
        """
        one_of("source", source, _SOURCES)
        out = []
        for record in self.rounds:
            values: dict[str, float] = getattr(record, source)
            if name in values:
                out.append((record.round, values[name]))
        return out

    def last(self, name: str, *, source: str = "server_metrics") -> float:
        """The latest reported value of ``name`` (NaN if none was)."""
        values = self.metric(name, source=source)
        return values[-1][1] if values else math.nan

    def to_dicts(self) -> list[dict[str, Any]]:
        return [record.to_dict() for record in self.rounds]

    def to_json_dicts(self) -> list[dict[str, Any]]:
        """Every round, losslessly (:meth:`RoundRecord.to_json_dict`)."""
        return [record.to_json_dict() for record in self.rounds]

    @classmethod
    def from_json_dicts(cls, data: list[Mapping[str, Any]]) -> History:
        """The history :meth:`to_json_dicts` wrote."""
        return cls([RoundRecord.from_json_dict(item) for item in data])
