"""Plain FedAvg on numpy arrays, as tests/flower/conftest.py's numpy apps, for ``flwr run``."""

from __future__ import annotations

from typing import Any

import numpy as np

from flowerpets.core import ArrayRecord, ClientApp, FedAvg, MetricRecord, RecordDict, ServerApp
from flowerpets.flower import client_app, server_app

_ours = ClientApp()


@_ours.train()
def _train(msg: Any, context: Any) -> RecordDict:
    pid = int(context.node_config["partition-id"])
    arrays = msg.require_content().get_typed("arrays", ArrayRecord)
    rng = np.random.default_rng([7, pid, msg.round])
    out = {n: (a.numpy() + rng.normal(size=a.shape)).astype(a.dtype) for n, a in arrays.items()}
    metrics = MetricRecord({"num-examples": pid + 1})
    return RecordDict({"arrays": ArrayRecord.from_numpy(out), "metrics": metrics})


def values(round: int, arrays: ArrayRecord) -> dict[str, float]:
    """The whole model as server metrics, so the test can compare it (History is JSON)."""
    return {f"{n}[{i}]": float(v) for n, a in arrays.items() for i, v in enumerate(a.numpy())}


client = client_app(_ours)
server = server_app(
    ServerApp(
        strategy=FedAvg(evaluate_fn=values),
        num_rounds=2,
        initial_arrays=ArrayRecord.from_numpy(
            {"w": np.zeros(10, np.float32), "b": np.arange(3, dtype=np.float32)}
        ),
        seed=1,
    )
)
