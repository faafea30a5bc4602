"""SecAgg+ end to end over the simulation: exact sums, dropouts at every stage, failures."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest

from flowerpets.core import (
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
    RoundRequest,
    RoundResult,
    SecureAggregator,
    ServerApp,
    ServerContext,
    aggregate_round,
)
from flowerpets.core.codec import decode_message, encode_message
from flowerpets.exceptions import (
    ParameterTypeError,
    ParameterValueError,
    RoundFailedError,
    UsageError,
)
from flowerpets.secagg import SecAggPlus, SecAggPlusClientMod, ServerPhase, Stage, secaggplus_mod
from flowerpets.secagg.server import ServerRound
from flowerpets.secagg.threat import MODELS, Threat
from flowerpets.simulation import Dropout, SimulationGrid, run_simulation

PARAMS = 40


def make_data(n: int, seed: int = 0) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    updates = rng.uniform(-2, 2, size=(n, PARAMS)).astype(np.float32)
    weights = [int(w) for w in rng.integers(1, 200, size=n)]
    return updates, weights


def make_app(
    updates: np.ndarray,
    weights: Sequence[int],
    *,
    mods: Sequence[Any] = (secaggplus_mod,),
    edit: Callable[[int, RecordDict], RecordDict] | None = None,
) -> ClientApp:
    app = ClientApp(mods=mods)

    @app.train()
    def train(msg: Message, context: Context) -> RecordDict:
        i = int(context.node_config["partition-id"])  # type: ignore[arg-type]
        content = RecordDict(
            {
                "arrays": ArrayRecord({"w": updates[i]}),
                "metrics": MetricRecord({"num-examples": weights[i], "loss": 0.1 * i}),
            }
        )
        return edit(i, content) if edit is not None else content

    return app


class Capture:
    """An outer server mod that keeps each round's result."""

    def __init__(self) -> None:
        self.results: list[RoundResult] = []

    def __call__(
        self, request: RoundRequest, context: ServerContext, call_next: Any
    ) -> RoundResult:
        result: RoundResult = call_next(request, context)
        self.results.append(result)
        return result


def run(
    app: ClientApp,
    n: int,
    *,
    faults: Sequence[Any] = (),
    secagg: SecAggPlus | None = None,
    rounds: int = 1,
    stop_on_failure: bool = False,
) -> tuple[Any, Capture]:
    capture = Capture()
    mods = [capture] if secagg is None else [capture, secagg]
    server = ServerApp(
        strategy=FedAvg(),
        num_rounds=rounds,
        initial_arrays=ArrayRecord({"w": np.zeros(PARAMS, np.float32)}),
        mods=mods,
        stop_on_failure=stop_on_failure,
    )
    return run_simulation(server, app, n, seed=0, faults=faults, max_workers=4), capture


def weighted_mean(updates: np.ndarray, weights: Sequence[int], idx: Sequence[int]) -> np.ndarray:
    w = np.asarray([weights[i] for i in idx], dtype=np.float64)
    return (updates[list(idx)].astype(np.float64) * w[:, None]).sum(0) / w.sum()


def secagg(**kwargs: Any) -> SecAggPlus:
    options: dict[str, Any] = {"degree": 8, "threshold": 5, "rng": np.random.default_rng(5)}
    options.update(kwargs)
    return SecAggPlus(**options)


