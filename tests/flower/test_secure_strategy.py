"""Flower's own strategies over our SecAgg+ (and central DP): ``secure_strategy``.

flwr's ``Strategy.start`` loop runs unchanged over ``LoopGrid`` (conftest's
``LocalFlwrGrid`` with flwr's ``send_and_receive``, which a Flower strategy's loop
calls); the nodes run real flwr ClientApps with plain Flower handlers.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from flwr import app as fl
from flwr.clientapp import ClientApp as FlwrClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import strategy as fs

from flowerpets import FedAvg as OurFedAvg
from flowerpets import ServerApp
from flowerpets.core import ArrayRecord
from flowerpets.dp import CentralDp, fixed_clipping_mod
from flowerpets.exceptions import (
    ConfigurationError,
    IncompatibleStrategyError,
    InsecureRandomnessWarning,
)
from flowerpets.flower import ClientApp, mods, secure_strategy
from flowerpets.he import HomomorphicAggregation
from flowerpets.secagg import SecAggPlus, Stage, secaggplus_mod
from flowerpets.secagg.threat import MODELS, Threat

N = 4
WEIGHTS = [pid + 1 for pid in range(N)]  # node p trains on p + 1 examples
SECURE_METRICS = ["train-loss", "mu"]


def _update(pid: int, rnd: int, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([11, pid, rnd])
    return {n: (a + 0.5 * rng.normal(size=a.shape)).astype(a.dtype) for n, a in arrays.items()}


def train(msg: fl.Message, context: fl.Context) -> fl.Message:
    """Plain Flower training code: the round from the config, as flwr's FedAvg sends it."""
    pid = int(context.node_config["partition-id"])
    config = msg.content["config"]
    rnd = int(config["server-round"])
    arrays = {n: a.numpy() for n, a in msg.content["arrays"].items()}
    metrics = {
        "num-examples": WEIGHTS[pid],
        "train-loss": 0.25 * pid + rnd,
        "mu": float(config.get("proximal-mu", 0.0)),
    }
    out = fl.ArrayRecord({n: fl.Array(v) for n, v in _update(pid, rnd, arrays).items()})
    return fl.Message(
        fl.RecordDict({"arrays": out, "metrics": fl.MetricRecord(metrics)}), reply_to=msg
    )


def evaluate(msg: fl.Message, context: fl.Context) -> fl.Message:
    pid = int(context.node_config["partition-id"])
    metrics = fl.MetricRecord({"num-examples": WEIGHTS[pid], "eval-score": 0.5 + 0.1 * pid})
    return fl.Message(fl.RecordDict({"metrics": metrics}), reply_to=msg)


def client(*client_mods: Any) -> FlwrClientApp:
    app: FlwrClientApp = ClientApp(mods=[mods(*client_mods)]) if client_mods else FlwrClientApp()
    app.train()(train)
    app.evaluate()(evaluate)
    return app


def initial() -> fl.ArrayRecord:
    return fl.ArrayRecord(
        {"w": fl.Array(np.zeros(10, np.float32)), "b": fl.Array(np.arange(3, dtype=np.float32))}
    )


def loop_grid(kit: SimpleNamespace, app: FlwrClientApp, **kw: Any) -> Any:
    class LoopGrid(kit.LocalFlwrGrid):  # type: ignore[misc,name-defined]
        """flwr's ``send_and_receive`` (push, then pull until every reply is in)."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.direct: list[fl.Message] = []  # what went through send_and_receive

        def send_and_receive(
            self, messages: Iterable[fl.Message], **_: Any
        ) -> Iterable[fl.Message]:
            batch = list(messages)
            self.direct.extend(batch)
            pending = list(self.push_messages(batch))
            replies: list[fl.Message] = []
            while pending:
                for reply in self.pull_messages(pending):
                    pending.remove(reply.metadata.reply_to_message_id)
                    replies.append(reply)
            return replies

    return LoopGrid(app, N, **kw)


def start(strategy: fs.Strategy, grid: Any, rounds: int) -> fs.Result:
    return strategy.start(grid=grid, initial_arrays=initial(), num_rounds=rounds, timeout=30)


class SpyFedAvg(fs.FedAvg):
    """flwr's FedAvg that keeps every reply its aggregate_train is handed."""

    flowerpets_weighted_mean = True

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.seen: dict[int, list[fl.Message]] = {}

    def aggregate_train(
        self, server_round: int, replies: Iterable[fl.Message]
    ) -> tuple[fl.ArrayRecord | None, fl.MetricRecord | None]:
        self.seen[server_round] = list(replies)
        return super().aggregate_train(server_round, self.seen[server_round])


