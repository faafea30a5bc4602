"""Shared helpers for the HE tests: a small federation whose every message is recorded.

Exposed through the ``kit`` fixture (test modules cannot import each other), beside
``secret``, ``public`` and ``blob``: a key, the server's context and one ciphertext.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import tenseal as ts

from flowerpets import (
    ArrayRecord,
    ClientApp,
    ClientMod,
    ConfigValue,
    Context,
    FedAvg,
    FullParticipation,
    Message,
    MetricRecord,
    RecordDict,
    RunResult,
    ServerApp,
    ServerMod,
)
from flowerpets.he import COMPACT
from flowerpets.he._primitives.params import new_secret_context, public_context_bytes
from flowerpets.simulation import FaultPlan, SimulationGrid
from flowerpets.simulation.faults import Fault, step_of

RUN_ID = 1


def model() -> dict[str, np.ndarray]:
    """2,107 values: two ciphertexts of 2,048 slots (the bias shares the second one)."""
    rng = np.random.default_rng(0)
    return {
        "w": rng.standard_normal((30, 70)),
        "b": rng.standard_normal(7).astype(np.float32),
    }


def delta(pid: int, round: int, name: str, shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng([pid, round, len(name)]).standard_normal(shape)


def weight(pid: int) -> int:
    return pid + 1


def client_app(
    mods: Sequence[ClientMod] = (), *, weights: Callable[[int], int] = weight
) -> ClientApp:
    """Each node returns ``global + delta(pid, round)`` with weight ``weights(pid)``.

    The evaluate handler reports the first value of each array it received.
    """
    app = ClientApp(mods=mods)

    @app.train()
    def train(msg: Message, context: Context) -> RecordDict:
        pid = int(context.node_config["partition-id"])  # type: ignore[arg-type]
        arrays = msg.require_content().get_typed("arrays", ArrayRecord)
        out = {
            name: (a.numpy() + delta(pid, msg.round, name, a.shape)).astype(a.dtype)
            for name, a in arrays.items()
        }
        metrics = MetricRecord({"num-examples": weights(pid)})
        return RecordDict({"arrays": ArrayRecord.from_numpy(out), "metrics": metrics})

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> RecordDict:
        arrays = msg.require_content().get_typed("arrays", ArrayRecord)
        firsts = {f"first-{n}": float(a.numpy().ravel()[0]) for n, a in arrays.items()}
        return RecordDict({"metrics": MetricRecord({"num-examples": 1, **firsts})})

    return app


def expected_model(
    rounds: Iterable[tuple[int, Sequence[int]]],
    start: Mapping[str, np.ndarray] | None = None,
    weights: Callable[[int], int] = weight,
) -> dict[str, np.ndarray]:
    """FedAvg in float64 over ``(round, participating partition ids)``."""
    current = {n: np.asarray(a, np.float64) for n, a in (start or model()).items()}
    for rnd, pids in rounds:
        total = sum(weights(p) for p in pids)
        current = {
            n: sum(weights(p) * (a + delta(p, rnd, n, a.shape)) for p in pids) / total
            for n, a in current.items()
        }
    return current


def server_app(
    mods: Sequence[ServerMod], *, rounds: int = 1, evaluate: bool = False, initial: Any = None
) -> ServerApp:
    return ServerApp(
        strategy=FedAvg(evaluate_sampling=FullParticipation() if evaluate else None),
        num_rounds=rounds,
        initial_arrays=ArrayRecord.from_numpy(initial if initial is not None else model()),
        mods=mods,
        seed=0,
    )


class RecordingGrid:
    """A SimulationGrid that keeps every request and reply it carried (the server's view)."""

    def __init__(self, inner: SimulationGrid) -> None:
        self.inner = inner
        self.sent: list[Message] = []
        self.received: list[Message] = []
        self.on_reply: Callable[[Message], None] | None = None

    @property
    def run_id(self) -> int:
        return self.inner.run_id

    def node_ids(self) -> Sequence[int]:
        return self.inner.node_ids()

    def send_and_receive(
        self, messages: Sequence[Message], *, timeout: float | None = None
    ) -> Iterator[Message]:
        self.sent.extend(messages)
        for reply in self.inner.send_and_receive(messages, timeout=timeout):
            if self.on_reply is not None:
                self.on_reply(reply)
            self.received.append(reply)
            yield reply

    def stages(self) -> list[tuple[int, str]]:
        """``(round, stage or type)`` of every request, in order, without repeats."""
        seen: list[tuple[int, str]] = []
        for msg in self.sent:
            step = (msg.round, step_of(msg.metadata))
            if step not in seen:
                seen.append(step)
        return seen


@dataclass
class Run:
    result: RunResult
    contexts: list[Context]
    grid: RecordingGrid
    ids: list[int] = field(default_factory=list)

    def pid(self, node_id: int) -> int:
        return self.ids.index(node_id)

    def pids(self, nodes: Iterable[int]) -> list[int]:
        return sorted(self.pid(n) for n in nodes)


def run(
    server: ServerApp,
    client: ClientApp,
    num_nodes: int,
    *,
    faults: Iterable[Fault] = (),
    node_config: Callable[[int], Mapping[str, ConfigValue]] | None = None,
    record_replies: bool = True,
    wrap: Callable[[SimulationGrid], Any] | None = None,
) -> Run:
    """Like ``run_simulation``, with node ids 101, 102, ... and a recording grid.

    ``wrap`` puts a grid of the test's own (one that reorders replies, say)
    between the simulation and the recording grid.
    """
    contexts = [
        Context(
            node_id=101 + i,
            run_id=RUN_ID,
            node_config={
                "partition-id": i,
                "num-partitions": num_nodes,
                **(node_config(i) if node_config else {}),
            },
        )
        for i in range(num_nodes)
    ]
    with SimulationGrid(
        client, contexts, run_id=RUN_ID, faults=FaultPlan(faults), max_workers=2
    ) as inner:
        grid = RecordingGrid(wrap(inner) if wrap is not None else inner)
        if not record_replies:
            grid.received = _Discard()  # type: ignore[assignment]
        result = server.run(grid)
    return Run(result=result, contexts=contexts, grid=grid, ids=[c.node_id for c in contexts])


class _Discard(list):  # type: ignore[type-arg]
    def append(self, item: object) -> None:
        return None


# One COMPACT key, the server's context of it, and a ciphertext of 2,048 values under it.
@pytest.fixture(scope="module")
def secret() -> ts.Context:
    return new_secret_context(COMPACT)


@pytest.fixture(scope="module")
def public(secret: ts.Context) -> ts.Context:
    return ts.context_from(public_context_bytes(secret))


@pytest.fixture(scope="module")
def blob(secret: ts.Context) -> bytes:
    data: bytes = ts.ckks_vector(secret, np.linspace(-1, 1, COMPACT.slots)).serialize()
    return data


@pytest.fixture(scope="session")
def kit() -> SimpleNamespace:
    return SimpleNamespace(
        model=model,
        delta=delta,
        weight=weight,
        client_app=client_app,
        server_app=server_app,
        expected_model=expected_model,
        run=run,
        RecordingGrid=RecordingGrid,
    )