def test_a_round_matches_plain_fedavg_within_the_quantization_bound() -> None:
    updates, weights = make_data(10)
    plain, plain_capture = run(make_app(updates, weights, mods=()), 10)
    secure, capture = run(make_app(updates, weights), 10, secagg=secagg(secure_metrics=["loss"]))
    result = capture.results[0]
    assert len(result.participants) == 10 and not result.failures
    assert result.total_weight == sum(weights)  # exact, though every weight stayed private
    bound = result.metrics["secagg-mean-error-bound"]
    assert isinstance(bound, float) and 0 < bound < 1e-5
    got, expected = secure.arrays["w"].numpy(), plain.arrays["w"].numpy()
    assert (
        np.max(np.abs(got.astype(np.float64) - weighted_mean(updates, weights, range(10))))
        <= bound + 1e-7
    )
    np.testing.assert_allclose(got, expected, atol=bound + 1e-6)
    # Only the metrics named secure are summed; the loss's weighted mean matches the plain one.
    assert result.metrics["loss"] == pytest.approx(
        plain_capture.results[0].metrics["loss"], abs=1e-5
    )
    assert result.metrics["num-examples"] == sum(weights)
    assert result.metrics["secagg-clipped-nodes"] == 0
    assert result.metrics["secagg-degree"] == 8 and result.metrics["secagg-threshold"] == 5


def test_unlisted_reply_metrics_never_reach_the_server() -> None:
    updates, weights = make_data(6)
    _, capture = run(make_app(updates, weights), 6, secagg=secagg(degree=4, threshold=3))
    assert "loss" not in capture.results[0].metrics


# Node indices that drop out at each stage (n = 10, k = 8, t = 5: any 3 are survivable).
DROPOUT_SETS = {
    "advertise-1": {Stage.ADVERTISE_KEYS: [0]},
    "advertise-2": {Stage.ADVERTISE_KEYS: [0, 5]},
    "share-1": {Stage.SHARE_KEYS: [2]},
    "share-2": {Stage.SHARE_KEYS: [2, 7]},
    "collect-1": {Stage.COLLECT_MASKED_INPUT: [3]},
    "collect-3": {Stage.COLLECT_MASKED_INPUT: [3, 4, 8]},
    "unmask-1": {Stage.UNMASK: [1]},
    "unmask-3": {Stage.UNMASK: [1, 6, 9]},
    "mixed-a": {Stage.ADVERTISE_KEYS: [0], Stage.SHARE_KEYS: [2], Stage.COLLECT_MASKED_INPUT: [3]},
    "mixed-b": {Stage.SHARE_KEYS: [2], Stage.COLLECT_MASKED_INPUT: [4], Stage.UNMASK: [6]},
}


@pytest.mark.parametrize("name", sorted(DROPOUT_SETS))
def test_dropouts_at_any_stage_leave_the_exact_sum_of_the_survivors(name: str) -> None:
    plan = DROPOUT_SETS[name]
    updates, weights = make_data(10, seed=1)
    faults = [Dropout(node=i, round=1, stage=stage) for stage, nodes in plan.items() for i in nodes]
    result, capture = run(make_app(updates, weights), 10, faults=faults, secagg=secagg())
    record, outcome = result.history[0], capture.results[0]
    assert record.ok, record.error
    lost = {i for stage, nodes in plan.items() if stage != Stage.UNMASK for i in nodes}
    participants = sorted(result.node_index(p) for p in outcome.participants)
    assert participants == [i for i in range(10) if i not in lost]
    failed = {result.node_index(node): f for node, f in outcome.failures.items()}
    assert {i: failed[i].stage for i in failed} == {
        i: stage for stage, nodes in plan.items() if stage != Stage.UNMASK for i in nodes
    }
    assert all(f.error.code == ErrorCode.NODE_UNAVAILABLE for f in failed.values())
    assert outcome.metrics["secagg-unmask-missing"] == len(plan.get(Stage.UNMASK, []))
    assert outcome.total_weight == sum(weights[i] for i in participants)
    bound = outcome.metrics["secagg-mean-error-bound"]
    assert isinstance(bound, float)
    error = np.abs(result.arrays["w"].numpy() - weighted_mean(updates, weights, participants))
    assert np.max(error) <= bound + 1e-6  # + float32 rounding of the new model


BELOW_THRESHOLD = {
    Stage.ADVERTISE_KEYS: (8, r"2 of 10 nodes advertised keys"),
    Stage.SHARE_KEYS: (8, r"2 of 10 nodes shared keys"),
    Stage.COLLECT_MASKED_INPUT: (7, r"3 of 10 nodes sent masked inputs"),
    Stage.UNMASK: (7, r"3 of 10 survivors answered"),
}