def _bounds(strategy: Any) -> list[float]:
    return [r.train_metrics["secagg-mean-error-bound"] for r in strategy.history.rounds]


# FedAvg's round-2 model carries both rounds' rounding (the nodes train from the round-1
# mean m1): error <= b1 + b2. FedAvgM (lr 1, momentum 0.9) gives x1 = m1 and
# x2 = m2 + 0.9 (m1 - x0), and m2 carries m1's error: at most 1.9 b1 + b2 <= 2 (b1 + b2).
MEAN_STRATEGIES: list[tuple[str, Callable[[], fs.Strategy], float]] = [
    ("FedAvg", lambda: fs.FedAvg(), 1.0),
    ("FedProx", lambda: fs.FedProx(proximal_mu=0.1), 1.0),
    ("FedAvgM", lambda: fs.FedAvgM(server_learning_rate=1.0, server_momentum=0.9), 2.0),
]
FLOAT32_SLACK = 1e-5  # flwr sums the plain replies in float32 (a few ulps of values ~3)


@pytest.mark.parametrize(
    ("make", "amplification"),
    [(m, a) for _, m, a in MEAN_STRATEGIES],
    ids=[name for name, _, _ in MEAN_STRATEGIES],
)
def test_flwr_strategy_over_secagg_equals_it_over_plain_replies(
    kit: SimpleNamespace, make: Callable[[], fs.Strategy], amplification: float
) -> None:
    plain = start(make(), loop_grid(kit, client()), rounds=2)
    strategy = secure_strategy(make(), mods=[SecAggPlus(secure_metrics=SECURE_METRICS)])
    grid = loop_grid(kit, client(secaggplus_mod))
    secure = start(strategy, grid, rounds=2)

    bounds = _bounds(strategy)
    assert len(bounds) == 2 and all(0 < b < 1e-3 for b in bounds)
    assert [len(r.participants) for r in strategy.history.rounds] == [N, N]
    atol = amplification * sum(bounds) + FLOAT32_SLACK
    assert list(secure.arrays) == list(plain.arrays) == ["w", "b"]
    for name in plain.arrays:
        got, want = secure.arrays[name].numpy(), plain.arrays[name].numpy()
        assert got.dtype == want.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=0, atol=atol)
        assert np.abs(got - want).max() > 0  # quantized: not the plain path by accident
    for rnd in (1, 2):
        theirs, ours = plain.train_metrics_clientapp[rnd], secure.train_metrics_clientapp[rnd]
        assert set(theirs) == set(SECURE_METRICS)  # flwr drops the weight key from its mean
        for key in SECURE_METRICS:  # summed under the masks: within the same bound
            assert ours[key] == pytest.approx(theirs[key], abs=bounds[rnd - 1] + 1e-9)
        assert ours["secagg-mean-error-bound"] == bounds[rnd - 1]  # the round reports it
        # Evaluation is not a secure round: flwr's own path, the same metrics.
        assert secure.evaluate_metrics_clientapp[rnd]["eval-score"] == pytest.approx(
            plain.evaluate_metrics_clientapp[rnd]["eval-score"], rel=1e-12
        )
    if isinstance(strategy.strategy, fs.FedProx):  # the strategy's config reached the handler
        assert secure.train_metrics_clientapp[1]["mu"] == pytest.approx(0.1, abs=bounds[0])
    assert not any(m.metadata.message_type == "train" for m in grid.direct)


