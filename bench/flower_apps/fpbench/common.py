"""What every case shares: the nodes' updates, the exact mean, and the timed ServerApp.

Every node replies with the same update in every case (node ``i``: uniform
values in [-1, 1) from seed ``(2026, i)``, weight ``i + 1``), so every case's
aggregate is the same weighted mean. :func:`timed` waits until ``nodes``
SuperNodes are connected, then times one round (first message out to the
aggregate in hand, on the ServerApp's clock) and writes, as JSON to the run
config's ``result-file``: the seconds, the largest error against the exact
weighted mean with the bound it must stay within, and the case's own figures.
"""

from __future__ import annotations

import functools
import importlib
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import flwr.serverapp
import numpy as np
from flwr import app as fl
from flwr.serverapp import Grid
from numpy.typing import NDArray

SEED = 2026
FLOAT32_BOUND = 1e-6  # a weighted mean of values in [-1, 1) computed in float32, or better
# Every case hands back a float32 model: its own rounding to float32 comes on top of any bound.
FLOAT32_SLACK = 2 * float(np.finfo(np.float32).eps)

Round = Callable[[Grid, fl.Context], tuple[NDArray[Any], float, dict[str, Any]]]
"""One round: the aggregate, the error bound it must meet, and the case's own figures."""


def sizes(context: fl.Context) -> tuple[int, int]:
    """The run's ``nodes`` and ``params``."""
    return int(context.run_config["nodes"]), int(context.run_config["params"])


def node_update(pid: int, params: int) -> NDArray[np.float32]:
    """What node ``pid`` replies in every case."""
    rng = np.random.default_rng([SEED, pid])
    return rng.uniform(-1.0, 1.0, params).astype(np.float32)


def node_weight(pid: int) -> int:
    return pid + 1


def expected_mean(nodes: int, params: int) -> NDArray[np.float64]:
    """The exact weighted mean of every node's update."""
    total = np.zeros(params, np.float64)
    for pid in range(nodes):
        total += node_weight(pid) * node_update(pid, params).astype(np.float64)
    return total / sum(node_weight(pid) for pid in range(nodes))


def partition_id(context: fl.Context) -> int:
    return int(context.node_config["partition-id"])


def flwr_train(msg: fl.Message, context: fl.Context) -> fl.Message:
    """A plain flwr train handler: this node's update and weight."""
    pid = partition_id(context)
    params = int(context.run_config["params"])
    content = fl.RecordDict(
        {
            "arrays": fl.ArrayRecord({"w": fl.Array(node_update(pid, params))}),
            "metrics": fl.MetricRecord({"num-examples": node_weight(pid)}),
        }
    )
    return fl.Message(content, reply_to=msg)


@functools.cache
def secagg_graph(nodes: int) -> tuple[int, int]:
    """Our SecAgg+ degree and threshold for the cohort (both SecAgg+ cases use them)."""
    from flowerpets.secagg import find_parameters

    found = find_parameters(nodes)
    return found.degree, found.threshold


def timed(
    name: str, run: Round, warm: Sequence[str] = (), before: Callable[[int], object] | None = None
) -> flwr.serverapp.ServerApp:
    """A ServerApp that waits for every node, then times ``run`` and writes the result file.

    Untimed, first: the modules ``warm`` names are imported (the server side's one-time
    cost in a ServerApp process, not a round's), then ``before(nodes)`` runs (set-up the
    bench needs but the case does not).
    """
    app = flwr.serverapp.ServerApp()

    @app.main()
    def main(grid: Grid, context: fl.Context) -> None:
        nodes, params = sizes(context)
        for module in warm:
            importlib.import_module(module)
        if before is not None:
            before(nodes)
        deadline = time.monotonic() + 120
        while len(list(grid.get_node_ids())) < nodes and time.monotonic() < deadline:
            time.sleep(0.1)
        started = time.perf_counter()
        aggregate, bound, extra = run(grid, context)
        seconds = time.perf_counter() - started
        got = np.asarray(aggregate, np.float64)
        error = float(np.max(np.abs(got - expected_mean(nodes, params))))
        out = {
            "case": name,
            "seconds": seconds,
            "nodes": nodes,
            "params": int(got.size),
            "max_abs_error": error,
            "error_bound": bound,
            "within_bound": error <= bound + FLOAT32_SLACK,
            **extra,
        }
        Path(str(context.run_config["result-file"])).write_text(json.dumps(out), encoding="utf-8")

    return app
