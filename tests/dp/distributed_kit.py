"""A federation for the distributed-DP tests: known updates, SecAgg+, and the server's view.

``federate`` runs DistributedDp over SecAgg+ in a simulation whose grid records every
message the server sent and received (what a dishonest server holds), while a spy
between SecAgg+'s client mod and DistributedDpMod keeps each node's plain residues
(what only the node may see), and a spy between DistributedDp and SecAgg+ keeps the
residues' sum SecAgg+ unmasked.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from flowerpets.core import (
    ArrayRecord,
    ClientApp,
    Context,
    FedAvg,
    Message,
    MetricRecord,
    RecordDict,
    RoundRequest,
    RoundResult,
    ServerApp,
    ServerContext,
)
from flowerpets.core.records import Array
from flowerpets.dp import DistributedDp, DistributedDpMod
from flowerpets.dp._protocol import ENCODING_KEY, RESIDUES
from flowerpets.dp.distributed._round_config import RoundEncoding
from flowerpets.secagg import SecAggPlus, secaggplus_mod
from flowerpets.simulation import Fault, FaultPlan, SimulationGrid
from flowerpets.simulation.run import SimulationResult
from tests.he.conftest import RecordingGrid as HeRecordingGrid

NODES = 8
RUN_ID = 7


def steady(dimension: int, norm: float = 0.5) -> Callable[[int, int], np.ndarray]:
    """Each node's update: a fixed direction of L2 norm ``norm * (pid + 1) / NODES`` (under
    a clip of ``norm``: nothing is clipped, so the true sum is known exactly)."""
    base = np.cos(np.arange(dimension) * 0.37)
    base /= np.linalg.norm(base)

    def delta(pid: int, rnd: int) -> np.ndarray:
        return np.asarray(base * norm * (pid + 1) / NODES, dtype=np.float64)

    return delta


class RecordingGrid(HeRecordingGrid):
    """Keeps every request the server sent and every reply it received."""

    def encodings(self) -> list[RoundEncoding]:
        """The distributed-DP encoding of every round, as the nodes received it."""
        found: dict[int, RoundEncoding] = {}
        for msg in self.sent:
            for record in _records(msg):
                text = record.get(ENCODING_KEY) if hasattr(record, "get") else None
                if isinstance(text, str):
                    found.setdefault(msg.round, RoundEncoding.from_json(text))
        return [found[r] for r in sorted(found)]


def _records(msg: Message) -> list[Any]:
    content = msg.content
    return [] if content is None else list(content.values())


def arrays_seen(messages: Sequence[Message]) -> list[np.ndarray]:
    """Every array in ``messages`` (the server's view of them)."""
    out = []
    for msg in messages:
        for record in _records(msg):
            if isinstance(record, ArrayRecord):
                out.extend(np.asarray(a.numpy()) for a in record.values())
    return out


@dataclass
class Spies:
    """What the test sees that the server must not (the nodes' residues) or only summed."""

    residues: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)  # (round, pid)
    sums: dict[int, np.ndarray] = field(default_factory=dict)  # round -> unmasked residue sum
    participants: dict[int, tuple[int, ...]] = field(default_factory=dict)

    def client_spy(self, msg: Message, context: Context, call_next: Any) -> Message:
        reply: Message = call_next(msg, context)
        if reply.error is None and reply.content is not None and "arrays" in reply.content:
            arrays = reply.content.get_typed("arrays", ArrayRecord)
            if RESIDUES in arrays:
                pid = context.node_config["partition-id"]
                assert isinstance(pid, int)
                self.residues[(msg.round, pid)] = np.asarray(arrays[RESIDUES].numpy()).copy()
        return reply

    def server_spy(
        self,
        request: RoundRequest,
        context: ServerContext,
        call_next: Callable[[RoundRequest, ServerContext], RoundResult],
    ) -> RoundResult:
        result = call_next(request, context)
        if RESIDUES in result.aggregate:
            self.sums[request.round] = np.asarray(result.aggregate[RESIDUES].numpy()).copy()
            self.participants[request.round] = result.participants
        return result


@dataclass
class Federation:
    result: SimulationResult | Any
    grid: RecordingGrid
    spies: Spies
    ids: list[int]
    model: np.ndarray

    def pid(self, node: int) -> int:
        return self.ids.index(node)


def client_app(
    delta: Callable[[int, int], np.ndarray], spies: Spies, dp_mod: Any = None, secure: bool = True
) -> ClientApp:
    inner = dp_mod if dp_mod is not None else DistributedDpMod()
    mods = [secaggplus_mod, spies.client_spy, inner] if secure else [spies.client_spy, inner]
    app = ClientApp(mods=mods)

    @app.train()
    def train(msg: Message, context: Context) -> RecordDict:
        pid = context.node_config["partition-id"]
        assert isinstance(pid, int)
        arrays = msg.require_content().get_typed("arrays", ArrayRecord)
        ((name, array),) = arrays.items()
        new = ArrayRecord({name: Array(np.asarray(array.numpy()) + delta(pid, msg.round))})
        return RecordDict({"arrays": new, "metrics": MetricRecord({"num-examples": 1})})

    return app


def federate(
    dp: DistributedDp,
    *,
    dimension: int = 16,
    rounds: int = 1,
    faults: Sequence[Fault] = (),
    secagg: SecAggPlus | None = None,
    delta: Callable[[int, int], np.ndarray] | None = None,
    dp_mod: Any = None,
    nodes: int = NODES,
    store: Any = None,
    on_round: Any = None,
) -> Federation:
    spies = Spies()
    step = delta or steady(dimension)
    model = np.linspace(-0.5, 0.5, dimension)
    server = ServerApp(
        strategy=FedAvg(),
        num_rounds=rounds,
        initial_arrays=ArrayRecord({"w": model}),
        mods=[dp, spies.server_spy, secagg or SecAggPlus()],
        seed=0,
        store=store,
    )
    contexts = [
        Context(
            node_id=101 + i,
            run_id=RUN_ID,
            node_config={"partition-id": i, "num-partitions": nodes},
        )
        for i in range(nodes)
    ]
    app = client_app(step, spies, dp_mod)
    with SimulationGrid(
        app, contexts, run_id=RUN_ID, faults=FaultPlan(faults), max_workers=1
    ) as inner:
        grid = RecordingGrid(inner)
        result = server.run(grid, on_round=on_round)
    return Federation(
        result=result, grid=grid, spies=spies, ids=[c.node_id for c in contexts], model=model
    )