def test_the_strategy_sees_one_reply_and_it_is_the_mean(kit: SimpleNamespace) -> None:
    """A dishonest-server check: nothing but the weighted mean reaches the strategy."""
    spy = SpyFedAvg(fraction_evaluate=0.0)
    grid = loop_grid(kit, client(secaggplus_mod))
    strategy = secure_strategy(spy, mods=[SecAggPlus()])
    start(strategy, grid, rounds=1)

    replies = spy.seen[1]
    assert len(replies) == 1
    (reply,) = replies
    assert reply.has_content() and reply.metadata.src_node_id == SUPERLINK_NODE_ID
    assert reply.metadata.src_node_id not in grid.node_ids  # no node's reply, the round's
    assert set(reply.content.keys()) == {"arrays", "metrics"}
    assert reply.content["metrics"]["num-examples"] == sum(WEIGHTS)  # only the total
    assert "train-loss" not in reply.content["metrics"]  # not listed as a secure metric

    start_arrays = {n: a.numpy() for n, a in initial().items()}
    updates = [_update(pid, 1, start_arrays) for pid in range(N)]
    bound = strategy.history[0].train_metrics["secagg-mean-error-bound"]
    for name in start_arrays:
        got = reply.content["arrays"][name].numpy()
        mean = sum(
            w * u[name].astype(np.float64) for w, u in zip(WEIGHTS, updates, strict=True)
        ) / sum(WEIGHTS)
        np.testing.assert_allclose(got, mean, rtol=0, atol=bound + FLOAT32_SLACK)
        for update in updates:  # and no node's own update
            assert np.abs(got - update[name]).max() > 100 * bound
    # No plain train request ever left the server: every one was a SecAgg+ stage.
    trains = [m for m in grid.pushed if m.metadata.message_type == "train"]
    assert trains and all(m.metadata.group_id.startswith("1:secagg+/") for m in trains)
    semi_honest = MODELS[Threat.SEMI_HONEST].stages
    assert {m.metadata.group_id.partition(":")[2] for m in trains} == set(semi_honest)
    assert grid.direct == []  # flwr's send_and_receive carried nothing


def test_a_node_lost_in_the_masked_input_stage(kit: SimpleNamespace) -> None:
    spy = SpyFedAvg(fraction_evaluate=0.0)
    app = client(secaggplus_mod)
    grid = loop_grid(kit, app, silent=[2], silent_from=Stage.COLLECT_MASKED_INPUT)
    strategy = secure_strategy(spy, mods=[SecAggPlus(dropout_rate=0.3)])
    result = start(strategy, grid, rounds=1)

    record = strategy.history[0]
    assert record.ok and len(record.participants) == N - 1
    assert grid.node_ids[2] in record.failures
    (reply,) = spy.seen[1]
    survivors = [0, 1, 3]
    assert reply.content["metrics"]["num-examples"] == sum(WEIGHTS[p] for p in survivors)
    start_arrays = {n: a.numpy() for n, a in initial().items()}
    total = sum(WEIGHTS[p] for p in survivors)
    for name, value in start_arrays.items():
        want = sum(
            WEIGHTS[p] * _update(p, 1, start_arrays)[name].astype(np.float64) for p in survivors
        )
        np.testing.assert_allclose(
            result.arrays[name].numpy(),
            want / total,
            rtol=0,
            atol=record.train_metrics["secagg-mean-error-bound"] + FLOAT32_SLACK,
        )
        assert value.shape == result.arrays[name].shape


def test_a_failed_secure_round_is_one_error_reply_and_the_model_stays(
    kit: SimpleNamespace,
) -> None:
    spy = SpyFedAvg(fraction_evaluate=0.0)
    # Three of four nodes gone from the first stage: no threshold can be met.
    grid = loop_grid(
        kit, client(secaggplus_mod), silent=[1, 2, 3], silent_from=Stage.ADVERTISE_KEYS
    )
    strategy = secure_strategy(spy, mods=[SecAggPlus()])
    result = start(strategy, grid, rounds=1)

    record = strategy.history[0]
    assert record.failed and "advertise-keys" in record.error
    (reply,) = spy.seen[1]
    assert reply.has_error() and "the secure round failed" in reply.error.reason
    assert 1 not in result.train_metrics_clientapp  # flwr's FedAvg aggregated nothing
    assert len(result.arrays) == 0  # flwr's Result never got a model: none was made


def _central_dp(**kw: Any) -> CentralDp:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InsecureRandomnessWarning)
        return CentralDp(
            noise_multiplier=0.5, clipping_norm=1.0, rng=np.random.default_rng(3), **kw
        )


