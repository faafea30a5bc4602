"""Shared helpers for the Flower-bridge tests, exposed as the ``kit`` fixture.

``LocalFlwrGrid`` is a flwr ``Grid`` that runs a real ``flwr.clientapp.ClientApp``
per node in this process: it ships the app through cloudpickle (as flwr's Ray
workers do), sends every message and reply through flwr's protobuf serde (as its
SuperLink does), keeps each node's flwr ``Context`` between messages, and answers
one message per pull, so replies stream. Fast tests of the whole bridge without Ray.
"""

from __future__ import annotations

import pickle
import uuid
from collections.abc import Iterable, Sequence
from types import SimpleNamespace
from typing import Any

import cloudpickle
import numpy as np
import pytest
from flwr import app as fl
from flwr.clientapp import ClientApp as FlwrClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.serverapp import Grid as FlwrGrid
from flwr.supercore.task_identity import TaskIdentity

from flowerpets.core import (
    ArrayRecord,
    ClientApp,
    ClientMod,
    FedAvg,
    MetricRecord,
    RecordDict,
    ServerApp,
    ServerMod,
)
from flowerpets.flower import FlowerServerApp, server_app


def wire(message: fl.Message) -> fl.Message:
    """``message`` after a trip through flwr's protobuf serde (what a SuperLink carries)."""
    return message_from_proto(message_to_proto(message))


class LocalFlwrGrid(FlwrGrid):
    """A flwr Grid whose nodes run ``client_app`` in this process (see the module docstring).

    ``silent``: partition ids that stop answering from the first message whose
    ``group_id`` ends with ``silent_from`` (the SuperLink then reports them gone).
    """

    def __init__(
        self,
        client_app: FlwrClientApp,
        n: int,
        *,
        run_id: int = 7,
        silent: Sequence[int] = (),
        silent_from: str = "",
        base_node_id: int = 2**63 + 5,  # flwr's node ids are uint64: exercise the top bit
    ) -> None:
        self.app: FlwrClientApp = pickle.loads(cloudpickle.dumps(client_app))
        self.node_ids = [base_node_id + 7919 * i for i in range(n)]
        self.contexts = {
            node: fl.Context(
                run_id=run_id,
                node_id=node,
                node_config={"partition-id": i, "num-partitions": n},
                state=fl.RecordDict(),
                run_config={},
            )
            for i, node in enumerate(self.node_ids)
        }
        self.silent = {self.node_ids[i] for i in silent}
        self.silent_from = silent_from
        self.gone: set[int] = set()
        self._run = SimpleNamespace(run_id=run_id)
        self._inbox: dict[str, fl.Message] = {}
        self.pushed: list[fl.Message] = []
        self.pulls = 0

    def set_run(self, run: Any) -> None:
        self._run = run

    @property
    def run(self) -> Any:
        return self._run

    def create_message(self, *args: Any, **kwargs: Any) -> fl.Message:
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[fl.Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            self.pushed.append(msg)
            self._inbox[msg.metadata.message_id] = wire(msg)
            ids.append(msg.metadata.message_id)
        return ids

    def _answer(self, msg: fl.Message) -> fl.Message | None:
        node = msg.metadata.dst_node_id
        if node in self.silent and msg.metadata.group_id.endswith(self.silent_from):
            self.gone.add(node)
        if node in self.gone:
            return fl.Message(fl.Error(code=5, reason="the node is gone"), reply_to=msg)
        context = pickle.loads(pickle.dumps(self.contexts[node]))  # as a worker gets it
        try:
            reply = self.app(msg, context)
        except Exception as exc:  # what flwr's runtime does with a ClientApp's exception
            return fl.Message(fl.Error(code=2, reason=repr(exc)), reply_to=msg)
        self.contexts[node] = context
        return reply

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[fl.Message]:
        self.pulls += 1
        for mid in message_ids:
            msg = self._inbox.pop(mid, None)
            if msg is None:
                continue
            reply = self._answer(msg)
            if reply is None:
                return []
            reply.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            return [wire(reply)]
        return []

    def send_and_receive(self, messages: Iterable[fl.Message], **_: Any) -> Iterable[fl.Message]:
        raise AssertionError("the bridge must stream with push_messages/pull_messages")


def numpy_client(mods: Sequence[ClientMod] = ()) -> ClientApp:
    """Our ClientApp: node ``p`` adds seeded normals to each array; it weighs ``p + 1``."""
    app = ClientApp(mods=mods)

    @app.train()
    def train(msg: Any, context: Any) -> RecordDict:
        pid = int(context.node_config["partition-id"])
        arrays = msg.require_content().get_typed("arrays", ArrayRecord)
        rng = np.random.default_rng([7, pid, msg.round])
        out = {n: (a.numpy() + rng.normal(size=a.shape)).astype(a.dtype) for n, a in arrays.items()}
        metrics = MetricRecord({"num-examples": pid + 1})
        return RecordDict({"arrays": ArrayRecord.from_numpy(out), "metrics": metrics})

    return app


def flwr_train(msg: fl.Message, context: fl.Context) -> fl.Message:
    """The same training as ``numpy_client``, written as plain Flower code."""
    pid = int(context.node_config["partition-id"])
    rnd = int(msg.metadata.group_id)
    arrays = msg.content["arrays"]
    rng = np.random.default_rng([7, pid, rnd])
    out = {
        n: (a.numpy() + rng.normal(size=a.shape)).astype(a.numpy().dtype) for n, a in arrays.items()
    }
    content = fl.RecordDict(
        {
            "arrays": fl.ArrayRecord({n: fl.Array(v) for n, v in out.items()}),
            "metrics": fl.MetricRecord({"num-examples": pid + 1}),
        }
    )
    return fl.Message(content, reply_to=msg)


def initial(size: int = 10) -> ArrayRecord:
    return ArrayRecord.from_numpy(
        {"w": np.zeros(size, np.float32), "b": np.arange(3, dtype=np.float32)}
    )


def numpy_server(mods: Sequence[ServerMod] = (), *, rounds: int = 2, size: int = 10) -> ServerApp:
    return ServerApp(
        strategy=FedAvg(), num_rounds=rounds, initial_arrays=initial(size), mods=mods, seed=1
    )


def run_bridge(
    app: ServerApp, grid: LocalFlwrGrid, run_config: dict[str, Any] | None = None
) -> FlowerServerApp:
    """Run our ``app`` as a flwr ServerApp over ``grid``; the app keeps the result."""
    flwr_app = server_app(app, min_nodes=len(grid.node_ids), node_timeout=5)
    context = fl.Context(
        run_id=grid.run.run_id,
        node_id=0,
        node_config={},
        state=fl.RecordDict(),
        run_config=run_config or {},
    )
    flwr_app(grid, context)
    return flwr_app


@pytest.fixture(autouse=True)
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """What flwr's runtime sets in a ServerApp process; flwr's Message() reads it."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 7)
    monkeypatch.setattr(TaskIdentity, "_node_id", SUPERLINK_NODE_ID)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


@pytest.fixture
def kit() -> SimpleNamespace:
    return SimpleNamespace(
        LocalFlwrGrid=LocalFlwrGrid,
        flwr_train=flwr_train,
        initial=initial,
        numpy_client=numpy_client,
        numpy_server=numpy_server,
        run_bridge=run_bridge,
        wire=wire,
    )
