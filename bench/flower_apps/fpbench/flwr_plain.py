"""Flower's plain round: ``flwr.serverapp.strategy.FedAvg`` and a plain flwr ClientApp."""

from __future__ import annotations

from typing import Any

import flwr.clientapp
import numpy as np
from flwr import app as fl
from flwr.serverapp import Grid
from numpy.typing import NDArray

from fpbench.common import FLOAT32_BOUND, flwr_train, sizes, timed

client = flwr.clientapp.ClientApp()
client.train()(flwr_train)


def _round(grid: Grid, context: fl.Context) -> tuple[NDArray[Any], float, dict[str, Any]]:
    from flwr.serverapp.strategy import FedAvg

    nodes, params = sizes(context)
    strategy = FedAvg(fraction_evaluate=0.0, min_train_nodes=nodes, min_available_nodes=nodes)
    result = strategy.start(
        grid=grid,
        initial_arrays=fl.ArrayRecord({"w": fl.Array(np.zeros(params, np.float32))}),
        num_rounds=1,
    )
    return result.arrays["w"].numpy(), FLOAT32_BOUND, {}


server = timed("flwr_plain", _round, warm=("flwr.serverapp.strategy",))