def test_central_dp_with_secagg_under_flwr_fedavg_equals_our_server_app(
    kit: SimpleNamespace,
) -> None:
    app = client(secaggplus_mod, fixed_clipping_mod)
    strategy = secure_strategy(fs.FedAvg(fraction_evaluate=0.0), mods=[_central_dp(), SecAggPlus()])
    secure = start(strategy, loop_grid(kit, app), rounds=2)

    ours = ServerApp(
        strategy=OurFedAvg(),
        num_rounds=2,
        initial_arrays=ArrayRecord.from_numpy({n: a.numpy() for n, a in initial().items()}),
        mods=[_central_dp(), SecAggPlus()],
        seed=1,
    )
    want = kit.run_bridge(ours, kit.LocalFlwrGrid(app, N)).last_result

    eps = [secure.train_metrics_clientapp[r]["epsilon"] for r in (1, 2)]
    assert eps == [r.train_metrics["epsilon"] for r in want.history.rounds]
    assert 0 < eps[0] < eps[1]
    assert "train-loss" not in secure.train_metrics_clientapp[1]  # CentralDp drops it
    for name in want.arrays:  # the same seeded noise; SecAgg+'s rounding differs
        np.testing.assert_allclose(
            secure.arrays[name].numpy(), want.arrays[name].numpy(), rtol=0, atol=1e-3
        )


@pytest.mark.parametrize(
    ("make_mods", "client_mods", "lost"),
    [
        (
            lambda: [_central_dp(), SecAggPlus()],
            [secaggplus_mod, fixed_clipping_mod],
            "CentralDp's privacy budget",
        ),
        (lambda: [SecAggPlus()], [secaggplus_mod], "its model and history"),
    ],
    ids=["central-dp", "secagg"],
)
def test_a_run_config_naming_a_store_is_refused_before_any_node_hears_of_it(
    kit: SimpleNamespace,
    tmp_path: Path,
    make_mods: Callable[[], list[Any]],
    client_mods: list[Any],
    lost: str,
) -> None:
    grid = loop_grid(kit, client(*client_mods))
    path = tmp_path / "run.db"
    grid.set_run(SimpleNamespace(run_id=7, override_config={"store": str(path)}))
    strategy = secure_strategy(fs.FedAvg(fraction_evaluate=0.0), mods=make_mods())
    with pytest.raises(IncompatibleStrategyError, match="cannot resume") as refused:
        start(strategy, grid, rounds=2)
    assert lost in str(refused.value)
    assert "flowerpets.flower.server_app(ServerApp(" in str(refused.value)  # what to use
    assert grid.pushed == [] and not path.exists()
    grid.set_run(SimpleNamespace(run_id=7, override_config={"lr": 0.1}))  # no store: it runs
    assert len(start(strategy, grid, rounds=1).train_metrics_clientapp) == 1


def test_a_spent_budget_stops_training_before_any_node_hears_of_it(
    kit: SimpleNamespace,
) -> None:
    app = client(secaggplus_mod, fixed_clipping_mod)
    probe = secure_strategy(fs.FedAvg(fraction_evaluate=0.0), mods=[_central_dp(), SecAggPlus()])
    first = start(probe, loop_grid(kit, app), rounds=1).train_metrics_clientapp[1]["epsilon"]

    budget = _central_dp(max_epsilon=first * 1.01)
    strategy = secure_strategy(fs.FedAvg(fraction_evaluate=0.0), mods=[budget, SecAggPlus()])
    grid = loop_grid(kit, app)
    result = start(strategy, grid, rounds=3)

    records = strategy.history.rounds
    assert [r.ok for r in records] == [True, False, False]
    assert records[1].stopped and records[2].stopped
    assert sorted(result.train_metrics_clientapp) == [1]
    rounds_pushed = {m.metadata.group_id.partition(":")[0] for m in grid.pushed}
    assert rounds_pushed == {"1"}  # rounds 2 and 3 reached no node


class UndeclaredFedAvg(fs.FedAvg):
    """A FedAvg subclass that may override aggregate_train: not taken on trust."""


class InheritsTheDeclaration(SpyFedAvg):
    """The declaration is its parent's, not its own."""


