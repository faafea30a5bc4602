"""The in-process runtime: contexts, isolation, reproducibility and fault injection."""

from __future__ import annotations

import threading
import time
import tracemalloc
from collections.abc import Callable

import numpy as np
import pytest

from flowerpets import (
    ArrayRecord,
    ClientApp,
    ConfigRecord,
    Context,
    ErrorCode,
    FedAvg,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
    ServerApp,
)
from flowerpets.core import request_messages
from flowerpets.core.round import RoundRequest
from flowerpets.simulation import (
    Delay,
    Dropout,
    ErrorReply,
    FaultPlan,
    SimulationGrid,
    run_simulation,
)


def counting_app(size: int = 3) -> ClientApp:
    """Each node returns ones * (partition-id + 1) and counts its rounds in its state."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> RecordDict:
        pid = int(context.node_config["partition-id"])  # type: ignore[arg-type]
        counter = context.state.get("counter", MetricRecord({"rounds": 0}))
        assert isinstance(counter, MetricRecord)
        counter["rounds"] = int(counter["rounds"]) + 1  # type: ignore[call-overload]
        context.state["counter"] = counter
        update = np.full(size, pid + 1, np.float32)
        return RecordDict(
            {"arrays": ArrayRecord({"w": update}), "metrics": MetricRecord({"num-examples": 1})}
        )

    return app


def server(num_rounds: int = 3, **fedavg: object) -> ServerApp:
    return ServerApp(
        strategy=FedAvg(**fedavg),
        num_rounds=num_rounds,  # type: ignore[arg-type]
        initial_arrays=ArrayRecord({"w": np.zeros(3, np.float32)}),
    )


def test_every_node_keeps_its_own_state_and_config() -> None:
    result = run_simulation(server(), counting_app(), 8, seed=3, node_config=lambda i: {"x": i})
    assert [c.node_config["partition-id"] for c in result.contexts] == list(range(8))
    assert [c.node_config["x"] for c in result.contexts] == list(range(8))
    assert all(c.state.get_typed("counter", MetricRecord)["rounds"] == 3 for c in result.contexts)
    assert all(c.run_config["seed"] == 3 for c in result.contexts)
    np.testing.assert_allclose(result.arrays["w"].numpy(), 4.5)
    assert len(set(result.node_ids)) == 8 and 0 not in result.node_ids


def test_same_seed_same_run() -> None:
    def run(seed: int) -> tuple[list[int], list[tuple[int, ...]]]:
        result = run_simulation(server(sampling=None), counting_app(), 6, seed=seed)
        return result.node_ids, [r.participants for r in result.history.rounds]

    ids, _ = run(5)
    assert run(5)[0] == ids
    assert run(6)[0] != ids


def test_a_mod_editing_its_request_does_not_affect_other_nodes() -> None:
    seen: list[object] = []
    lock = threading.Lock()

    def meddler(msg: Message, context: Context, call_next: Callable[..., Message]) -> Message:
        config = msg.require_content().get_typed("config", ConfigRecord)
        with lock:
            seen.append(config.get("touched"))
        config["touched"] = context.node_id
        return call_next(msg, context)

    app = counting_app()
    app_with_mod = ClientApp(mods=[meddler])
    app_with_mod.train()(lambda msg, ctx: app(msg, ctx))
    run_simulation(server(num_rounds=1), app_with_mod, 10, seed=0)
    assert seen == [None] * 10


def test_nodes_run_concurrently() -> None:
    active = 0
    peak = 0
    lock = threading.Lock()
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> RecordDict:
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        time.sleep(0.05)
        with lock:
            active -= 1
        return RecordDict(
            {
                "arrays": msg.require_content()["arrays"],  # type: ignore[dict-item]
                "metrics": MetricRecord({"num-examples": 1}),
            }
        )

    run_simulation(server(num_rounds=1), app, 8, seed=0, max_workers=4)
    assert peak >= 2


def test_dropout_from_a_round_removes_the_node_for_good() -> None:
    faults = [Dropout(node=2, round=2)]
    result = run_simulation(server(num_rounds=4), counting_app(), 5, seed=0, faults=faults)
    rounds = result.history.rounds
    dropped_id = result.node_ids[2]
    assert dropped_id in rounds[0].participants
    assert rounds[1].failures[dropped_id].error.code is ErrorCode.NODE_UNAVAILABLE
    assert result.node_index(dropped_id) == 2
    assert all(
        dropped_id not in r.participants and dropped_id not in r.failures for r in rounds[2:]
    )
    assert result.dropped == {2}
    # Round 2 onwards average the four survivors: (1 + 2 + 4 + 5) / 4 = 3.
    np.testing.assert_allclose(result.arrays["w"].numpy(), 3.0)
    counter = result.contexts[2].state.get_typed("counter", MetricRecord)
    assert counter["rounds"] == 1


def test_dropout_at_a_named_stage_spares_earlier_stages_of_that_round() -> None:
    contexts = [Context(node_id=i + 1, node_config={"partition-id": i}) for i in range(3)]
    plan = FaultPlan([Dropout(node=1, round=1, stage="unmask")])
    app = ClientApp()
    app.train()(lambda msg, ctx: RecordDict({"metrics": MetricRecord({"num-examples": 1})}))
    request = RoundRequest(round=1, cohort=(1, 2, 3), arrays=ArrayRecord(), config=ConfigRecord())
    with SimulationGrid(app, contexts, faults=plan) as grid:

        def stage(name: str) -> set[int]:
            messages = request_messages(grid, request, RecordDict(), stage=name)
            return {m.metadata.src_node_id for m in grid.send_and_receive(messages, timeout=5)}

        assert stage("masked-input") == {1, 2, 3}
        assert stage("unmask") == {1, 3}
        assert stage("masked-input") == {1, 3}  # gone for good
        assert grid.node_ids() == [1, 3]


def test_late_answers_miss_the_timeout_and_count_as_timeouts() -> None:
    faults = [Delay(node=0, round=1, seconds=2.0), Delay(node=1, round=1, seconds=0.01)]
    srv = server(num_rounds=2, round_timeout=0.5)
    started = time.monotonic()
    result = run_simulation(srv, counting_app(), 3, seed=0, faults=faults)
    assert time.monotonic() - started < 10  # the round did not wait for the late node
    first, second = result.history.rounds
    late = result.node_ids[0]
    assert first.failures[late].error.code is ErrorCode.TIMEOUT
    assert result.node_ids[1] in first.participants  # slightly late but within the timeout
    assert late in second.participants  # the delay applied to round 1 only


def test_error_reply_fault() -> None:
    faults = [ErrorReply(node=1, round=1, stage=MessageType.TRAIN, reason="disk full")]
    result = run_simulation(server(num_rounds=2), counting_app(), 3, seed=0, faults=faults)
    failure = result.history[0].failures[result.node_ids[1]]
    assert failure.error.code is ErrorCode.INJECTED_FAULT and failure.error.reason == "disk full"
    assert result.node_ids[1] in result.history[1].participants


def test_fault_plan_is_validated() -> None:
    with pytest.raises(ValueError, match="round"):
        Dropout(node=0, round=0)
    with pytest.raises(ValueError, match="node"):
        Delay(node=-1, round=1, seconds=1)
    with pytest.raises(ValueError, match="seconds"):
        Delay(node=0, round=1, seconds=-1)
    with pytest.raises(TypeError, match="not a fault"):
        FaultPlan(["drop"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="only 3 nodes"):
        run_simulation(server(), counting_app(), 3, faults=[Dropout(node=3, round=1)])


def test_a_thousand_nodes_stream_into_one_running_sum() -> None:
    """1,000 nodes x 100,000 parameters: the server holds the sum, not 400 MB of updates."""
    size = 100_000
    srv = ServerApp(
        strategy=FedAvg(),
        num_rounds=1,
        initial_arrays=ArrayRecord({"w": np.zeros(size, np.float32)}),
    )
    tracemalloc.start()
    try:
        result = run_simulation(srv, counting_app(size), 1000, seed=0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    np.testing.assert_allclose(result.arrays["w"].numpy(), 500.5)
    assert len(result.history[0].participants) == 1000
    assert peak < 200e6, f"peak traced memory {peak / 1e6:.0f} MB"
