"""The one stage exchange: every failure classified, replies folded as they arrive, reasons kept."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import pytest

from flowerpets import (
    ArrayRecord,
    ConfigRecord,
    Error,
    ErrorCode,
    FailureKind,
    FedAvg,
    Message,
    RecordDict,
    RoundRequest,
    RoundResult,
    ServerApp,
    ServerContext,
    StageExchange,
    request_messages,
)
from flowerpets.core.fields import Fields
from flowerpets.exceptions import InvalidUpdateError, ProtocolViolationError, RoundFailedError

# What a node does with a request: a reply, or None for silence.
Behaviour = Callable[[Message], Message | None]


def answer(value: int) -> Behaviour:
    return lambda msg: msg.reply(RecordDict({"config": ConfigRecord({"value": value})}))


def refuse(reason: str) -> Behaviour:
    return lambda msg: msg.error_reply(Error(ErrorCode.REFUSED, reason))


def silent(msg: Message) -> None:
    return None


class ArrivalGrid:
    """Nodes that answer in a fixed arrival order (``order``, default: as sent)."""

    run_id = 7

    def __init__(self, nodes: dict[int, Behaviour], order: Sequence[int] | None = None) -> None:
        self.nodes = nodes
        self.order = order
        self.sent: list[Message] = []

    def node_ids(self) -> list[int]:
        return list(self.nodes)

    def send_and_receive(
        self, messages: Sequence[Message], *, timeout: float | None = None
    ) -> Iterator[Message]:
        self.sent.extend(messages)
        by_node = {m.metadata.dst_node_id: m for m in messages}
        for node in self.order if self.order is not None else list(by_node):
            if node in by_node:
                reply = self.nodes[node](by_node[node])
                if reply is not None:
                    yield reply


def value_of(body: RecordDict) -> int:
    value = body.get_typed("config", ConfigRecord)["value"]
    assert isinstance(value, int)
    return value


def requests(nodes: Sequence[int]) -> list[tuple[int, RecordDict]]:
    return [(n, RecordDict({"config": ConfigRecord({"n": n})})) for n in nodes]


def test_every_failure_is_classified_in_one_taxonomy() -> None:
    def accept(node: int, body: RecordDict) -> None:
        value = value_of(body)
        if value == 4:
            raise InvalidUpdateError("the update has the wrong shape")
        if value == 5:
            raise ProtocolViolationError("the reply belongs to another session")

    grid = ArrivalGrid(
        {1: answer(1), 2: refuse("a check failed"), 3: silent, 4: answer(4), 5: answer(5)}
    )
    exchange = StageExchange(grid, round=3, message_type="pet-keys")
    accepted = exchange.send("pet/advertise", requests([1, 2, 3, 4, 5]), accept)
    assert accepted == (1,)
    f = exchange.failures
    assert set(f) == {2, 3, 4, 5}
    assert {n: f[n].kind for n in f} == {
        2: FailureKind.ERROR_REPLY,
        3: FailureKind.NO_REPLY,
        4: FailureKind.INVALID_REPLY,
        5: FailureKind.PROTOCOL_VIOLATION,
    }
    assert f[2].error == Error(ErrorCode.REFUSED, "a check failed")  # the node's own words
    assert f[3].error.code is ErrorCode.NODE_UNAVAILABLE
    assert f[4].error == Error(ErrorCode.INVALID_REPLY, "the update has the wrong shape")
    assert f[5].error.reason == "the reply belongs to another session"
    assert {x.stage for x in f.values()} == {"pet/advertise"}


def test_a_wait_that_runs_out_is_a_timeout_and_no_reply() -> None:
    exchange = StageExchange(ArrivalGrid({1: silent}), round=1, timeout=0.0)
    assert exchange.send("s", requests([1]), lambda node, body: None) == ()
    assert exchange.failures[1].kind is FailureKind.NO_REPLY
    assert exchange.failures[1].error.code is ErrorCode.TIMEOUT


def test_a_nodes_own_error_reply_is_never_taken_for_a_missing_one() -> None:
    # A node may answer with any code, INVALID_REPLY or TIMEOUT too: it still answered.
    grid = ArrivalGrid(
        {
            1: lambda m: m.error_reply(Error(ErrorCode.INVALID_REPLY, "handler returned junk")),
            2: lambda m: m.error_reply(Error(ErrorCode.MOD_RAISED_EXCEPTION, "bug")),
        }
    )
    exchange = StageExchange(grid, round=1)
    exchange.send("s", requests([1, 2]), lambda node, body: None)
    assert {n: f.kind for n, f in exchange.failures.items()} == {
        1: FailureKind.ERROR_REPLY,
        2: FailureKind.ERROR_REPLY,
    }


def test_replies_are_folded_in_arrival_order() -> None:
    grid = ArrivalGrid({n: answer(n) for n in (1, 2, 3, 4)}, order=[3, 1, 4, 2])
    folded: list[int] = []
    exchange = StageExchange(grid, round=1)
    accepted = exchange.send("s", requests([1, 2, 3, 4]), lambda n, b: folded.append(value_of(b)))
    assert folded == [3, 1, 4, 2] and accepted == (3, 1, 4, 2)
    assert [m.metadata.dst_node_id for m in grid.sent] == [1, 2, 3, 4]  # sent as asked


def test_a_failing_accept_marks_only_that_node_invalid() -> None:
    total = {"sum": 0}

    def accept(node: int, body: RecordDict) -> None:
        value = value_of(body)
        if value < 0:  # checked whole before anything is folded in
            raise InvalidUpdateError(f"value {value} is out of range")
        total["sum"] += value

    grid = ArrivalGrid({1: answer(10), 2: answer(-1), 3: answer(32)}, order=[1, 2, 3])
    exchange = StageExchange(grid, round=1)
    exchange.fail(9, "earlier", FailureKind.EXCLUDED, "left out before this stage")
    assert exchange.send("s", requests([1, 2, 3]), accept) == (1, 3)
    assert total["sum"] == 42  # node 2's reply changed nothing; the nodes after it still count
    assert set(exchange.failures) == {2, 9}
    assert exchange.failures[2].kind is FailureKind.INVALID_REPLY
    assert exchange.failures[9].error == Error(ErrorCode.REFUSED, "left out before this stage")


def test_a_reply_field_of_the_wrong_type_marks_the_node_invalid() -> None:
    # Fields raises MessageFieldError for a peer's bad field: the node's fault, by default.
    folded: list[int] = []

    def accept(node: int, body: RecordDict) -> None:
        folded.append(Fields.of(body, "config").get("value", int))

    def a_str(msg: Message) -> Message:
        return msg.reply(RecordDict({"config": ConfigRecord({"value": "ten"})}))

    exchange = StageExchange(ArrivalGrid({1: answer(10), 2: a_str}), round=1)
    assert exchange.send("s", requests([1, 2]), accept) == (1,)
    assert folded == [10]
    failure = exchange.failures[2]
    assert failure.kind is FailureKind.INVALID_REPLY
    assert failure.error.reason == "config['value'] must be an int, got str"


def test_a_bug_in_accept_is_not_blamed_on_the_node() -> None:
    def accept(node: int, body: RecordDict) -> None:
        raise RuntimeError("the server's own bug")

    exchange = StageExchange(ArrivalGrid({1: answer(1)}), round=1)
    with pytest.raises(RuntimeError, match="own bug"):
        exchange.send("s", requests([1]), accept)
    # A caller may declare more errors as a node's fault (a PET's readers raise ValueError).
    refused = StageExchange(ArrivalGrid({1: answer(1)}), round=1)
    refused.send("s", requests([1]), lambda n, b: int("x"), invalid=(ValueError,))
    assert refused.failures[1].kind is FailureKind.INVALID_REPLY


def test_each_stage_names_its_message_type_and_stage() -> None:
    grid = ArrivalGrid({1: answer(1), 2: silent})
    exchange = StageExchange(grid, round=4, message_type="train")
    exchange.send("", requests([1, 2]), lambda n, b: None)
    exchange.send("pet/keys", requests([1]), lambda n, b: None, message_type="pet-keys")
    md = [m.metadata for m in grid.sent]
    assert [(m.message_type, m.stage, m.round, m.run_id) for m in md] == [
        ("train", "", 4, 7),
        ("train", "", 4, 7),
        ("pet-keys", "pet/keys", 4, 7),
    ]
    assert exchange.failures[2].stage == "train"  # a plain stage is named by its type


def test_a_stage_addresses_each_node_once() -> None:
    exchange = StageExchange(ArrivalGrid({1: answer(1)}), round=1)
    with pytest.raises(ValueError, match="each node once"):
        exchange.send("s", requests([1, 1]), lambda n, b: None)


def test_a_node_accepted_later_loses_its_earlier_failure() -> None:
    replies = iter([refuse("busy"), answer(1)])
    grid = ArrivalGrid({1: lambda m: next(replies)(m)})
    exchange = StageExchange(grid, round=1)
    exchange.send("first", requests([1]), lambda n, b: None)
    assert exchange.failures[1].kind is FailureKind.ERROR_REPLY
    assert exchange.send("second", requests([1]), lambda n, b: None) == (1,)
    assert exchange.failures == {}


def test_a_failed_round_keeps_every_nodes_reason_on_its_record() -> None:
    """A PET that gives up after two stages: the record names every node's reason."""
    grid = ArrivalGrid({1: answer(1), 2: refuse("wrong mod order"), 3: silent, 4: answer(4)})

    def pet(request: RoundRequest, context: ServerContext, call_next: Any) -> RoundResult:
        exchange = StageExchange.of(context.require_grid(), request)
        live = exchange.send("pet/advertise", requests(request.cohort), lambda n, b: None)

        def accept(node: int, body: RecordDict) -> None:
            raise InvalidUpdateError("no key")

        exchange.send("pet/share", requests(live), accept)
        raise exchange.round_failed(
            f"pet/share: 0 of {len(request.cohort)} nodes shared keys", participants=()
        )

    app = ServerApp(
        strategy=FedAvg(), num_rounds=1, initial_arrays=ArrayRecord({"w": np.zeros(2)}), mods=[pet]
    )
    record = app.run(grid, seed=0).history.round(1)
    assert record.failed and record.error == "pet/share: 0 of 4 nodes shared keys"
    assert {n: (f.stage, f.kind) for n, f in record.failures.items()} == {
        1: ("pet/share", FailureKind.INVALID_REPLY),
        2: ("pet/advertise", FailureKind.ERROR_REPLY),
        3: ("pet/advertise", FailureKind.NO_REPLY),
        4: ("pet/share", FailureKind.INVALID_REPLY),
    }
    assert record.failures[2].error.reason == "wrong mod order"


def test_round_failed_carries_the_failures_and_participants() -> None:
    exchange = StageExchange(ArrivalGrid({}), round=2)
    exchange.fail(5, "s", FailureKind.EXCLUDED, "too few neighbours")
    error = exchange.round_failed("s: round 2: nothing left", participants=[1, 2])
    assert isinstance(error, RoundFailedError) and error.participants == (1, 2)
    assert error.failures == exchange.failures and error.failures is not exchange.failures


def test_request_messages_take_any_message_type() -> None:
    grid = ArrivalGrid({1: answer(1), 2: answer(2)})
    request = RoundRequest(round=2, cohort=(1, 2), arrays=ArrayRecord(), config=ConfigRecord())
    plain = request_messages(grid, request, RecordDict())
    keys = request_messages(grid, request, RecordDict(), message_type="pet-keys", stage="pet/a")
    assert [m.metadata.message_type for m in plain] == ["train", "train"]
    assert [(m.metadata.message_type, m.metadata.stage) for m in keys] == [
        ("pet-keys", "pet/a"),
        ("pet-keys", "pet/a"),
    ]
