"""The Grid contract: every Grid implementation passes the same suite.

The grids: the simulation's :class:`~flowerpets.simulation.SimulationGrid`, the
transport's server grid (a real :class:`~flowerpets.transport.TransportServer`
on 127.0.0.1 with nodes on threads, as ``tests/transport/conftest.py`` starts
them), the tests' ``ScriptedGrid`` (``tests/conftest.py``), and DP's
server-side clipping grid (``dp/central/_checking_grid.py``) wrapped around a simulation.

Each runs the same three nodes behind one echo app and must: list its nodes in a
stable order; carry its run id; deliver any message type and any stage; match
every reply to its request (several requests to one node in one call too);
carry a node's error reply as it is; yield nothing for a node that does not
exist (and, if its nodes run concurrently, for one that does not answer within
the timeout) instead of hanging; and carry arrays exactly. Every exchange runs
under a guard: a grid that hangs fails after ``GUARD`` seconds instead of
blocking the suite (a bound on hangs, not a speed assertion).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from flowerpets.core import (
    ArrayRecord,
    ClientApp,
    ConfigRecord,
    Context,
    ErrorCode,
    FullParticipation,
    Grid,
    Message,
    MessageType,
    RecordDict,
    RoundRequest,
    WaitsForNodes,
)
from flowerpets.core.grid import round_nodes
from flowerpets.dp.central._checking_grid import CheckingGrid
from flowerpets.exceptions import RequestRefusedError
from flowerpets.simulation import SimulationGrid
from tests.conftest import ScriptedGrid

GUARD = 30.0  # seconds before an exchange counts as hung
NODES = 3
TYPES = (MessageType.TRAIN, MessageType.EVALUATE, MessageType.QUERY, "contract.custom")
STAGES = ("", "contract/first", "contract/second")
MISSING = 987_654_321  # a node id no grid has


def echo_app(gate: threading.Event) -> ClientApp:
    """Answers every message itself: who answered what, and the request's arrays back.

    Config ``refuse`` (a node id) makes that node refuse; ``block`` makes it wait for ``gate``.
    """

    def echo(msg: Message, context: Context, call_next: Any) -> Message:
        body = msg.require_content()
        config = body.get_typed("config", ConfigRecord) if "config" in body else ConfigRecord()
        if config.get("refuse") == context.node_id:
            raise RequestRefusedError("the contract asked this node to refuse")
        if config.get("block") == context.node_id:
            gate.wait(GUARD)
        echo = ConfigRecord(
            {
                "node": context.node_id,
                "type": msg.message_type,
                "stage": msg.metadata.stage,
                "run": msg.metadata.run_id,
                "round": msg.round,
            }
        )
        reply = RecordDict({"echo": echo})
        if "arrays" in body:
            reply["arrays"] = body["arrays"]
        return msg.reply(reply)

    return ClientApp(mods=[echo])


@dataclass
class GridUnderTest:
    grid: Grid
    nodes: list[int]
    concurrent: bool  # nodes answer concurrently, so a timeout can cut a slow one off


def _simulation(gate: threading.Event) -> Iterator[GridUnderTest]:
    contexts = [Context(node_id=n) for n in (11, 22, 33)]
    with SimulationGrid(echo_app(gate), contexts, run_id=5, max_workers=4) as grid:
        yield GridUnderTest(grid, [11, 22, 33], concurrent=True)
        gate.set()


def _transport(gate: threading.Event) -> Iterator[GridUnderTest]:
    from flowerpets.transport import TransportServer
    from tests.transport.conftest import FAST_SERVER, Federation

    federation = Federation(TransportServer("127.0.0.1:0", settings=FAST_SERVER).start())
    try:
        for pid in range(NODES):
            federation.add(echo_app(gate), pid)
        nodes = sorted(client.node_id for client in federation.clients)
        yield GridUnderTest(federation.server.grid, nodes, concurrent=True)
    finally:
        gate.set()
        federation.close()


def _scripted(gate: threading.Event) -> Iterator[GridUnderTest]:
    yield GridUnderTest(ScriptedGrid(echo_app(gate), NODES), [1, 2, 3], concurrent=False)


def _dp_server_clipping(gate: threading.Event) -> Iterator[GridUnderTest]:
    """DP's checking grid with a check that passes every reply on (the grid is under test)."""
    for inner in _simulation(gate):
        request = RoundRequest(
            round=1,
            cohort=tuple(inner.nodes),
            arrays=ArrayRecord({"w": np.zeros(3, np.float32)}),
            config=ConfigRecord(),
            sampling=FullParticipation(),
        )
        checking = CheckingGrid(inner.grid, request, lambda node, arrays: arrays)
        yield GridUnderTest(checking, inner.nodes, concurrent=True)


