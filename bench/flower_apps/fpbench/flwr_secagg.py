"""Flower's own SecAgg+ round: ``SecAggPlusWorkflow`` and ``flwr.client.mod.secaggplus_mod``.

Its ``secaggplus_mod`` reads the reply as a legacy ``FitRes``, so the nodes run
a ``NumPyClient`` through ``client_fn``; the server runs
``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))`` over the legacy
FedAvg, with no evaluation and the initial parameters given (no extra
``get_parameters`` message). Same graph as ours: ``num_shares = k + 1`` (each
node keeps one of its shares) and ``reconstruction_threshold = t + 1``.
"""

from __future__ import annotations

from typing import Any

import flwr.clientapp
import numpy as np
from flwr import app as fl
from flwr.client import Client, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.serverapp import Grid
from numpy.typing import NDArray

from fpbench.common import node_update, node_weight, partition_id, secagg_graph, sizes, timed

CLIPPING_RANGE = 8.0  # Flower's default (ours too)
QUANTIZATION_RANGE = 2**22  # Flower's default


class _Updates(NumPyClient):
    def __init__(self, pid: int, params: int) -> None:
        self.pid, self.params = pid, params

    def fit(
        self, parameters: list[NDArray[Any]], config: dict[str, Any]
    ) -> tuple[list[NDArray[Any]], int, dict[str, Any]]:
        return [node_update(self.pid, self.params)], node_weight(self.pid), {}


def _client_fn(context: fl.Context) -> Client:
    client: Client = _Updates(partition_id(context), int(context.run_config["params"])).to_client()
    return client


client = flwr.clientapp.ClientApp(client_fn=_client_fn, mods=[secaggplus_mod])


def _round(grid: Grid, context: fl.Context) -> tuple[NDArray[Any], float, dict[str, Any]]:
    from flwr.common import ndarrays_to_parameters
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

    nodes, params = sizes(context)
    degree, threshold = secagg_graph(nodes)
    strategy = FedAvg(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=nodes,
        min_available_clients=nodes,
        initial_parameters=ndarrays_to_parameters([np.zeros(params, np.float32)]),
    )
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=1), strategy=strategy)
    workflow = SecAggPlusWorkflow(
        num_shares=degree + 1,
        reconstruction_threshold=threshold + 1,
        max_weight=float(nodes),
        clipping_range=CLIPPING_RANGE,
        quantization_range=QUANTIZATION_RANGE,
    )
    DefaultWorkflow(fit_workflow=workflow)(grid, legacy)
    (aggregate,) = legacy.state.array_records["parameters"].to_numpy_ndarrays()
    # Each node's update times its weight ratio (weight / max_weight) is stochastically
    # rounded to within one step of 2 * clipping_range / quantization_range; the mean
    # divides the sum of the n of them by the total ratio.
    step = 2 * CLIPPING_RANGE / QUANTIZATION_RANGE
    total_ratio = sum(node_weight(pid) for pid in range(nodes)) / nodes
    return aggregate, nodes * step / total_ratio, {"num_shares": degree + 1}


# Our parameter finder's answer is found before the clock starts: it is not Flower's cost.
server = timed(
    "flwr_secagg",
    _round,
    warm=("flwr.common", "flwr.server", "flwr.server.strategy", "flwr.server.workflow"),
    before=secagg_graph,
)
