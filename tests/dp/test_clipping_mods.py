"""The client clipping mods: reply with the clipped update, refuse mismatched requests."""

from __future__ import annotations

import numpy as np
import pytest

from flowerpets.core import (
    ArrayRecord,
    ClientApp,
    ConfigRecord,
    Context,
    ErrorCode,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flowerpets.dp import adaptive_clipping_mod, fixed_clipping_mod
from flowerpets.dp._primitives.clip import global_norm

MODEL = {"w": np.array([1.0, 2.0, 3.0], dtype=np.float32), "b": np.array([0.5], dtype=np.float32)}


def app_with(mod: object, delta: dict[str, np.ndarray], seen: list[list[str]]) -> ClientApp:
    app = ClientApp(mods=[mod])  # type: ignore[list-item]

    @app.train()
    def train(msg: Message, context: Context) -> RecordDict:
        arrays = msg.require_content().get_typed("arrays", ArrayRecord)
        seen.append(list(arrays))
        new = {n: np.asarray(a.numpy()) + delta[n].astype(np.float32) for n, a in arrays.items()}
        return RecordDict(
            {"arrays": ArrayRecord(new), "metrics": MetricRecord({"num-examples": 3})}
        )

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> RecordDict:
        return RecordDict({"metrics": MetricRecord({"accuracy": 1.0})})

    return app


def request(
    config: dict[str, object], *, indicator: bool = False, kind: str = MessageType.TRAIN
) -> Message:
    arrays = ArrayRecord(MODEL)
    if indicator:
        arrays["dp.unclipped"] = np.zeros(1)
    return Message.create(
        RecordDict({"arrays": arrays, "config": ConfigRecord(config)}),  # type: ignore[arg-type]
        message_type=kind,
        dst_node_id=1,
        round=1,
    )


def reply_arrays(reply: Message) -> dict[str, np.ndarray]:
    assert reply.error is None, reply.error
    return {
        n: a.numpy() for n, a in reply.require_content().get_typed("arrays", ArrayRecord).items()
    }


def test_large_update_comes_back_clipped_not_as_weights() -> None:
    delta = {"w": np.array([3.0, 0.0, 4.0]), "b": np.array([0.0])}  # norm 5
    seen: list[list[str]] = []
    reply = app_with(fixed_clipping_mod, delta, seen)(request({"dp.clip": 1.0}), Context(1))
    got = reply_arrays(reply)
    assert got["w"].dtype == np.float32
    np.testing.assert_allclose(got["w"], [0.6, 0.0, 0.8], rtol=1e-6)
    np.testing.assert_allclose(got["b"], [0.0])
    assert global_norm(got) <= 1.0
    assert seen == [["w", "b"]]


def test_a_server_that_cannot_read_the_model_gets_a_model_back() -> None:
    delta = {"w": np.array([3.0, 0.0, 4.0]), "b": np.array([0.0])}
    app = app_with(fixed_clipping_mod, delta, [])
    got = reply_arrays(app(request({"dp.clip": 1.0, "dp.reply-model": True}), Context(1)))
    np.testing.assert_allclose(got["w"], MODEL["w"] + np.array([0.6, 0.0, 0.8]), rtol=1e-6)
    assert got["w"].dtype == np.float32
    bad = app(request({"dp.clip": 1.0, "dp.reply-model": 1}), Context(1))
    assert bad.error is not None and "must be a bool" in bad.error.reason


def test_small_update_comes_back_exactly() -> None:
    delta = {"w": np.array([0.25, -0.5, 0.0]), "b": np.array([0.125])}
    reply = app_with(fixed_clipping_mod, delta, [])(request({"dp.clip": 10.0}), Context(1))
    got = reply_arrays(reply)
    assert got["w"].tolist() == [0.25, -0.5, 0.0] and got["b"].tolist() == [0.125]
    assert reply.require_content().get_typed("metrics", MetricRecord)["num-examples"] == 3


@pytest.mark.parametrize(("norm", "bit"), [(0.5, 0.5), (1.0, 0.5), (3.0, -0.5)])
def test_adaptive_mod_reports_the_shifted_unclipped_bit(norm: float, bit: float) -> None:
    delta = {"w": np.array([norm, 0.0, 0.0]), "b": np.array([0.0])}
    seen: list[list[str]] = []
    app = app_with(adaptive_clipping_mod, delta, seen)
    got = reply_arrays(app(request({"dp.clip": 1.0}, indicator=True), Context(1)))
    assert seen == [["w", "b"]]  # the handler never sees the reserved array
    assert list(got) == ["w", "b", "dp.unclipped"]
    assert got["dp.unclipped"].tolist() == [bit]
    assert global_norm({"w": got["w"], "b": got["b"]}) <= 1.0


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({}, "no clipping norm"),
        ({"dp.clip": 0.0}, "finite and > 0"),
        ({"dp.clip": float("nan")}, "finite and > 0"),
        ({"dp.clip": True}, "config['dp.clip'] must be a number"),
        ({"dp.clip": "1.0"}, "config['dp.clip'] must be a number"),
    ],
)
def test_requests_without_a_valid_clip_are_refused(config: dict[str, object], match: str) -> None:
    calls: list[list[str]] = []
    reply = app_with(fixed_clipping_mod, {"w": np.zeros(3), "b": np.zeros(1)}, calls)(
        request(config), Context(1)
    )
    assert reply.error is not None and reply.error.code == ErrorCode.REFUSED
    assert match in reply.error.reason
    assert calls == []  # refused before training