GRIDS: dict[str, Callable[[threading.Event], Iterator[GridUnderTest]]] = {
    "simulation": _simulation,
    "transport": _transport,
    "scripted": _scripted,
    "dp-server-clipping": _dp_server_clipping,
}


@pytest.fixture(params=list(GRIDS))
def under_test(request: pytest.FixtureRequest) -> Iterator[GridUnderTest]:
    gate = threading.Event()
    try:
        yield from GRIDS[request.param](gate)
    finally:
        gate.set()


def message(
    grid: Grid,
    node: int,
    *,
    message_type: str = MessageType.TRAIN,
    stage: str = "",
    config: dict[str, Any] | None = None,
    arrays: dict[str, np.ndarray] | None = None,
    round: int = 1,
) -> Message:
    content = RecordDict({"config": ConfigRecord(config or {})})
    if arrays is not None:
        content["arrays"] = ArrayRecord(arrays)
    return Message.create(
        content,
        message_type=message_type,
        dst_node_id=node,
        round=round,
        run_id=grid.run_id,
        stage=stage,
    )


def exchange(grid: Grid, messages: Sequence[Message], timeout: float | None = 20) -> list[Message]:
    """Every reply ``send_and_receive`` yields; fails (instead of hanging) after ``GUARD`` s."""
    replies: list[Message] = []
    failed: list[BaseException] = []

    def run() -> None:
        try:
            replies.extend(grid.send_and_receive(messages, timeout=timeout))
        except BaseException as exc:  # reported in the test's thread
            failed.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(GUARD)
    assert not thread.is_alive(), f"send_and_receive still running after {GUARD} s"
    if failed:
        raise failed[0]
    return replies


def answered(requests: Sequence[Message], replies: Sequence[Message]) -> dict[str, Message]:
    """Request id -> its reply; fails on a reply to no request or to one request twice."""
    by_id = {m.metadata.message_id: m for m in requests}
    matched: dict[str, Message] = {}
    for reply in replies:
        request_id = reply.metadata.reply_to_message_id
        assert request_id in by_id, "a reply to no request sent in this call"
        assert request_id not in matched, "two replies to one request"
        assert reply.is_reply_to(by_id[request_id])
        matched[request_id] = reply
    return matched


def test_is_a_grid_with_stable_node_ids_and_a_run_id(under_test: GridUnderTest) -> None:
    grid = under_test.grid
    assert isinstance(grid, Grid)
    ids = list(grid.node_ids())
    assert ids == list(grid.node_ids()) == under_test.nodes  # stable, and the nodes there are
    assert len(set(ids)) == NODES and all(isinstance(n, int) and n > 0 for n in ids)
    assert isinstance(grid.run_id, int) and grid.run_id == grid.run_id


def test_a_round_starts_with_every_connected_node(under_test: GridUnderTest) -> None:
    # The round-start hook (WaitsForNodes, where a grid has it) returns at once when every
    # node is there, with the nodes node_ids() lists; run under the guard, like an exchange.
    grid, started = under_test.grid, []
    thread = threading.Thread(target=lambda: started.append(round_nodes(grid)), daemon=True)
    thread.start()
    thread.join(GUARD)
    assert started == [list(grid.node_ids())] == [under_test.nodes]
    declared = isinstance(grid, WaitsForNodes)
    assert declared == (type(grid).__name__ in {"SimulationGrid", "TransportGrid"})


