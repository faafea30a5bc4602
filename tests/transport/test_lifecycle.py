"""A server's life and its ends: restarts, shutdowns, outages, and what a dead stream leaves.

Issue 9 (items 8, 11, 12): a HELLO recorded on one server's life is refused by
the next; a node that connects while the server stops exits 0; what a
connection was receiving is freed when it ends, without the cycle collector;
decoding a message is bounded by the message limit; the run survives a short
outage and a paused server; a run config that could never reach a node is
refused at start.
"""

from __future__ import annotations

import gc
import json
import re
import signal
import threading
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest

from flowerpets.core import ClientApp, ConfigRecord, Message, MessageType, RecordDict
from flowerpets.core.codec import CodecLimits
from flowerpets.exceptions import MessageTooLargeError
from flowerpets.transport import ByeCode, Credentials, ExitCode, NodeKey, TransportServer
from flowerpets.transport._frames import (
    Head,
    chunk_frames,
    digest,
    encode_content,
    envelope_parts,
    open_envelope,
)

from .conftest import FAST_CLIENT, FAST_SERVER, Federation, Processes, RawNode, wait_until
from .test_processes import CLIENT_APP, FAST, server_apps, tls_client_args, tls_server_args


# -- item 12: a node that connects while the server stops -----------------------------------------
def test_a_node_that_connects_while_the_server_stops_exits_0_the_run_is_over(
    federation: Federation, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = federation.server
    listener = server._server
    assert listener is not None
    late: list[Any] = []
    real_stop = listener.stop

    def stop_listening(grace: float | None) -> threading.Event:
        # The goodbyes are said, the port still listens: a node connects now.
        late.append(federation.add(ClientApp(), wait=False, settings=FAST_CLIENT))
        late.append(federation.exit_of(late[0], timeout=30))
        return real_stop(grace)

    monkeypatch.setattr(listener, "stop", stop_listening)
    server.stop("the run is over", code=ByeCode.RUN_FINISHED)
    _, outcome = late
    assert outcome.code == ExitCode.FINISHED == 0, outcome
    assert outcome.reason == "the server let this node go: the run is over"


# -- item 8: a HELLO recorded on one server's life, replayed to the next --------------------------
def test_a_hello_replayed_to_a_restarted_server_is_refused_and_evicts_no_one(
    processes: Processes, credentials: Credentials, tmp_path: Path
) -> None:
    ca = credentials.ca_certificate.read_bytes()  # type: ignore[union-attr]
    key = NodeKey.load(credentials.node_keys[0])
    args = [*server_apps("rounds=1", f"gate-file={tmp_path / 'gate'}", "gate-round=1"), *FAST]
    first, port = processes.server(*args, *tls_server_args(credentials), name="first")
    recorder = RawNode(port, key=key, root_certificates=ca)
    recorded = recorder.hello()
    recorder.join(recorded)  # the genuine HELLO, as an eavesdropper on the node's side saw it
    # The run has started and waits at round 1's gate: SIGTERM must end that wait too.
    first.wait_for_log(r"starting the run with 1 node")
    recorder.close()
    first.signal(signal.SIGTERM)
    assert first.wait() == 0, first.log()

    second, port = processes.server(*args, *tls_server_args(credentials), name="second")
    node = processes.client("node-0", port, *CLIENT_APP, *tls_client_args(credentials, 0))
    second.wait_for_log(rf"node {key.node_id} \(node-0, .*\) joined")
    replayed = RawNode(port, key=key, root_certificates=ca)
    replayed.challenge  # noqa: B018 - the restarted server's challenge, which it cannot answer
    replayed.send(recorded.encode())
    assert replayed.wait_closed()[0] == grpc.StatusCode.UNAUTHENTICATED
    second.wait_for_log(r"\[ReplayError\] node key SHA256:\w+: this HELLO answers the challenge")
    replayed.close()
    (tmp_path / "gate").touch()  # the run goes on, with the genuine node
    assert second.wait() == 0, second.log()
    assert node.wait() == 0, node.log()
    assert "reconnected; closing its previous connection" not in second.log()
    assert "round 1: 1 participant(s), 0 failure(s)" in second.log()


# -- item 8: what a dead connection was receiving is freed at once, cycle collector or not --------
def test_a_partial_message_is_freed_when_its_connection_ends_without_the_cycle_collector(
    federation: Federation,
) -> None:
    server = federation.server
    announced, sent, uploads = 6 << 20, 3 << 20, 3
    gc.disable()  # only what is freed deterministically counts
    tracemalloc.start()
    try:
        for index in range(uploads):
            node = RawNode(server.port)
            node.join()
            seq = node.next_seq()
            data = bytes(announced)
            node.send(node.signed(Head(seq, announced, digest(data))))
            node.send(*chunk_frames(seq, [data[:sent]], 1 << 16))
            del data
            goal = (index + 1) * sent
            wait_until(lambda: server.stats().bytes_received > goal, what="chunks")  # noqa: B023
            node.close()
            wait_until(lambda: not server.node_ids(), what="the connection to end")
        # The reassembler's buffers are allocated in _frames.py: none may be left.
        snapshot = tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(True, "*flowerpets/transport/_frames.py")]
        )
        held = sum(stat.size for stat in snapshot.statistics("filename"))
    finally:
        tracemalloc.stop()
        gc.enable()
    assert held < 1 << 20, f"{held / 2**20:.1f} MiB of dead uploads still held"