@pytest.mark.parametrize("mod", [fixed_clipping_mod, adaptive_clipping_mod])
def test_a_config_of_the_wrong_record_kind_is_refused(mod: object) -> None:
    calls: list[list[str]] = []
    content = RecordDict({"arrays": ArrayRecord(MODEL), "config": MetricRecord({"dp.clip": 1.0})})
    msg = Message.create(content, message_type=MessageType.TRAIN, dst_node_id=1, round=1)
    reply = app_with(mod, {"w": np.zeros(3), "b": np.zeros(1)}, calls)(msg, Context(1))
    assert reply.error is not None and reply.error.code == ErrorCode.REFUSED
    assert "'config' record must be a ConfigRecord" in reply.error.reason and calls == []


def test_the_wrong_kind_of_clipping_is_refused() -> None:
    zero = {"w": np.zeros(3), "b": np.zeros(1)}
    fixed = app_with(fixed_clipping_mod, zero, [])(
        request({"dp.clip": 1.0}, indicator=True), Context(1)
    )
    assert fixed.error is not None and "needs adaptive_clipping_mod" in fixed.error.reason
    adaptive = app_with(adaptive_clipping_mod, zero, [])(request({"dp.clip": 1.0}), Context(1))
    assert adaptive.error is not None and "needs fixed_clipping_mod" in adaptive.error.reason


def test_a_nan_update_becomes_an_error_reply() -> None:
    delta = {"w": np.array([np.nan, 0.0, 0.0]), "b": np.zeros(1)}
    reply = app_with(fixed_clipping_mod, delta, [])(request({"dp.clip": 1.0}), Context(1))
    assert reply.error is not None and reply.error.code == ErrorCode.MOD_RAISED_EXCEPTION
    assert "NaN" in reply.error.reason


def test_handler_errors_and_other_messages_pass_through() -> None:
    app = ClientApp(mods=[fixed_clipping_mod])

    @app.train()
    def train(msg: Message, context: Context) -> RecordDict:
        raise RuntimeError("training blew up")

    reply = app(request({"dp.clip": 1.0}), Context(1))
    assert reply.error is not None and reply.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    evaluate = app_with(fixed_clipping_mod, {}, [])(
        request({}, kind=MessageType.EVALUATE), Context(1)
    )
    assert evaluate.error is None