@pytest.mark.parametrize("stage", MODELS[Threat.SEMI_HONEST].stages)
def test_below_the_threshold_the_round_stops_naming_stage_and_counts(stage: str) -> None:
    dropouts, counts = BELOW_THRESHOLD[stage]
    updates, weights = make_data(10)
    faults = [Dropout(node=i, round=1, stage=stage) for i in range(dropouts)]
    with pytest.raises(RoundFailedError, match=rf"{re.escape(stage)}: round 1: {counts}"):
        run(
            make_app(updates, weights),
            10,
            faults=faults,
            secagg=secagg(degree=4, threshold=3),
            stop_on_failure=True,
        )


def test_a_failed_round_leaves_the_model_and_the_next_round_works() -> None:
    updates, weights = make_data(10)
    faults = [Dropout(node=i, round=1, stage=Stage.UNMASK) for i in range(7)]
    faults += [Dropout(node=i, round=2) for i in range(7)]  # they stay gone
    result, capture = run(
        make_app(updates, weights),
        10,
        faults=faults,
        secagg=secagg(degree=None, threshold=None),  # found per round: (9, 6), then (2, 2)
        rounds=2,
    )
    assert result.history[0].error is not None and "secagg+/unmask" in result.history[0].error
    assert result.history[1].ok and len(capture.results) == 1
    # Round 2 ran with the 3 nodes still up: the complete graph on 3, t = 2.
    assert sorted(result.node_index(p) for p in capture.results[0].participants) == [7, 8, 9]


def test_several_rounds_reuse_no_keys_and_stay_exact() -> None:
    updates, weights = make_data(8)
    result, capture = run(
        make_app(updates, weights), 8, secagg=secagg(degree=4, threshold=3), rounds=3
    )
    assert all(r.ok for r in result.history.rounds) and len(capture.results) == 3
    sessions = {
        c.state.get_typed("secagg+/client-round", ConfigRecord)["session"] for c in result.contexts
    }  # type: ignore[index]
    assert len(sessions) == 1  # every node is in round 3's session now
    for outcome in capture.results:
        assert outcome.total_weight == sum(weights)


def test_secret_state_is_wiped_after_the_round() -> None:
    updates, weights = make_data(6)
    result, _ = run(make_app(updates, weights), 6, secagg=secagg(degree=4, threshold=3))
    for context in result.contexts:
        state = context.state.get_typed("secagg+/client-state", ConfigRecord)
        assert state["phase"] == "done"
        assert state["c-sk"] == state["s-sk"] == state["self-seed"] == b""
        assert state["b-shares"] == state["s-shares"] == state["share-keys"] == []


def query_app(counts: np.ndarray, *, mods: Sequence[Any] = (secaggplus_mod,)) -> ClientApp:
    app = ClientApp(mods=mods)

    @app.query()
    def query(msg: Message, context: Context) -> RecordDict:
        i = int(context.node_config["partition-id"])  # type: ignore[arg-type]
        return RecordDict(
            {
                "arrays": ArrayRecord({"histogram": counts[i], "flags": counts[i] > 3}),
                "metrics": MetricRecord({}),
            }
        )

    return app