REFUSED: list[tuple[Callable[[], fs.Strategy], str]] = [
    (fs.FedMedian, "robust aggregator"),
    (fs.FedTrimmedAvg, "robust aggregator"),
    (fs.Krum, "robust aggregator"),
    (fs.MultiKrum, "robust aggregator"),
    (fs.Bulyan, "robust aggregator"),
    (lambda: fs.QFedAvg(client_learning_rate=0.1), "q-FFL"),
    (lambda: fs.DifferentialPrivacyServerSideFixedClipping(fs.FedAvg(), 1.0, 1.0, N), "CentralDp"),
    (lambda: fs.DifferentialPrivacyClientSideFixedClipping(fs.FedAvg(), 1.0, 1.0, N), "CentralDp"),
    (lambda: fs.DifferentialPrivacyServerSideAdaptiveClipping(fs.FedAvg(), 0.1, N), "CentralDp"),
    (lambda: fs.DifferentialPrivacyClientSideAdaptiveClipping(fs.FedAvg(), 0.1, N), "CentralDp"),
    (fs.FedXgbBagging, "XGBoost"),
    (fs.FedXgbCyclic, "one node after another"),
    (UndeclaredFedAvg, "flowerpets_weighted_mean = True"),
    (InheritsTheDeclaration, "flowerpets_weighted_mean = True"),
    (lambda: fs.FedAvg(arrayrecord_key="model"), "arrayrecord_key"),
    (lambda: secure_strategy(fs.FedAvg()), "already a SecureStrategy"),
]


@pytest.mark.parametrize(
    ("make", "says"), REFUSED, ids=[f"{i}-{says.split()[0]}" for i, (_, says) in enumerate(REFUSED)]
)
def test_a_strategy_that_needs_each_update_is_refused(
    make: Callable[[], fs.Strategy], says: str
) -> None:
    strategy = make()
    with pytest.raises(IncompatibleStrategyError, match=says) as caught:
        secure_strategy(strategy, mods=[SecAggPlus()])
    assert isinstance(caught.value, ConfigurationError) and isinstance(caught.value, TypeError)
    if "robust" in says or "q-FFL" in says:
        assert "FedAvg" in str(caught.value)  # says what to use instead


def test_declared_and_listed_strategies_are_accepted() -> None:
    assert secure_strategy(SpyFedAvg()).mods[0].__class__ is SecAggPlus  # the default
    assert secure_strategy(fs.FedAvgM(), mods=[_central_dp(), SecAggPlus()]).weight_key


def test_a_sealing_mod_is_refused() -> None:
    with pytest.raises(IncompatibleStrategyError, match="server_app"):
        secure_strategy(fs.FedAvg(), mods=[HomomorphicAggregation()])


class PerNodeRequests(fs.FedAvg):
    """Declares a weighted mean, but sends each node its own copy of the request."""

    flowerpets_weighted_mean = True

    def configure_train(self, server_round: int, arrays: Any, config: Any, grid: Any) -> Any:
        return [
            fl.Message(fl.RecordDict(dict(m.content.items())), m.metadata.dst_node_id, "train")
            for m in super().configure_train(server_round, arrays, config, grid)
        ]


def test_a_strategy_that_asks_each_node_something_else_ends_the_run(
    kit: SimpleNamespace,
) -> None:
    strategy = secure_strategy(PerNodeRequests(fraction_evaluate=0.0))
    grid = loop_grid(kit, client(secaggplus_mod))
    with pytest.raises(IncompatibleStrategyError, match="different train requests"):
        start(strategy, grid, rounds=2)
    assert grid.pushed == []  # refused before any node heard of it
    assert strategy.history[0].error


def test_a_train_message_pushed_past_the_secure_round_is_refused(kit: SimpleNamespace) -> None:
    from flowerpets.flower.strategy import _SecureGrid

    grid = loop_grid(kit, client(secaggplus_mod))
    wrapped = _SecureGrid(secure_strategy(fs.FedAvg()), grid)
    request = fl.Message(fl.RecordDict({"arrays": initial()}), grid.node_ids[0], "train")
    with pytest.raises(IncompatibleStrategyError, match="bypass the secure round"):
        wrapped.push_messages([request])
    assert grid.pushed == []
