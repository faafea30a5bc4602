"""Apps for the HE store test: a CKKS run whose server process dies at one phase of a round.

``--app he_store_apps:server_app`` builds a :data:`ROUNDS`-round FedAvg run
behind :class:`~flowerpets.he.HomomorphicAggregation`, with federated
evaluation. With the environment variable :data:`KILL_ENV` set to a phase of
:data:`tests.store.faulty_runs.PHASES`, the server process SIGKILLs itself
there in round :data:`~tests.store.faulty_runs.KILL_ROUND` (the hooks of the
store's fault tests, but ``mid-collection``: here the nodes are processes of
their own, so it is the server that dies once it has received the first
update of the round, the others still to come).

``--app he_store_apps:client_app``: node ``partition-id = p`` moves the model
it opens by ``(p + 1) * [1, 2, ..., SIZE]`` with weight ``p + 1``, so each
round adds ``sum (p+1)^2 / sum (p+1)`` times that vector to the model; its
evaluation reports the opened model's entries as metrics ``w-0``, ``w-1``, ...
(the only way the test reads a model that only the nodes can open).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from flowerpets import core
from flowerpets.core import ArrayRecord, Context, Message, RecordDict
from tests.store import faulty_runs

ROUNDS, SIZE = 4, 6
KILL_ENV = "FLOWERPETS_TEST_KILL_PHASE"


def step(nodes: int) -> np.ndarray:
    """What one round adds to the model with ``nodes`` nodes (partition ids 0..nodes-1)."""
    weights = np.arange(1, nodes + 1, dtype=np.float64)
    return np.arange(1, SIZE + 1) * float((weights**2).sum() / weights.sum())


def opened(metrics: dict[str, float]) -> np.ndarray:
    """The model a node opened, from its evaluation's metrics."""
    return np.array([metrics[f"w-{i}"] for i in range(SIZE)])


def client_app(context: Context | None = None) -> core.ClientApp:
    from flowerpets.he import ckks_mod

    app = core.ClientApp(mods=[ckks_mod])

    def model(msg: Message) -> np.ndarray:
        return msg.require_content().get_typed("arrays", ArrayRecord)["w"].numpy()

    @app.train()
    def train(msg: Message, ctx: Context) -> RecordDict:
        weight = int(ctx.node_config["partition-id"]) + 1  # type: ignore[arg-type]
        update = model(msg) + weight * np.arange(1, SIZE + 1, dtype=np.float32)
        return RecordDict(
            {
                "arrays": ArrayRecord({"w": update.astype(np.float32)}),
                "metrics": core.MetricRecord({"num-examples": weight}),
            }
        )

    @app.evaluate()
    def evaluate(msg: Message, ctx: Context) -> RecordDict:
        values = {f"w-{i}": float(v) for i, v in enumerate(model(msg))}
        return RecordDict({"metrics": core.MetricRecord({"num-examples": 1, **values})})

    return app


class _KillingGrid:
    """The server's grid, but the process dies once the first train reply of a round came."""

    def __init__(self, grid: Any) -> None:
        self._grid = grid

    @property
    def run_id(self) -> int:
        return int(self._grid.run_id)

    def node_ids(self) -> Sequence[int]:
        return list(self._grid.node_ids())

    def send_and_receive(
        self, messages: Sequence[Message], *, timeout: float | None = None
    ) -> Iterator[Message]:
        for reply in self._grid.send_and_receive(messages, timeout=timeout):
            if reply.message_type == "train":
                faulty_runs.die()
            yield reply


def _kill_mid_collection(
    request: core.RoundRequest, context: core.ServerContext, call_next: Any
) -> Any:
    if request.round == faulty_runs.KILL_ROUND:
        context.grid = _KillingGrid(context.require_grid())
    return call_next(request, context)


def server_app(run_config: core.ConfigRecord) -> core.ServerApp:
    from flowerpets.he import HomomorphicAggregation

    phase = os.environ.get(KILL_ENV, "none")
    mods: list[core.ServerMod] = []
    if phase == "before-send":
        mods.append(faulty_runs._kill_before_send)
    if phase == "mid-collection":
        mods.append(_kill_mid_collection)
    if phase == "mid-commit":
        faulty_runs._kill_inside_the_commit()
    mods.append(HomomorphicAggregation())
    strategy = faulty_runs._KillingFedAvg if phase == "after-aggregation" else core.FedAvg
    return core.ServerApp(
        strategy=strategy(evaluate_sampling=core.FullParticipation(), round_timeout=60.0),
        num_rounds=ROUNDS,
        initial_arrays=ArrayRecord({"w": np.zeros(SIZE, np.float32)}),
        mods=mods,
    )