# -- item 11: between rounds, the grid waits (bounded) for min_nodes to be back --------------------
def test_the_grid_waits_for_min_nodes_and_a_wait_in_vain_is_not_repeated_before_an_exchange(
    federation_factory: Callable[..., Federation], caplog: pytest.LogCaptureFixture
) -> None:
    settings = replace(FAST_SERVER, min_nodes=2, wait_for_nodes=1.0)
    federation = federation_factory(settings=settings)
    grid = federation.server.grid
    first = federation.add(ClientApp(), 0)
    assert grid.node_ids() == [first.node_id]  # listing the nodes never waits
    assert "for nodes to (re)connect" not in caplog.text
    assert grid.wait_for_nodes() == [first.node_id]  # one of two after a wait in vain
    assert grid.wait_for_nodes() == [first.node_id]  # no second wait before an exchange
    assert caplog.text.count("waiting up to 1 s for nodes to (re)connect") == 1
    assert "still 1 of 2 node(s) after 1 s; going on" in caplog.text
    list(grid.send_and_receive([]))  # an exchange: the next round waits again
    federation.server.settings = replace(settings, wait_for_nodes=30.0)
    joined: list[list[int]] = []
    waiter = threading.Thread(target=lambda: joined.append(grid.wait_for_nodes()))
    waiter.start()
    wait_until(lambda: caplog.text.count("for nodes to (re)connect") == 2, what="the wait")
    second = federation.add(ClientApp(), 1)
    waiter.join(30)
    assert joined == [sorted([first.node_id, second.node_id])]


# -- item 11: a run config no node could receive is refused at start ------------------------------
def test_a_run_config_too_large_for_the_welcome_is_refused_at_start() -> None:
    with pytest.raises(ValueError, match=r"the run config takes \d+ bytes.*no node could join"):
        TransportServer("127.0.0.1:0", run_config={"blob": "x" * ((1 << 20) + 8192)})
    TransportServer("127.0.0.1:0", run_config={"blob": "x" * 1000_000})  # fits in 1 MiB


def test_a_node_whose_chunks_are_too_small_for_the_welcome_is_told_why(
    federation_factory: Callable[..., Federation],
) -> None:
    federation = federation_factory(run_config={"blob": "x" * 8000})
    small = replace(FAST_CLIENT, max_chunk_bytes=1024)
    client = federation.add(ClientApp(), 0, wait=False, settings=small)
    outcome = federation.exit_of(client)
    assert outcome.code == ExitCode.PROTOCOL, outcome
    assert "[FrameError] the run config makes a WELCOME frame of" in outcome.reason


def test_the_server_process_refuses_an_oversized_run_config_at_start(
    processes: Processes,
) -> None:
    values = [f"k{i}={'v' * 100_000}" for i in range(12)]  # 1.2 MB: a command line holds it
    server = processes.start("server", "server", *server_apps(*values), "--address", "127.0.0.1:0")
    assert server.wait() == 2, server.log()
    assert re.search(r"cannot start the server: the run config takes \d+ bytes", server.log())
    assert "no node could join" in server.log() and "Traceback" not in server.log()


# -- item 11: an outage of every node, or a paused server, delays the run, never ends it --------
def _rounds(path: Path) -> list[tuple[int, str | None]]:
    rounds = json.loads(path.read_text())["history"]
    return [(r["participants"], r["error"]) for r in rounds]


