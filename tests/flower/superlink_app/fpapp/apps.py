"""Plain FedAvg on numpy arrays, as tests/flower/conftest.py's numpy apps, for ``flwr run``.

The other modules of this package are the same app with PETs (one module each, so a
``flwr-clientapp`` process imports only what its app uses); the test points the
app's ``[tool.flwr.app.components]`` at one of them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

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
from flowerpets.flower import Settings, client_app, server_app

STALL_SECONDS = 300.0  # longer than any test waits: the stalled node is killed long before


def _stall_if_asked(pid: int, context: Any) -> None:
    """On partition ``stall-partition``: say so in ``stall-marker``, then wait to be killed.

    What lets a test kill a SuperNode while its train handler runs (for SecAgg+,
    inside the collect-masked-input stage), deterministically.
    """
    marker = str(context.run_config.get("stall-marker", ""))
    if marker and int(context.run_config.get("stall-partition", -1)) == pid:
        tmp = Path(marker + ".tmp")
        tmp.write_text(str(os.getpid()))
        tmp.rename(marker)
        time.sleep(STALL_SECONDS)


def numpy_client(client_mods: Sequence[ClientMod] = ()) -> ClientApp:
    """Node ``p`` adds seeded normals to each array and weighs ``p + 1`` (as conftest's)."""
    app = ClientApp(mods=client_mods)

    @app.train()
    def _train(msg: Any, context: Any) -> RecordDict:
        pid = int(context.node_config["partition-id"])
        _stall_if_asked(pid, context)
        arrays = msg.require_content().get_typed("arrays", ArrayRecord)
        rng = np.random.default_rng([7, pid, msg.round])
        out = {n: (a.numpy() + rng.normal(size=a.shape)).astype(a.dtype) for n, a in arrays.items()}
        metrics = MetricRecord({"num-examples": pid + 1})
        return RecordDict({"arrays": ArrayRecord.from_numpy(out), "metrics": metrics})

    @app.evaluate()
    def _evaluate(msg: Any, context: Any) -> RecordDict:
        # The model this node received (opened by its mods, for CKKS), as metrics.
        arrays = msg.require_content().get_typed("arrays", ArrayRecord)
        return RecordDict({"metrics": MetricRecord({"num-examples": 1, **values(0, arrays)})})

    return app


def values(round: int, arrays: ArrayRecord) -> dict[str, float]:
    """The whole model as metrics, so the test can compare it (History is JSON)."""
    return {f"{n}[{i}]": float(v) for n, a in arrays.items() for i, v in enumerate(a.numpy())}


def initial() -> ArrayRecord:
    return ArrayRecord.from_numpy(
        {"w": np.zeros(10, np.float32), "b": np.arange(3, dtype=np.float32)}
    )


def numpy_server(
    server_mods: Callable[[], Sequence[ServerMod]] = tuple, **strategy: Any
) -> Callable[[Settings], ServerApp]:
    """A factory: the run config's ``num-server-rounds`` and ``seed`` decide the app."""

    def build(settings: Settings) -> ServerApp:
        return ServerApp(
            strategy=FedAvg(**strategy),
            num_rounds=settings.num_rounds or 1,
            initial_arrays=initial(),
            mods=server_mods(),
            seed=settings.seed if settings.seed is not None else 1,
        )

    return build


ours = numpy_client()  # our ClientApp and ServerApp factory: the test simulates these very ones
build = numpy_server(evaluate_fn=values)
client = client_app(ours)
server = server_app(build)
