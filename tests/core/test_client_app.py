"""Messages and ClientApp: replies, mod order, and errors that never crash a node."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from flowerpets import (
    ArrayRecord,
    ClientApp,
    ConfigRecord,
    Context,
    Error,
    ErrorCode,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flowerpets.exceptions import RecordTypeError, RequestRefusedError

Next = Callable[[Message, Context], Message]


def request(message_type: str = MessageType.TRAIN) -> Message:
    content = RecordDict({"arrays": ArrayRecord({"w": np.ones(3)}), "config": ConfigRecord()})
    return Message.create(content, message_type=message_type, dst_node_id=7, round=2, run_id=5)


def test_message_holds_content_or_error_never_both() -> None:
    msg = request()
    with pytest.raises(ValueError, match="exactly one"):
        Message(metadata=msg.metadata)
    with pytest.raises(ValueError, match="exactly one"):
        Message(metadata=msg.metadata, content=RecordDict(), error=Error(ErrorCode.UNKNOWN))
    with pytest.raises(RecordTypeError):
        Message(metadata=msg.metadata, content={"a": 1})  # type: ignore[arg-type]


def test_reply_swaps_route_and_links_to_request() -> None:
    msg = request()
    reply = msg.reply(RecordDict())
    md = reply.metadata
    assert (md.src_node_id, md.dst_node_id) == (7, 0)
    assert md.reply_to_message_id == msg.metadata.message_id
    assert md.message_id != msg.metadata.message_id
    assert (md.run_id, md.round, md.message_type) == (5, 2, "train")
    assert reply.is_reply_to(msg)
    assert not reply.is_reply_to(request())
    error = msg.error_reply(Error(ErrorCode.REFUSED, "no"))
    assert error.has_error and error.is_reply_to(msg)
    with pytest.raises(ValueError, match="carries an error"):
        error.require_content()


def test_private_content_copy_protects_other_recipients() -> None:
    msg = request()
    private = msg.with_private_content()
    private.require_content().get_typed("config", ConfigRecord)["leak"] = 1
    assert "leak" not in msg.require_content().get_typed("config", ConfigRecord)


def make_app(
    mods: list[object], log: list[str], handler_mods: tuple[object, ...] = ()
) -> ClientApp:
    app = ClientApp(mods=mods)  # type: ignore[arg-type]

    @app.train(mods=handler_mods)  # type: ignore[arg-type]
    def train(msg: Message, context: Context) -> RecordDict:
        log.append("handler")
        return RecordDict({"metrics": MetricRecord({"num-examples": 1})})

    return app


def tracing_mod(name: str, log: list[str]) -> Callable[[Message, Context, Next], Message]:
    def mod(msg: Message, context: Context, call_next: Next) -> Message:
        log.append(f"{name} in")
        reply = call_next(msg, context)
        log.append(f"{name} out")
        return reply

    return mod


def test_first_mod_is_outermost_and_handler_mods_are_inside_app_mods() -> None:
    log: list[str] = []
    app = make_app(
        [tracing_mod("a", log), tracing_mod("b", log)], log, handler_mods=(tracing_mod("h", log),)
    )
    reply = app(request(), Context(node_id=7))
    assert not reply.has_error
    assert log == ["a in", "b in", "h in", "handler", "h out", "b out", "a out"]


def test_handler_exception_becomes_error_reply_that_mods_see() -> None:
    seen: list[Message] = []

    def spy(msg: Message, context: Context, call_next: Next) -> Message:
        reply = call_next(msg, context)
        seen.append(reply)
        return reply

    app = ClientApp(mods=[spy])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        raise ZeroDivisionError("boom")

    reply = app(request(), Context(node_id=7))
    assert reply.error is not None
    assert reply.error.code is ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    # The type says what failed; the message stays on the node (it may quote private data).
    assert reply.error.reason.startswith("ZeroDivisionError") and "boom" not in reply.error.reason
    assert seen and seen[0].has_error


def test_mod_exception_and_refusal_become_error_replies() -> None:
    def broken(msg: Message, context: Context, call_next: Next) -> Message:
        raise KeyError("oops")

    def refusing(msg: Message, context: Context, call_next: Next) -> Message:
        raise RequestRefusedError("survivor and dropout lists overlap")

    for mod, code in ((broken, ErrorCode.MOD_RAISED_EXCEPTION), (refusing, ErrorCode.REFUSED)):
        reply = make_app([mod], [])(request(), Context(node_id=7))
        assert reply.error is not None and reply.error.code is code
    reply = make_app([refusing], [])(request(), Context(node_id=7))
    assert reply.error is not None and reply.error.reason == "survivor and dropout lists overlap"


def test_handler_refusal_is_a_refusal_not_a_crash() -> None:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        raise RequestRefusedError("privacy budget spent")

    reply = app(request(), Context(node_id=7))
    assert reply.error is not None and reply.error.code is ErrorCode.REFUSED
    assert reply.error.reason == "privacy budget spent"


def test_unknown_message_type_gets_a_clear_error() -> None:
    reply = make_app([], [])(request("query"), Context(node_id=7))
    assert reply.error is not None
    assert reply.error.code is ErrorCode.UNKNOWN_MESSAGE_TYPE
    assert "'query'" in reply.error.reason and "'train'" in reply.error.reason


def test_handler_returning_something_else_is_an_invalid_reply() -> None:
    app = ClientApp()

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return request().reply(RecordDict())  # answers a different message

    reply = app(request(MessageType.EVALUATE), Context(node_id=7))
    assert reply.error is not None and reply.error.code is ErrorCode.INVALID_REPLY


def test_mod_that_forges_a_reply_to_another_message_is_caught() -> None:
    def forger(msg: Message, context: Context, call_next: Next) -> Message:
        return request().reply(RecordDict())

    reply = make_app([forger], [])(request(), Context(node_id=7))
    assert reply.error is not None and reply.error.code is ErrorCode.INVALID_REPLY


def test_registration_is_validated() -> None:
    app = make_app([], [])
    with pytest.raises(ValueError, match="already registered"):
        app.train()(lambda msg, ctx: RecordDict())
    with pytest.raises(TypeError, match="callable"):
        ClientApp(mods=["not a mod"])  # type: ignore[list-item]
    assert app.message_types == ("train",)


def test_context_keeps_state_across_messages() -> None:
    app = ClientApp()

    @app.query()
    def count(msg: Message, context: Context) -> RecordDict:
        seen = context.state.get("seen", MetricRecord({"n": 0}))
        assert isinstance(seen, MetricRecord)
        seen["n"] = int(seen["n"]) + 1  # type: ignore[call-overload]
        context.state["seen"] = seen
        return RecordDict({"metrics": seen})

    ctx = Context(node_id=7, node_config={"partition-id": 0})
    for _ in range(3):
        app(request(MessageType.QUERY), ctx)
    assert ctx.state.get_typed("seen", MetricRecord)["n"] == 3