@pytest.mark.slow
def test_the_run_waits_for_its_nodes_after_every_node_missed_its_heartbeats(
    processes: Processes, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    server, port = processes.server(
        *server_apps("rounds=3", f"gate-file={gate}", "gate-round=2"),
        *("--min-nodes", "2", "--round-min-nodes", "2", "--wait-for-nodes", "60", *FAST),
        *("--history", "history.json"),
    )
    clients = [
        processes.client(f"client-{i}", port, *CLIENT_APP, "--node-config", f"partition-id={i}")
        for i in range(2)
    ]
    server.wait_for_log(r"round 1: 2 participant\(s\)")  # round 2 waits at its gate
    for client in clients:
        client.signal(signal.SIGSTOP)  # an outage: every node misses its heartbeats
    wait_until(lambda: server.log().count("dropping the node") == 2, what="both dropped")
    gate.touch()  # round 2 goes to nodes that are gone; round 3 must wait for them
    server.wait_for_log(r"0 of 2 node\(s\) connected: waiting up to 60 s")
    for client in clients:
        client.signal(signal.SIGCONT)
    assert server.wait() == 0, server.log()
    for client in clients:
        assert client.wait() == 0, client.log()
    rounds = _rounds(tmp_path / "history.json")
    assert rounds[0] == (2, None) and rounds[2] == (2, None), rounds


@pytest.mark.slow
def test_a_paused_server_resumes_and_its_nodes_rejoin_the_run(
    processes: Processes, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    server, port = processes.server(
        *server_apps("rounds=3", f"gate-file={gate}", "gate-round=2"),
        *("--min-nodes", "2", "--round-min-nodes", "2", "--wait-for-nodes", "60", *FAST),
        *("--history", "history.json"),
    )
    clients = [
        processes.client(f"client-{i}", port, *CLIENT_APP, "--node-config", f"partition-id={i}")
        for i in range(2)
    ]
    server.wait_for_log(r"round 1: 2 participant\(s\)")
    server.signal(signal.SIGSTOP)
    time.sleep(9)  # three heartbeat timeouts: the nodes give up on this connection
    server.signal(signal.SIGCONT)
    gate.touch()
    assert server.wait() == 0, server.log()
    for client in clients:
        assert client.wait() == 0, client.log()
    assert "the server did not run for" in server.log()
    rounds = _rounds(tmp_path / "history.json")
    assert len(rounds) == 3 and rounds[2] == (2, None), rounds


# -- item 8: decoding a message is bounded by the message limit, not 4-25 times it --------------
def _config_reply(values: list[Any]) -> Message:
    request = Message.create(RecordDict(), message_type=MessageType.TRAIN, dst_node_id=5, round=1)
    return request.reply(RecordDict({"config": ConfigRecord({"x": values})}))


@pytest.mark.parametrize(
    "values",
    [[True] * 400_000, list(range(2**40, 2**40 + 50_000)), [b"a"] * 80_000],
    ids=["bools", "ints", "bytes"],
)
def test_decoding_a_message_builds_no_more_than_its_limit(values: list[Any]) -> None:
    message = _config_reply(values)
    limits = CodecLimits(max_message_bytes=512 << 10)
    data = b"".join(envelope_parts(message, encode_content(message, limits), limits))
    assert 256 << 10 < len(data) < 512 << 10  # the message fits its limit; its objects would not
    del message, values
    tracemalloc.start()
    try:
        with pytest.raises(MessageTooLargeError, match="decoding would build more than"):
            open_envelope(data, limits)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"{peak / 2**20:.1f} MiB built before the refusal"
    roomy = CodecLimits(max_message_bytes=512 << 10, max_decoded_bytes=100 << 20)
    assert len(open_envelope(data, roomy).content["config"]["x"]) > 0  # type: ignore[arg-type,index]


def test_the_server_refuses_a_reply_that_would_decode_past_its_limit(
    federation_factory: Callable[..., Federation], caplog: pytest.LogCaptureFixture
) -> None:
    settings = replace(FAST_SERVER, max_message_bytes=2 << 20)
    federation = federation_factory(settings=settings)
    reply = _config_reply(list(range(2**40, 2**40 + 200_000)))  # 1.5 MiB, 8 MiB of objects
    data = b"".join(envelope_parts(reply, encode_content(reply, CodecLimits()), CodecLimits()))
    node = RawNode(federation.server.port)
    node.join()
    node.send(*node.message(data))  # decoded before it is routed
    code, details = node.wait_closed()
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
    assert "[MessageTooLargeError]" in details and "decoding would build more than" in details
    node.close()