def test_federated_analytics_histograms_sum_exactly() -> None:
    n = 9
    counts = np.random.default_rng(3).integers(0, 50, size=(n, 12))
    request = RoundRequest(
        round=1,
        cohort=(),
        arrays=ArrayRecord(),
        config=ConfigRecord(),
        message_type=MessageType.QUERY,
        weight_key=None,
    )
    results = []
    for app, mod in (
        (query_app(counts), secagg(degree=4, threshold=3)),
        (query_app(counts, mods=()), None),
    ):
        contexts = [
            Context(node_id=i + 1, run_id=1, node_config={"partition-id": i}) for i in range(n)
        ]
        with SimulationGrid(app, contexts, run_id=1, max_workers=2) as grid:
            req = request.replace(cohort=tuple(grid.node_ids()))
            context = ServerContext(grid=grid, run_id=1)
            results.append(
                aggregate_round(req, context) if mod is None else mod(req, context, aggregate_round)
            )
    secure, plain = results
    assert secure.aggregate["histogram"].dtype == np.int64
    assert np.array_equal(secure.aggregate["histogram"].numpy(), counts.sum(0))
    assert np.array_equal(
        secure.aggregate["histogram"].numpy(), plain.aggregate["histogram"].numpy()
    )
    assert np.array_equal(secure.aggregate["flags"].numpy(), (counts > 3).sum(0))
    assert secure.total_weight == plain.total_weight == n  # unweighted: one per node


def test_an_invalid_update_fails_its_node_not_the_round() -> None:
    updates, weights = make_data(10)

    def edit(i: int, content: RecordDict) -> RecordDict:
        if i == 4:
            content["arrays"] = ArrayRecord({"w": np.full(PARAMS, np.nan, np.float32)})
        if i == 6:
            content["metrics"] = MetricRecord({"num-examples": 10**6})
        if i == 8:
            content["metrics"] = MetricRecord({"num-examples": 2.5})
        return content

    result, capture = run(make_app(updates, weights, edit=edit), 10, secagg=secagg(max_weight=1000))
    outcome = capture.results[0]
    failed = {result.node_index(node): f for node, f in outcome.failures.items()}
    assert sorted(failed) == [4, 6, 8]
    assert all(
        f.stage == Stage.COLLECT_MASKED_INPUT and f.error.code == ErrorCode.INVALID_REPLY
        for f in failed.values()
    )
    assert "NaN" in failed[4].error.reason and "max_weight" in failed[6].error.reason
    assert "whole number" in failed[8].error.reason
    survivors = [i for i in range(10) if i not in failed]
    bound = outcome.metrics["secagg-mean-error-bound"]
    assert isinstance(bound, float)
    assert (
        np.max(np.abs(result.arrays["w"].numpy() - weighted_mean(updates, weights, survivors)))
        <= bound + 1e-6
    )


def test_clipping_is_counted_and_bounded() -> None:
    updates, weights = make_data(6)

    def edit(i: int, content: RecordDict) -> RecordDict:
        if i == 2:
            big = updates[2].copy()
            big[0] = 100.0
            content["arrays"] = ArrayRecord({"w": big})
        return content

    result, capture = run(
        make_app(updates, weights, edit=edit), 6, secagg=secagg(degree=4, threshold=3)
    )
    outcome = capture.results[0]
    assert outcome.metrics["secagg-clipped-nodes"] == 1
    clipped = updates.copy()
    clipped[2, 0] = 8.0  # the default clipping range
    bound = outcome.metrics["secagg-mean-error-bound"]
    assert isinstance(bound, float)
    np.testing.assert_allclose(
        result.arrays["w"].numpy(), weighted_mean(clipped, weights, range(6)), atol=bound + 1e-6
    )


def test_nodes_without_the_client_mod_cannot_take_part() -> None:
    updates, weights = make_data(6)
    with pytest.raises(RoundFailedError, match="0 of 6 nodes advertised keys"):
        run(
            make_app(updates, weights, mods=()),
            6,
            secagg=secagg(degree=4, threshold=3),
            stop_on_failure=True,
        )


def test_a_failed_round_keeps_every_nodes_reason() -> None:
    # Before: a round that failed inside SecAgg+ was recorded with its error only.
    updates, weights = make_data(6)
    result, _ = run(make_app(updates, weights, mods=()), 6, secagg=secagg(degree=4, threshold=3))
    record = result.history.round(1)
    assert record.failed and "0 of 6 nodes advertised keys" in (record.error or "")
    assert len(record.failures) == 6 and not record.participants
    for failure in record.failures.values():
        assert failure.stage == Stage.ADVERTISE_KEYS and failure.error.reason
    assert result.history.every_round_failed