def test_any_message_type_and_stage_reaches_its_node(under_test: GridUnderTest) -> None:
    grid = under_test.grid
    requests = [
        message(grid, node, message_type=t, stage=s)
        for node in under_test.nodes
        for t in TYPES
        for s in STAGES
    ]
    matched = answered(requests, exchange(grid, requests))
    assert len(matched) == len(requests)
    for req in requests:
        reply = matched[req.metadata.message_id]
        echo = reply.require_content().get_typed("echo", ConfigRecord)
        assert dict(echo) == {
            "node": req.metadata.dst_node_id,
            "type": req.message_type,
            "stage": req.metadata.stage,
            "run": grid.run_id,
            "round": 1,
        }
        md = reply.metadata
        assert (md.run_id, md.message_type, md.stage, md.round) == (
            grid.run_id,
            req.message_type,
            req.metadata.stage,
            1,
        )


def test_several_requests_to_one_node_each_get_their_own_reply(
    under_test: GridUnderTest,
) -> None:
    grid, node = under_test.grid, under_test.nodes[0]
    requests = [message(grid, node, stage=f"contract/{i}", round=i + 1) for i in range(4)]
    matched = answered(requests, exchange(grid, requests))
    assert len(matched) == 4
    for req in requests:
        echo = matched[req.metadata.message_id].require_content().get_typed("echo", ConfigRecord)
        assert (echo["stage"], echo["round"]) == (req.metadata.stage, req.round)


def test_arrays_arrive_exactly(under_test: GridUnderTest) -> None:
    grid = under_test.grid
    arrays = {
        "w": np.arange(12, dtype=np.float32).reshape(3, 4) / 7,
        "b": np.array([-(2**62), 2**62], np.int64),
        "flags": np.array([True, False]),
        "c": np.array([1 + 2j], np.complex128),
    }
    requests = [message(grid, n, arrays=arrays) for n in under_test.nodes]
    for reply in answered(requests, exchange(grid, requests)).values():
        got = reply.require_content().get_typed("arrays", ArrayRecord)
        assert list(got) == list(arrays)
        for name, value in arrays.items():
            out = got[name].numpy()
            assert out.dtype == value.dtype and np.array_equal(out, value), name


def test_an_error_reply_arrives_as_the_node_sent_it(under_test: GridUnderTest) -> None:
    grid = under_test.grid
    refusing = under_test.nodes[1]
    requests = [message(grid, n, config={"refuse": refusing}) for n in under_test.nodes]
    matched = answered(requests, exchange(grid, requests))
    assert len(matched) == NODES
    for req in requests:
        reply = matched[req.metadata.message_id]
        if req.metadata.dst_node_id == refusing:
            assert reply.content is None and reply.error is not None
            assert reply.error.code is ErrorCode.REFUSED
            assert "asked this node to refuse" in reply.error.reason
        else:
            assert reply.error is None


def test_a_node_that_does_not_exist_gets_no_reply_and_nothing_hangs(
    under_test: GridUnderTest,
) -> None:
    grid = under_test.grid
    requests = [message(grid, n) for n in [*under_test.nodes, MISSING]]
    matched = answered(requests, exchange(grid, requests, timeout=None))
    assert {m.metadata.src_node_id for m in matched.values()} == set(under_test.nodes)
    assert exchange(grid, [message(grid, MISSING)], timeout=None) == []
    assert exchange(grid, []) == []


def test_a_node_that_does_not_answer_in_time_is_cut_off(under_test: GridUnderTest) -> None:
    if not under_test.concurrent:
        pytest.skip("this grid's nodes answer one after another, in the caller's thread")
    grid = under_test.grid
    slow = under_test.nodes[0]
    requests = [message(grid, n, config={"block": slow}) for n in under_test.nodes]
    matched = answered(requests, exchange(grid, requests, timeout=1.0))
    assert {m.metadata.src_node_id for m in matched.values()} == set(under_test.nodes) - {slow}
