"""A bug is never taken for a peer's fault, on either side (issue 10, item 4).

The node refuses (``REFUSED``) what a server's stage request gets wrong, and
only that: a field missing or mistyped, a value the protocol forbids. A bare
built-in raised inside a stage is a bug of the node's own code: its reply says
so (``MOD_RAISED_EXCEPTION``), and the round is still aborted (its secrets
wiped). The server marks a reply it cannot use as that node's failure, and
only that: a bare built-in raised while it checks a reply fails the round
without blaming the node.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import flowerpets.secagg._node_stages as node_stages
from flowerpets.core import (
    ArrayRecord,
    ClientApp,
    ConfigRecord,
    Context,
    ErrorCode,
    FailureKind,
    FedAvg,
    Message,
    MetricRecord,
    RecordDict,
    ServerApp,
)
from flowerpets.secagg import Phase, SecAggPlus, Stage, secaggplus_mod
from flowerpets.secagg._node_state import SLOT
from flowerpets.secagg.protocol import RECORD, Layout
from flowerpets.simulation import run_simulation

PARAMS = 8


def _share_fields(fed: Any, node: int, change: dict[str, Any]) -> dict[str, Any]:
    fields = {**fed.share_fields(node), **change}
    return {k: v for k, v in fields.items() if v is not None}


@pytest.mark.parametrize(
    "change",
    [
        {"c-pks": None},  # missing
        {"nodes": "all"},  # mistyped
        {"nodes": [True, True, True, True]},  # a bool is not a node id
        {"s-pks": [b"short"] * 4},  # not an X25519 key
        {"nodes": [1, 2, 3, 4]},  # strangers: a protocol violation
    ],
    ids=["missing", "mistyped", "bool-node", "short-key", "strangers"],
)
def test_a_bad_request_is_a_refusal(federation: Any, change: dict[str, Any]) -> None:
    fed = federation(6, degree=4, threshold=3, params=PARAMS)
    fed.advertise()
    node = fed.ids[0]
    reply = fed.ask(node, Stage.SHARE_KEYS, _share_fields(fed, node, change))
    assert reply.error is not None and reply.error.code == ErrorCode.REFUSED, reply.error
    state = SLOT.get(fed.contexts[node].state)
    assert state is not None and state.phase is Phase.ABORTED


@pytest.mark.parametrize(
    ("where", "stage", "error"),
    [
        ("share_key", Stage.SHARE_KEYS, KeyError),
        ("check_threshold", Stage.ADVERTISE_KEYS, ValueError),
    ],
)
def test_a_bug_inside_a_stage_is_not_a_refusal(
    federation: Any,
    monkeypatch: pytest.MonkeyPatch,
    where: str,
    stage: str,
    error: type[Exception],
) -> None:
    fed = federation(6, degree=4, threshold=3, params=PARAMS)
    node = fed.ids[0]

    def broken(*args: object, **kwargs: object) -> object:
        raise error("a bug in the node's own code")

    monkeypatch.setattr(node_stages, where, broken)
    if stage == Stage.ADVERTISE_KEYS:
        reply = fed.ask(node, stage, fed.advertise_message_fields())
    else:
        monkeypatch.undo()
        fed.advertise()
        monkeypatch.setattr(node_stages, where, broken)
        reply = fed.ask(node, stage, fed.share_fields(node))
    assert reply.error is not None
    assert reply.error.code == ErrorCode.MOD_RAISED_EXCEPTION, reply.error
    assert error.__name__ in reply.error.reason
    if stage == Stage.SHARE_KEYS:  # a round under way is aborted all the same
        state = SLOT.get(fed.contexts[node].state)
        assert state is not None and state.phase is Phase.ABORTED and state.s_sk == b""


def test_the_control_an_honest_request_is_answered(federation: Any) -> None:
    fed = federation(6, degree=4, threshold=3, params=PARAMS)
    fed.advertise()
    node = fed.ids[0]
    assert fed.ask(node, Stage.SHARE_KEYS, fed.share_fields(node)).error is None


# -- the server ---------------------------------------------------------------------------
def _client_app(mods: list[Any]) -> ClientApp:
    app = ClientApp(mods=mods)

    @app.train()
    def train(msg: Message, context: Context) -> RecordDict:
        i = int(context.node_config["partition-id"])  # type: ignore[arg-type]
        return RecordDict(
            {
                "arrays": ArrayRecord({"w": np.full(PARAMS, 0.5 * i, np.float32)}),
                "metrics": MetricRecord({"num-examples": 2}),
            }
        )

    return app


def _run(client: ClientApp, n: int = 6) -> Any:
    server = ServerApp(
        strategy=FedAvg(),
        num_rounds=1,
        initial_arrays=ArrayRecord({"w": np.zeros(PARAMS, np.float32)}),
        mods=[SecAggPlus(degree=4, threshold=3, rng=np.random.default_rng(1))],
    )
    return run_simulation(server, client, n, seed=0, max_workers=2).history.round(1)


def test_a_bug_in_the_servers_reply_check_fails_the_round_not_the_node(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(cls: type, *args: object) -> object:
        raise KeyError("a bug in the server's own code")

    monkeypatch.setattr(Layout, "read", classmethod(broken))
    record = _run(_client_app([secaggplus_mod]))
    assert record.failed and "KeyError" in (record.error or "")
    assert not any(
        f.stage == Stage.COLLECT_MASKED_INPUT and f.kind is FailureKind.INVALID_REPLY
        for f in record.failures.values()
    ), record.failures


def _without_length(body: ConfigRecord) -> None:
    del body["length"]


def _named_twice(body: ConfigRecord) -> None:
    # Well typed and of the right length: only the repeated name is wrong.
    body["names"], body["kinds"] = ["w", "w"], ["f", "f"]
    body["ndims"], body["dims"] = [1, 1], [PARAMS // 2, PARAMS // 2]


@pytest.mark.parametrize(
    ("edit", "reason"),
    [(_without_length, "'length'"), (_named_twice, "names an array twice")],
    ids=["no-length", "named-twice"],
)
def test_a_malformed_masked_input_is_the_nodes_failure(edit: Any, reason: str) -> None:
    """The control of the test above: a reply with a broken layout marks its node only."""

    def tamper(msg: Message, context: Context, call_next: Any) -> Message:
        reply = call_next(msg, context)
        first = context.node_config["partition-id"] == 0
        if msg.metadata.stage != Stage.COLLECT_MASKED_INPUT or not first or reply.has_error:
            return reply
        content = reply.require_content()
        body = ConfigRecord(content[RECORD])  # type: ignore[arg-type]
        edit(body)
        content[RECORD] = body
        return reply

    record = _run(_client_app([tamper, secaggplus_mod]))
    assert record.ok, record.error
    (failed,) = [node for node, f in record.failures.items() if f.stage.startswith(Stage.PREFIX)]
    failure = record.failures[failed]
    assert failure.stage == Stage.COLLECT_MASKED_INPUT
    assert failure.kind is FailureKind.INVALID_REPLY and reason in failure.error.reason
    assert failed not in record.participants and len(record.participants) == 5