def test_a_mod_that_strips_the_weight_fails_the_round_with_each_nodes_reason() -> None:
    # A wrong mod order (local DP's reply without metrics inside SecAgg+): every node says why.
    updates, weights = make_data(6)

    def strip(i: int, content: RecordDict) -> RecordDict:
        return RecordDict({"arrays": content["arrays"]})

    result, _ = run(make_app(updates, weights, edit=strip), 6, secagg=secagg(degree=4, threshold=3))
    record = result.history.round(1)
    assert record.failed and "none of the 6 nodes that shared keys sent a masked input" in (
        record.error or ""
    )
    assert len(record.failures) == 6
    for failure in record.failures.values():
        assert failure.stage == Stage.COLLECT_MASKED_INPUT
        assert "lacks the weight metric 'num-examples'" in failure.error.reason
    with pytest.raises(RoundFailedError) as raised:
        run(
            make_app(updates, weights, edit=strip),
            6,
            secagg=secagg(degree=4, threshold=3),
            stop_on_failure=True,
        )
    assert len(raised.value.failures) == 6


def test_all_zero_weights_fail_a_secagg_round_cleanly() -> None:
    updates, _ = make_data(6)
    result, capture = run(
        make_app(updates, [0] * 6), 6, secagg=secagg(degree=4, threshold=3), rounds=2
    )
    assert capture.results[0].total_weight == 0 and len(capture.results[0].participants) == 6
    for record in result.history.rounds:
        assert record.failed and "total weight is 0.0, nothing to divide by" in (record.error or "")
    np.testing.assert_array_equal(result.arrays["w"].numpy(), np.zeros(PARAMS))


def test_the_client_mod_refuses_a_server_that_skips_secagg() -> None:
    updates, weights = make_data(4)
    result, capture = run(make_app(updates, weights), 4)  # no SecAggPlus on the server
    outcome = capture.results[0]
    assert not outcome.participants
    assert {f.error.code for f in outcome.failures.values()} == {ErrorCode.REFUSED}
    assert "only through SecAgg+" in next(iter(outcome.failures.values())).error.reason
    assert result.history[0].error is not None  # FedAvg: no node contributed


def test_evaluate_messages_pass_through_the_client_mod() -> None:
    seen = []

    def handler(msg: Message, context: Context) -> RecordDict:
        seen.append(msg.message_type)
        return RecordDict({"metrics": MetricRecord({"num-examples": 1})})

    app = ClientApp(mods=[secaggplus_mod])
    app.evaluate()(handler)
    msg = Message.create(RecordDict(), message_type=MessageType.EVALUATE, dst_node_id=1, round=1)
    assert app(msg, Context(node_id=1)).error is None and seen == ["evaluate"]


def test_the_server_mod_declares_secure_aggregation() -> None:
    server = ServerApp(
        strategy=FedAvg(), num_rounds=1, initial_arrays=ArrayRecord(), mods=[SecAggPlus()]
    )
    assert isinstance(server.mods[0], SecureAggregator)
    assert SecAggPlus.secure_aggregation is True


def test_every_stage_message_survives_the_wire_format(federation: Any) -> None:
    fed = federation(n=6, degree=4, threshold=3)
    sent: list[Message] = []
    original = fed.app.__call__

    def recording(msg: Message, context: Context) -> Message:
        sent.append(msg)
        reply = original(msg, context)
        sent.append(reply)
        return reply

    fed.app = type("App", (), {"__call__": staticmethod(recording)})()
    fed.honest_until_collect()
    fed.unmask(fed.ids[0], fed.ids, [])
    assert {m.metadata.stage for m in sent} == set(MODELS[Threat.SEMI_HONEST].stages)
    for message in sent:
        decoded = decode_message(encode_message(message))
        assert decoded.metadata == message.metadata and decoded.content == message.content


