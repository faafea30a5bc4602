"""Our plain FedAvg round: our ServerApp and our ClientApp, both through the bridge."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from flwr import app as fl
from flwr.serverapp import Grid
from numpy.typing import NDArray

from flowerpets.core import (
    ArrayRecord,
    ClientApp,
    Context,
    Message,
    MetricRecord,
    RecordDict,
    ServerMod,
)
from flowerpets.flower import client_app
from fpbench.common import FLOAT32_BOUND, node_update, node_weight, sizes, timed

_ours = ClientApp()


@_ours.train()
def _train(msg: Message, context: Context) -> RecordDict:
    pid = int(context.node_config["partition-id"])  # type: ignore[arg-type]
    params = int(context.run_config["params"])  # type: ignore[arg-type]
    return RecordDict(
        {
            "arrays": ArrayRecord.from_numpy({"w": node_update(pid, params)}, copy=False),
            "metrics": MetricRecord({"num-examples": node_weight(pid)}),
        }
    )


client = client_app(_ours)


def our_round(
    grid: Grid, context: fl.Context, server_mods: Sequence[ServerMod]
) -> tuple[NDArray[Any], float, dict[str, Any]]:
    """One round of our FedAvg with ``server_mods`` through ``flowerpets.flower.server_app``."""
    from flowerpets.core import FedAvg, ServerApp
    from flowerpets.flower import server_app

    nodes, params = sizes(context)
    ours = server_app(
        ServerApp(
            strategy=FedAvg(),
            num_rounds=1,
            initial_arrays=ArrayRecord.from_numpy({"w": np.zeros(params, np.float32)}),
            mods=list(server_mods),
        ),
        min_nodes=nodes,
    )
    ours(grid, context)
    result, bridge = ours.last_result, ours.last_grid
    assert result is not None and bridge is not None
    record = result.history.rounds[0]
    metrics = dict(record.train_metrics)
    stages = {
        k.removeprefix("secagg-seconds-"): v
        for k, v in metrics.items()
        if k.startswith("secagg-seconds-")
    }
    bound = float(metrics.get("secagg-mean-error-bound", FLOAT32_BOUND))
    extra = {"participants": len(record.participants), "pulls": bridge.pulls, "stages_s": stages}
    return result.arrays["w"].numpy(), bound, extra


def _round(grid: Grid, context: fl.Context) -> tuple[NDArray[Any], float, dict[str, Any]]:
    return our_round(grid, context, [])


SERVER_SIDE = ("flowerpets.core", "flowerpets.flower.server")
"""What our ServerApp process imports once (untimed), before its first round."""

server = timed("ours_plain", _round, warm=SERVER_SIDE)
