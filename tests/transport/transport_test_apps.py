"""Apps for the process tests, steered by the run config (``--app transport_test_apps:...``).

The server's run config reaches every node, so one set of keys steers both sides:

``size``            length of the update ``w`` (default 6)
``rounds``          number of rounds (default 2)
``integer``         int64 updates (exact under SecAgg+) instead of float32
``train-seconds``   a node sleeps this long in each train handler
``marker-dir``      a node touches ``<pid>-<round>-<step>`` there when a message arrives
``hold-pid``, ``hold-round``, ``hold-step``, ``hold-seconds``
                    that node, at that round and step, touches its marker and then waits
``gate-file``, ``gate-round``
                    the server waits for the gate file before that round (up to 60 s)
``wait-nodes``      from round 2 on, the server waits (up to 30 s) until that many nodes
                    are connected and trains all of them
``capture-dir``     the server writes each round's result there (``round-<n>.fprd`` holds
                    the aggregate, ``round-<n>.json`` who took part and who failed where)
``secagg``          SecAgg+ (degree ``secagg-degree``, threshold ``secagg-threshold``)

A node's update is ``(partition-id + 1) * [1, 2, ..., size]`` with weight
``partition-id + 1``; it also reports how many messages it has handled in this
run (its state survives reconnections): metric ``handled``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from flowerpets.core import (
    ArrayRecord,
    ClientApp,
    ConfigRecord,
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
from flowerpets.core.codec import encode_record_dict


def _get(config: Any, key: str, default: Any) -> Any:
    return config.get(key, default)


def _update(pid: int, size: int, integer: bool) -> np.ndarray:
    base = np.arange(1, size + 1, dtype=np.int64) * (pid + 1)
    return base if integer else base.astype(np.float32)


def _marker(msg: Message, context: Context, call_next: Any) -> Message:
    """Outermost client mod: leave a marker, and hold where the run config says."""
    config = context.run_config
    pid = int(context.node_config["partition-id"])  # type: ignore[arg-type]
    step_name = msg.metadata.stage or msg.message_type  # the step a fault plan would name
    step = step_name.replace("/", "_")
    directory = _get(config, "marker-dir", None)
    if directory:
        Path(str(directory), f"{pid}-{msg.round}-{step}").touch()
    held = (
        pid == _get(config, "hold-pid", -1)
        and msg.round == _get(config, "hold-round", -1)
        and step_name == _get(config, "hold-step", "")
    )
    if held:
        time.sleep(float(_get(config, "hold-seconds", 60.0)))
    return call_next(msg, context)  # type: ignore[no-any-return]


def client_app(context: Context) -> ClientApp:
    config = context.run_config
    mods: list[Any] = [_marker]
    if _get(config, "secagg", False):
        from flowerpets.secagg import secaggplus_mod

        mods.append(secaggplus_mod)
    app = ClientApp(mods=mods)

    @app.train()
    def train(msg: Message, ctx: Context) -> RecordDict:
        pid = int(ctx.node_config["partition-id"])  # type: ignore[arg-type]
        counter = ctx.state.get("counter", MetricRecord({"handled": 0}))
        assert isinstance(counter, MetricRecord)
        counter["handled"] = int(counter["handled"]) + 1  # type: ignore[call-overload]
        ctx.state["counter"] = counter
        time.sleep(float(_get(ctx.run_config, "train-seconds", 0.0)))
        update = _update(
            pid, int(_get(ctx.run_config, "size", 6)), bool(_get(ctx.run_config, "integer", False))
        )
        metrics = {"num-examples": pid + 1, "handled": counter["handled"]}
        return RecordDict({"arrays": ArrayRecord({"w": update}), "metrics": MetricRecord(metrics)})

    return app


class _Gate:
    """Outermost server mod: wait for a gate file, or for nodes, before a round."""

    def __init__(self, config: ConfigRecord) -> None:
        self.config = config

    def __call__(
        self, request: RoundRequest, context: ServerContext, call_next: Any
    ) -> RoundResult:
        gate = _get(self.config, "gate-file", None)
        if gate and request.round == _get(self.config, "gate-round", 2):
            # A signal to the server ends the wait: the next exchange then stops the run.
            grid = context.require_grid()
            deadline = time.monotonic() + 60
            while not Path(str(gate)).exists() and time.monotonic() < deadline:
                if getattr(grid, "stop_requested", None) is not None:
                    break
                time.sleep(0.05)
        wanted = int(_get(self.config, "wait-nodes", 0))
        if wanted and request.round >= 2:
            grid = context.require_grid()
            deadline = time.monotonic() + 30
            while len(grid.node_ids()) < wanted and time.monotonic() < deadline:
                time.sleep(0.05)
            request = request.replace(cohort=tuple(grid.node_ids()))
        return call_next(request, context)  # type: ignore[no-any-return]


class _Capture:
    """Writes each round's RoundResult into ``capture-dir``."""

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)

    def __call__(
        self, request: RoundRequest, context: ServerContext, call_next: Any
    ) -> RoundResult:
        result: RoundResult = call_next(request, context)
        stem = self.directory / f"round-{request.round}"
        stem.with_suffix(".fprd").write_bytes(
            encode_record_dict(RecordDict({"aggregate": result.aggregate}))
        )
        summary = {
            "cohort": list(request.cohort),
            "participants": list(result.participants),
            "failures": {str(n): f.stage for n, f in result.failures.items()},
            "total_weight": result.total_weight,
        }
        stem.with_suffix(".json").write_text(json.dumps(summary))
        return result


def server_app(run_config: ConfigRecord) -> ServerApp:
    mods: list[Any] = [_Gate(run_config)]
    if _get(run_config, "capture-dir", None):
        mods.append(_Capture(str(run_config["capture-dir"])))
    if _get(run_config, "secagg", False):
        from flowerpets.secagg import SecAggPlus

        mods.append(
            SecAggPlus(
                degree=int(_get(run_config, "secagg-degree", 4)),
                threshold=int(_get(run_config, "secagg-threshold", 3)),
            )
        )
    size = int(_get(run_config, "size", 6))
    integer = bool(_get(run_config, "integer", False))
    initial = np.zeros(size, np.int64 if integer else np.float32)
    return ServerApp(
        strategy=FedAvg(round_timeout=float(_get(run_config, "round-timeout", 60.0))),
        num_rounds=int(_get(run_config, "rounds", 2)),
        initial_arrays=ArrayRecord({"w": initial}),
        mods=mods,
    )