def test_the_server_state_machine_refuses_stages_out_of_order() -> None:
    updates, weights = make_data(4)
    contexts = [Context(node_id=i + 1, run_id=1, node_config={"partition-id": i}) for i in range(4)]
    with SimulationGrid(make_app(updates, weights), contexts, run_id=1) as grid:
        request = RoundRequest(
            round=1,
            cohort=tuple(grid.node_ids()),
            arrays=ArrayRecord({"w": np.zeros(PARAMS, np.float32)}),
            config=ConfigRecord(),
        )
        server_round = ServerRound(secagg(degree=2, threshold=2), request, grid)
        for step in (
            server_round.share_keys,
            server_round.collect_masked_inputs,
            server_round.unmask,
        ):
            with pytest.raises(UsageError, match="cannot run in phase 'new'"):
                step()
        with pytest.raises(UsageError, match="no result"):
            server_round.result()
        server_round.advertise_keys()
        assert server_round.phase == ServerPhase.ADVERTISED
        with pytest.raises(UsageError, match="cannot run in phase 'advertised'"):
            server_round.advertise_keys()
        server_round.share_keys()
        server_round.collect_masked_inputs()
        server_round.unmask()
        assert server_round.result().total_weight == sum(weights)


def test_cohorts_too_small_or_infeasible_fail_the_round_clearly() -> None:
    updates, weights = make_data(3)
    with pytest.raises(RoundFailedError, match="at least 2 distinct nodes, got 1"):
        run(make_app(updates, weights), 1, secagg=SecAggPlus(), stop_on_failure=True)
    with pytest.raises(RoundFailedError, match="max_weight=1000000000 is too large"):
        run(
            make_app(updates, weights),
            3,
            secagg=SecAggPlus(max_weight=10**9, degree=2, threshold=2),
            stop_on_failure=True,
        )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"degree": 4}, "both"),
        ({"degree": 3, "threshold": 2}, "even"),
        ({"degree": 4, "threshold": 5}, "exceed"),
        ({"degree": 4, "threshold": 1}, ">= 2"),
        ({"dropout_rate": 1.0}, "dropout_rate"),
        ({"clipping_range": 0}, "clipping_range"),
        ({"max_weight": 0}, "max_weight"),
        ({"secure_metrics": ["a", "a"]}, "secure_metrics"),
        ({"secure_metrics": [""]}, "secure_metrics"),
    ],
)
def test_server_mod_validates_its_configuration(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ParameterValueError, match=match):
        SecAggPlus(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"degree": "4", "threshold": 2}, "degree"),
        ({"degree": 4, "threshold": 2.0}, "threshold"),
        ({"dropout_rate": True}, "dropout_rate"),
        ({"security_bits": 40.0}, "security_bits"),
        ({"clipping_range": "8"}, "clipping_range"),
        ({"max_weight": True}, "max_weight"),
        ({"secure_metrics": "loss"}, "secure_metrics"),
        ({"rng": 3}, "rng"),
        ({"randomness": b"seed"}, "randomness"),
    ],
)
def test_server_mod_refuses_wrong_types_with_a_type_error(
    kwargs: dict[str, Any], match: str
) -> None:
    with pytest.raises(ParameterTypeError, match=match):
        SecAggPlus(**kwargs)


def test_client_mod_validates_its_configuration_and_warns_when_weakened() -> None:
    with pytest.raises(ParameterValueError, match="min_threshold"):
        SecAggPlusClientMod(min_threshold=1)
    with pytest.raises(ParameterTypeError, match="min_threshold"):
        SecAggPlusClientMod(min_threshold=True)
    with pytest.raises(ParameterValueError, match="protected_types"):
        SecAggPlusClientMod(protected_types=[""])
    with pytest.warns(UserWarning, match="in the clear"):
        SecAggPlusClientMod(refuse_plaintext=False)
