"""Helpers for the DP tests: a synchronous grid, and apps whose updates are known exactly."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import pytest

from flowerpets.core import (
    ArrayRecord,
    ClientApp,
    ClientMod,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)


class ScriptedGrid:
    """Nodes answer synchronously, in order; ``silent`` node indices never answer.

    ``sent`` keeps every message sent and ``replies`` every reply as it left its node
    (what the wire carries).
    """

    def __init__(self, app: ClientApp, n: int, silent: Sequence[int] = ()) -> None:
        self.app = app
        self.contexts = {
            i + 1: Context(node_id=i + 1, node_config={"partition-id": i}) for i in range(n)
        }
        self.silent = {i + 1 for i in silent}
        self.sent: list[Message] = []
        self.replies: list[Message] = []

    @property
    def run_id(self) -> int:
        return 0

    def node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(
        self, messages: Sequence[Message], *, timeout: float | None = None
    ) -> Iterator[Message]:
        self.sent.extend(messages)
        for msg in messages:
            node = msg.metadata.dst_node_id
            if node in self.silent:
                continue
            reply = self.app(msg.with_private_content(), self.contexts[node])
            self.replies.append(reply)
            yield reply

    def sent_in_round(self, rnd: int) -> int:
        return sum(1 for m in self.sent if m.metadata.round == rnd)


@dataclass
class UpdateApp:
    """A ClientApp whose train handler returns received + ``delta(pid, round)``."""

    delta: Callable[[int, int], dict[str, np.ndarray]]
    mods: Sequence[ClientMod] = ()
    weight: Callable[[int], int] = lambda pid: 10 + pid
    calls: list[tuple[int, int]] = field(default_factory=list)

    def build(self) -> ClientApp:
        app = ClientApp(mods=self.mods)

        @app.train()
        def train(msg: Message, context: Context) -> RecordDict:
            pid = context.node_config["partition-id"]
            assert isinstance(pid, int)
            self.calls.append((pid, msg.round))
            arrays = msg.require_content().get_typed("arrays", ArrayRecord)
            step = self.delta(pid, msg.round)
            new = {n: np.asarray(a.numpy()) + step[n] for n, a in arrays.items()}
            metrics = MetricRecord({"num-examples": self.weight(pid), "train-loss": float(pid)})
            return RecordDict({"arrays": ArrayRecord(new), "metrics": metrics})

        return app


@pytest.fixture
def scripted_grid() -> type[ScriptedGrid]:
    return ScriptedGrid


@pytest.fixture
def update_app() -> type[UpdateApp]:
    return UpdateApp
