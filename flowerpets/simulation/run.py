"""run_simulation: a whole federation in one process."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from flowerpets._validation import integer
from flowerpets.core import (
    ArrayRecord,
    ClientApp,
    ConfigRecord,
    ConfigValue,
    Context,
    History,
    NodeBudget,
    RoundRecord,
    ServerApp,
)
from flowerpets.exceptions import IncompatibleModsError, NotFoundError, ParameterValueError
from flowerpets.simulation.faults import Fault, FaultPlan
from flowerpets.simulation.grid import SimulationGrid

__all__ = ["SimulationResult", "run_simulation"]

NodeConfigFn = Callable[[int], Mapping[str, ConfigValue]]


@dataclass(slots=True)
class SimulationResult:
    """The final global arrays, the history, and every node's context (for inspection)."""

    arrays: ArrayRecord
    history: History
    contexts: list[Context]
    dropped: frozenset[int]
    stopped: str | None = None

    @property
    def node_ids(self) -> list[int]:
        """Node ids, by node index (``partition-id``)."""
        return [c.node_id for c in self.contexts]

    def node_index(self, node_id: int) -> int:
        """The index (``partition-id``) of the node with id ``node_id``.

        Histories key failures by node id; fault plans name nodes by index.
        """
        for index, context in enumerate(self.contexts):
            if context.node_id == node_id:
                return index
        raise NotFoundError(f"no node with id {node_id} in this simulation")


def _refuse_node_budgets(client_app: ClientApp) -> None:
    kept = [type(mod).__name__ for mod in client_app.mods if isinstance(mod, NodeBudget)]
    if kept:
        raise IncompatibleModsError(
            f"a run store cannot keep the privacy budget of {', '.join(kept)}: each node keeps "
            "it in its own context, which the server's store does not hold, and a resumed "
            "simulation rebuilds its nodes, so every node would count its epsilon from 0 "
            "again; use central DP (CentralDp keeps its budget in the store) or run without "
            "a store"
        )


def _node_ids(num_nodes: int, rng: np.random.Generator) -> list[int]:
    # Random, distinct, non-zero 63-bit ids, as a deployment would assign.
    ids: set[int] = set()
    while len(ids) < num_nodes:
        ids.update(int(x) for x in rng.integers(1, 2**63 - 1, size=num_nodes - len(ids)))
    return sorted(ids, key=lambda _: rng.random())


def _given_ids(node_ids: Sequence[int], num_nodes: int) -> list[int]:
    ids = [integer("node id", node, at_least=1) for node in node_ids]
    if len(ids) != num_nodes or len(set(ids)) != num_nodes:
        raise ParameterValueError(f"node_ids must be {num_nodes} distinct ids, got {len(ids)}")
    return ids


def run_simulation(
    server_app: ServerApp,
    client_app: ClientApp,
    num_nodes: int,
    *,
    node_config: NodeConfigFn | None = None,
    node_ids: Sequence[int] | None = None,
    run_config: Mapping[str, ConfigValue] | None = None,
    seed: int | None = None,
    faults: FaultPlan | Iterable[Fault] | None = None,
    max_workers: int | None = None,
    run_id: int = 1,
    on_round: Callable[[RoundRecord], None] | None = None,
) -> SimulationResult:
    """Run ``server_app`` against ``num_nodes`` nodes running ``client_app``.

    Node ``i`` gets ``partition-id = i`` and ``num-partitions = num_nodes`` in
    its node config, plus whatever ``node_config(i)`` returns. ``node_ids`` fixes
    the nodes' ids (one per node, distinct; e.g. those a PKI enrolled, see
    ``flowerpets.secagg.enroll``); by default they are drawn. ``seed`` makes the
    run reproducible: it fixes the node ids, the server's cohort sampling
    (unless the ServerApp has its own seed) and is passed to every node as
    ``run_config["seed"]`` for its own generators. Without a seed, all of these
    come from the OS's secure source.

    The nodes are built anew for every call, their contexts empty: a ServerApp
    with a run store that resumes a run here continues the server's state only.
    A client mod that keeps a privacy budget in its node's context
    (:class:`~flowerpets.core.NodeBudget`, such as ``LocalDpMod``) is therefore
    refused with a store (``IncompatibleModsError``): resumed, every node would
    count its epsilon from 0 again.
    """
    integer("num_nodes", num_nodes, at_least=1)
    if server_app.store is not None:
        _refuse_node_budgets(client_app)
    plan = faults if isinstance(faults, FaultPlan) else FaultPlan(faults or ())
    rng = np.random.default_rng(seed)
    config = dict(run_config or {})
    if seed is not None:
        config.setdefault("seed", seed)
    contexts = []
    ids = _node_ids(num_nodes, rng) if node_ids is None else _given_ids(node_ids, num_nodes)
    for index, node_id in enumerate(ids):
        node_cfg: dict[str, ConfigValue] = {"partition-id": index, "num-partitions": num_nodes}
        if node_config is not None:
            node_cfg.update(node_config(index))
        contexts.append(
            Context(
                node_id=node_id,
                run_id=run_id,
                node_config=ConfigRecord(node_cfg),
                run_config=ConfigRecord(config),
            )
        )
    with SimulationGrid(
        client_app, contexts, run_id=run_id, faults=plan, max_workers=max_workers
    ) as grid:
        result = server_app.run(grid, run_config=config, on_round=on_round, seed=seed)
        dropped = grid.dropped
    return SimulationResult(
        arrays=result.arrays,
        history=result.history,
        contexts=contexts,
        dropped=frozenset(grid.node_index(node) for node in dropped),
        stopped=result.stopped,
    )
