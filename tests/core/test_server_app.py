"""ServerApp, FedAvg and the innermost exchange, over a scripted in-memory Grid."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from flowerpets import (
    ArrayRecord,
    ClientApp,
    Context,
    Error,
    ErrorCode,
    Failure,
    FailureKind,
    FedAvg,
    FixedSizeSampling,
    FullParticipation,
    Message,
    MetricRecord,
    PoissonSampling,
    RecordDict,
    RoundRequest,
    RoundResult,
    SecureAggregator,
    ServerApp,
    ServerContext,
    WaitsForNodes,
)
from flowerpets.core.grid import round_nodes
from flowerpets.exceptions import (
    IncompatibleModsError,
    InfeasibleParametersError,
    PrivacyAccountingError,
    RoundFailedError,
    StopRunError,
)

Next = Callable[[RoundRequest, ServerContext], RoundResult]


def update_app(update: Callable[[int], np.ndarray], weight: Callable[[int], int]) -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> RecordDict:
        pid = int(context.node_config["partition-id"])  # type: ignore[arg-type]
        return RecordDict(
            {
                "arrays": ArrayRecord({"w": update(pid)}),
                "metrics": MetricRecord({"num-examples": weight(pid), "loss": float(pid)}),
            }
        )

    return app


def server(**kwargs: object) -> ServerApp:
    strategy = kwargs.pop("strategy", FedAvg())
    return ServerApp(
        strategy=strategy,
        num_rounds=kwargs.pop("num_rounds", 1),  # type: ignore[arg-type]
        initial_arrays=ArrayRecord({"w": np.zeros(3, np.float32)}),
        **kwargs,
    )  # type: ignore[arg-type]


def test_each_round_starts_with_the_grids_round_start_wait(scripted_grid: Any) -> None:
    # A deployment's grid (WaitsForNodes) waits as a round starts; node_ids() never waits.
    app = update_app(lambda pid: np.full(3, pid, np.float32), lambda pid: 1)
    waits: list[int] = []

    class Deployment(scripted_grid, WaitsForNodes):  # type: ignore[misc, valid-type]
        connected: tuple[int, ...] = (1, 2)  # node 3 connects in the first round-start wait

        def node_ids(self) -> list[int]:
            return list(self.connected)

        def wait_for_nodes(self) -> list[int]:
            waits.append(len(self.connected))
            self.connected = (1, 2, 3)
            return self.node_ids()

    grid = Deployment(app, 3)
    result = server(num_rounds=2).run(grid, seed=0)
    assert [r.participants for r in result.history.rounds] == [(1, 2, 3), (1, 2, 3)]
    # Each round's training and evaluation start asked the grid; only the first had to wait.
    assert waits == [2, 3, 3, 3]
    assert round_nodes(grid) == [1, 2, 3] and round_nodes(scripted_grid(app, 2)) == [1, 2]


def test_fedavg_weights_by_examples_and_keeps_dtype(scripted_grid: Any) -> None:
    app = update_app(lambda pid: np.full(3, pid, np.float32), lambda pid: pid + 1)
    result = server().run(scripted_grid(app, 4), seed=0)
    expected = sum((p + 1) * p for p in range(4)) / sum(p + 1 for p in range(4))
    np.testing.assert_allclose(result.arrays["w"].numpy(), expected, rtol=1e-6)
    assert result.arrays["w"].dtype == np.float32
    record = result.history[0]
    assert record.cohort_size == 4 and len(record.participants) == 4
    assert record.train_metrics["num-examples"] == 10
    assert record.train_metrics["loss"] == pytest.approx(expected)


def test_bad_updates_and_silent_nodes_are_recorded_and_excluded(scripted_grid: Any) -> None:
    def update(pid: int) -> np.ndarray:
        return {0: np.array([np.nan, 0, 0]), 1: np.zeros(5)}.get(pid, np.full(3, 2.0))

    app = update_app(update, lambda pid: 1)
    grid = scripted_grid(app, 5, silent=[4])  # node 5
    result = server().run(grid, seed=0)
    record = result.history[0]
    np.testing.assert_allclose(result.arrays["w"].numpy(), 2.0)
    assert sorted(record.participants) == [3, 4]
    codes = {node: f.error.code for node, f in record.failures.items()}
    assert codes == {
        1: ErrorCode.INVALID_REPLY,
        2: ErrorCode.INVALID_REPLY,
        5: ErrorCode.NODE_UNAVAILABLE,
    }
    assert "NaN" in record.failures[1].error.reason
    assert "expected names and shapes" in record.failures[2].error.reason


def test_missing_weight_metric_is_a_failure_not_a_guess(scripted_grid: Any) -> None:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> RecordDict:
        return RecordDict({"arrays": ArrayRecord({"w": np.ones(3)}), "metrics": MetricRecord()})

    record = server().run(scripted_grid(app, 2), seed=0).history[0]
    assert record.error is not None and "fewer than min_nodes=1" in record.error
    assert all("num-examples" in f.error.reason for f in record.failures.values())


def test_round_below_min_nodes_leaves_model_unchanged_or_stops(scripted_grid: Any) -> None:
    app = update_app(lambda pid: np.ones(3, np.float32), lambda pid: 1)
    grid = scripted_grid(app, 3, silent=[0, 1])  # nodes 1 and 2
    result = server(strategy=FedAvg(min_nodes=2), num_rounds=2).run(grid, seed=0)
    assert all(r.error is not None for r in result.history.rounds)
    np.testing.assert_array_equal(result.arrays["w"].numpy(), 0)
    with pytest.raises(RoundFailedError, match="fewer than min_nodes=2"):
        server(strategy=FedAvg(min_nodes=2), stop_on_failure=True).run(grid, seed=0)


def test_server_mods_wrap_the_round_outermost_first(scripted_grid: Any) -> None:
    log: list[str] = []

    def mod(name: str) -> Callable[[RoundRequest, ServerContext, Next], RoundResult]:
        def wrapped(request: RoundRequest, context: ServerContext, call_next: Next) -> RoundResult:
            log.append(f"{name} in")
            request = request.replace(config=request.config.copy())
            request.config[f"seen-{name}"] = True
            result = call_next(request, context)
            log.append(f"{name} out")
            metrics = result.metrics.copy()
            metrics[f"by-{name}"] = 1.0
            return result.replace(metrics=metrics)

        return wrapped

    app = update_app(lambda pid: np.ones(3, np.float32), lambda pid: 1)
    grid = scripted_grid(app, 2)
    result = server(mods=[mod("a"), mod("b")]).run(grid, seed=0)
    assert log == ["a in", "b in", "b out", "a out"]
    config = grid.sent[0].require_content()["config"]
    assert config["seen-a"] is True and config["seen-b"] is True and config["server-round"] == 1
    assert result.history[0].train_metrics["by-a"] == 1.0


def test_stop_run_error_ends_the_run_with_its_reason(scripted_grid: Any) -> None:
    def budget(request: RoundRequest, context: ServerContext, call_next: Next) -> RoundResult:
        if request.round == 3:
            raise StopRunError("privacy budget spent")
        return call_next(request, context)

    app = update_app(lambda pid: np.ones(3, np.float32), lambda pid: 1)
    result = server(mods=[budget], num_rounds=5).run(scripted_grid(app, 2), seed=0)
    assert result.stopped == "privacy budget spent"
    assert [r.round for r in result.history.rounds] == [1, 2, 3]
    assert result.history[2].error == "privacy budget spent"


def test_federated_and_centralized_evaluation_are_recorded(scripted_grid: Any) -> None:
    app = update_app(lambda pid: np.ones(3, np.float32), lambda pid: 1)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> RecordDict:
        pid = int(context.node_config["partition-id"])  # type: ignore[arg-type]
        return RecordDict({"metrics": MetricRecord({"num-examples": pid + 1, "accuracy": pid})})

    strategy = FedAvg(
        evaluate_sampling=FullParticipation(),
        evaluate_fn=lambda rnd, arrays: {"norm": float(np.linalg.norm(arrays["w"].numpy()))},
    )
    record = server(strategy=strategy).run(scripted_grid(app, 3), seed=0).history[0]
    assert record.evaluate_metrics["accuracy"] == pytest.approx((0 * 1 + 1 * 2 + 2 * 3) / 6)
    assert record.server_metrics["norm"] == pytest.approx(np.sqrt(3))


def test_cohort_sampling() -> None:
    rng = np.random.default_rng(0)
    nodes = list(range(100, 200))
    cohort = FixedSizeSampling(10).sample(nodes, rng)
    assert len(cohort) == 10 == len(set(cohort)) and set(cohort) <= set(nodes)
    sizes = [len(PoissonSampling(0.2).sample(nodes, rng)) for _ in range(400)]
    assert abs(np.mean(sizes) - 20) < 1.0  # mean of 400 Binomial(100, 0.2): sd 0.2
    with pytest.raises(ValueError, match="cannot sample"):
        FixedSizeSampling(101).sample(nodes, rng)
    with pytest.raises(ValueError, match="rate"):
        PoissonSampling(0.0)
    with pytest.raises(ValueError, match="size"):
        FixedSizeSampling(0)


def test_same_seed_same_cohorts_and_unseeded_runs_differ(scripted_grid: Any) -> None:
    app = update_app(lambda pid: np.ones(3, np.float32), lambda pid: 1)
    strategy = FedAvg(sampling=FixedSizeSampling(3))

    def cohorts(seed: int | None) -> list[tuple[int, ...]]:
        result = server(strategy=strategy, num_rounds=4).run(scripted_grid(app, 20), seed=seed)
        return [r.participants for r in result.history.rounds]

    assert cohorts(1) == cohorts(1)
    assert cohorts(None) != cohorts(None)  # 1 - (1/1140)^4 sure


def test_configuration_is_validated() -> None:
    with pytest.raises(ValueError, match="num_rounds"):
        server(num_rounds=0)
    with pytest.raises(ValueError, match="min_nodes"):
        FedAvg(min_nodes=0)
    with pytest.raises(TypeError, match="sampling"):
        FedAvg(sampling=0.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="initial_arrays"):
        ServerApp(strategy=FedAvg(), num_rounds=1, initial_arrays={"w": np.zeros(1)})  # type: ignore[arg-type]


def test_evaluation_failures_are_recorded_apart_from_training_failures(scripted_grid: Any) -> None:
    app = update_app(lambda pid: np.ones(3, np.float32), lambda pid: 1)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> RecordDict:
        if context.node_config["partition-id"] == 1:
            raise RuntimeError("no test data")
        return RecordDict({"metrics": MetricRecord({"num-examples": 1, "accuracy": 1.0})})

    strategy = FedAvg(evaluate_sampling=FullParticipation())
    result = server(strategy=strategy, num_rounds=2).run(scripted_grid(app, 3), seed=0)
    record = result.history.round(2)
    assert record.failures == {}
    assert set(record.evaluate_failures) == {2}
    reason = record.evaluate_failures[2].error.reason
    assert reason.startswith("RuntimeError") and "no test data" not in reason  # stays on the node
    assert record.to_dict()["evaluate_failures"] == {"2": str(record.evaluate_failures[2])}
    with pytest.raises(KeyError, match="no round 3"):
        result.history.round(3)


class FakeSealed:
    """A stand-in sealed sum that records what was added to it."""

    def __init__(self, added: dict[str, np.ndarray] | None = None) -> None:
        self.added = added or {}

    def add_plaintext(self, arrays: dict[str, np.ndarray]) -> FakeSealed:  # type: ignore[override]
        return FakeSealed({**self.added, **arrays})


def test_add_to_sum_reaches_plain_and_sealed_parts() -> None:
    result = RoundResult(
        round=1,
        aggregate=ArrayRecord({"b": np.ones(2)}),
        total_weight=2.0,
        participants=(1, 2),
        sealed=FakeSealed(),
    )
    out = result.add_to_sum({"b": np.array([0.5, 1.5]), "w": np.zeros(3)})
    np.testing.assert_allclose(out.aggregate["b"].numpy(), [1.5, 2.5])
    np.testing.assert_allclose(result.aggregate["b"].numpy(), [1, 1])  # the original is untouched
    assert isinstance(out.sealed, FakeSealed) and set(out.sealed.added) == {"w"}
    plain = result.replace(sealed=None)
    with pytest.raises(KeyError, match="no arrays named \\['w'\\]"):
        plain.add_to_sum({"w": np.zeros(3)})
    with pytest.raises(ValueError, match="shape"):
        plain.add_to_sum({"b": np.zeros(3)})


def test_context_says_when_a_mod_aggregates_securely(scripted_grid: Any) -> None:
    seen: list[bool] = []

    def spy(request: RoundRequest, context: ServerContext, call_next: Next) -> RoundResult:
        seen.append(context.secure_aggregation)
        return call_next(request, context)

    class SecureMod(SecureAggregator):
        def __call__(
            self, request: RoundRequest, context: ServerContext, call_next: Next
        ) -> RoundResult:
            return call_next(request, context)

    app = update_app(lambda pid: np.ones(3, np.float32), lambda pid: 1)
    server(mods=[spy]).run(scripted_grid(app, 2), seed=0)
    server(mods=[spy, SecureMod()]).run(scripted_grid(app, 2), seed=0)
    assert seen == [False, True]


def test_an_ad_hoc_secure_aggregation_attribute_is_refused_not_ignored() -> None:
    class Undeclared:  # the old duck-typed declaration: it must not silently count as plain
        secure_aggregation = True

        def __call__(
            self, request: RoundRequest, context: ServerContext, call_next: Next
        ) -> RoundResult:
            return call_next(request, context)

    with pytest.raises(TypeError, match=r"subclassing flowerpets\.core\.SecureAggregator"):
        server(mods=[Undeclared()])


# -- failed rounds: nothing escapes the run, every reason is kept ---------------------------------
def test_any_exception_from_a_mod_fails_its_round_not_the_run(
    scripted_grid: Any, caplog: pytest.LogCaptureFixture
) -> None:
    def flaky(request: RoundRequest, context: ServerContext, call_next: Next) -> RoundResult:
        if request.round == 2:
            raise ValueError("a mod's bug")
        return call_next(request, context)

    app = update_app(lambda pid: np.full(3, 2.0, np.float32), lambda pid: 1)
    result = server(mods=[flaky], num_rounds=3).run(scripted_grid(app, 2), seed=0)
    assert [r.ok for r in result.history.rounds] == [True, False, True]
    failed = result.history.round(2)
    assert failed.failed and failed.error == "round 2: ValueError: a mod's bug"
    assert result.stopped is None and not result.history.every_round_failed
    logged = [r for r in caplog.records if r.levelname == "ERROR" and r.exc_info]
    assert logged and "a mod's bug" in str(logged[0].exc_info[1])  # with the traceback
    with pytest.raises(RoundFailedError, match="a mod's bug") as raised:
        server(mods=[flaky], num_rounds=3, stop_on_failure=True).run(scripted_grid(app, 2))
    assert isinstance(raised.value.__cause__, ValueError)


@pytest.mark.parametrize("weight", [0, 0.0])
def test_all_zero_weights_fail_the_round_cleanly(scripted_grid: Any, weight: float) -> None:
    app = update_app(lambda pid: np.ones(3, np.float32), lambda pid: weight)  # type: ignore[arg-type, return-value]
    result = server(num_rounds=2).run(scripted_grid(app, 3), seed=0)
    for record in result.history.rounds:
        expected = f"round {record.round}: total weight is 0.0, nothing to divide by"
        assert record.failed and record.error == expected
        assert len(record.participants) == 3  # they answered; their weights sum to 0
    assert result.history.every_round_failed
    np.testing.assert_array_equal(result.arrays["w"].numpy(), np.zeros(3))  # unchanged


def test_a_round_that_fails_in_a_mod_keeps_every_nodes_reason(scripted_grid: Any) -> None:
    def exchange(request: RoundRequest, context: ServerContext, call_next: Next) -> RoundResult:
        # A mod that runs its own stages and gives up, as SecAgg+ or HE key set-up do.
        failures = {
            n: Failure("stage-1", Error(ErrorCode.REFUSED, f"no {n}"), FailureKind.ERROR_REPLY)
            for n in (1, 2)
        }
        raise RoundFailedError("stage-1: too few nodes", failures=failures, participants=[3])

    app = update_app(lambda pid: np.ones(3, np.float32), lambda pid: 1)
    result = server(mods=[exchange], num_rounds=2).run(scripted_grid(app, 3), seed=0)
    record = result.history.round(1)
    assert record.error == "stage-1: too few nodes" and record.participants == (3,)
    assert {n: f.error.reason for n, f in record.failures.items()} == {1: "no 1", 2: "no 2"}
    assert record.to_dict()["failures"] == {
        "1": "stage-1: REFUSED: no 1",
        "2": "stage-1: REFUSED: no 2",
    }
    assert result.history.every_round_failed


def test_a_strategy_failure_carries_the_rounds_failures(scripted_grid: Any) -> None:
    app = update_app(lambda pid: np.ones(3, np.float32), lambda pid: 1)
    grid = scripted_grid(app, 3, silent=[0, 1])
    with pytest.raises(RoundFailedError, match="fewer than min_nodes=2") as raised:
        server(strategy=FedAvg(min_nodes=2), stop_on_failure=True).run(grid, seed=0)
    assert sorted(raised.value.failures) == [1, 2] and raised.value.participants == (3,)


def test_every_round_failed_tells_runs_that_trained_nothing(scripted_grid: Any) -> None:
    app = update_app(lambda pid: np.ones(3, np.float32), lambda pid: 1)

    def stop(request: RoundRequest, context: ServerContext, call_next: Next) -> RoundResult:
        raise StopRunError("budget spent")

    def fail(request: RoundRequest, context: ServerContext, call_next: Next) -> RoundResult:
        if request.round == 1:
            raise RoundFailedError("no")
        return call_next(request, context)

    def history(*mods: Any, rounds: int = 2) -> Any:
        return server(mods=list(mods), num_rounds=rounds).run(scripted_grid(app, 2), seed=0).history

    assert not history().every_round_failed
    assert not history(fail).every_round_failed  # round 2 trained
    assert history(fail, rounds=1).every_round_failed
    stopped = history(stop)
    assert not stopped.every_round_failed and stopped[0].stopped and not stopped[0].failed
    assert stopped[0].to_dict()["stopped"] is True


def test_a_cohort_the_strategy_cannot_draw_fails_its_round_not_the_run(scripted_grid: Any) -> None:
    # In deployment nodes leave between rounds: 3 asked for, 2 left, so each round fails.
    app = update_app(lambda pid: np.ones(3, np.float32), lambda pid: 1)
    strategy = FedAvg(sampling=FixedSizeSampling(3))
    result = server(strategy=strategy, num_rounds=2).run(scripted_grid(app, 2), seed=0)
    for record in result.history.rounds:
        assert record.failed
        assert record.error == (
            f"round {record.round}: ParameterValueError: "
            "cannot sample a cohort of 3 from 2 available nodes"
        )
    assert result.history.every_round_failed


@pytest.mark.parametrize(
    "error", [IncompatibleModsError, PrivacyAccountingError, InfeasibleParametersError]
)
def test_configuration_errors_end_the_run_instead_of_failing_every_round(
    scripted_grid: Any, error: type[Exception]
) -> None:
    def misconfigured(
        request: RoundRequest, context: ServerContext, call_next: Next
    ) -> RoundResult:
        raise error("these mods cannot run together")

    app = update_app(lambda pid: np.ones(3, np.float32), lambda pid: 1)
    with pytest.raises(error, match="cannot run together"):
        server(mods=[misconfigured], num_rounds=3).run(scripted_grid(app, 2), seed=0)
