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
import signal
import threading
import tracemalloc
from pathlib import Path
from typing import Any

import grpc
import pytest

from flowerpets.core import ClientApp
from flowerpets.transport import ByeCode, Credentials, ExitCode, NodeKey
from flowerpets.transport._frames import Head, chunk_frames, digest

from .conftest import FAST_CLIENT, Federation, Processes, RawNode, wait_until
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
