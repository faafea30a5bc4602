"""The TransportGrid in one process: a real gRPC server, real nodes on threads.

These check the Grid contract (replies as they arrive, nothing from a node that
is gone, timeouts), node identity and state across reconnections, chunking of
large messages, TLS, refusals the node sees, and orderly shutdown.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from flowerpets.core import (
    ArrayRecord,
    ClientApp,
    ConfigRecord,
    Context,
    ErrorCode,
    FedAvg,
    Grid,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
    ServerApp,
    collect,
)
from flowerpets.simulation import run_simulation
from flowerpets.transport import (
    ClientSettings,
    ClientTls,
    ExitCode,
    NodeKey,
    ServerSettings,
    ServerTls,
    TransportGrid,
    create_credentials,
    load_public_keys,
)

from .conftest import Federation, RawNode, wait_until


def counting_app(size: int = 3, *, gate: threading.Event | None = None) -> ClientApp:
    """Update ``(pid + 1) * ones``; counts its rounds in its state; may wait for ``gate``."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> RecordDict:
        pid = int(context.node_config["partition-id"])  # type: ignore[arg-type]
        counter = context.state.get("counter", MetricRecord({"rounds": 0}))
        assert isinstance(counter, MetricRecord)
        counter["rounds"] = int(counter["rounds"]) + 1  # type: ignore[call-overload]
        context.state["counter"] = counter
        if gate is not None and pid == 0:
            gate.wait(30)
        update = np.full(size, pid + 1, np.float32)
        metrics = MetricRecord({"num-examples": pid + 1, "rounds": counter["rounds"]})
        return RecordDict({"arrays": ArrayRecord({"w": update}), "metrics": metrics})

    @app.query()
    def query(msg: Message, context: Context) -> RecordDict:
        return RecordDict({"echo": ConfigRecord({"node": context.node_id})})

    return app


def server_app(num_rounds: int = 3, size: int = 3, **fedavg: object) -> ServerApp:
    return ServerApp(
        strategy=FedAvg(**fedavg),  # type: ignore[arg-type]
        num_rounds=num_rounds,
        initial_arrays=ArrayRecord({"w": np.zeros(size, np.float32)}),
    )


def query(grid: Grid, nodes: list[int], *, timeout: float | None = 20) -> list[Message]:
    messages = [
        Message.create(
            RecordDict(), message_type=MessageType.QUERY, dst_node_id=n, round=1, run_id=grid.run_id
        )
        for n in nodes
    ]
    return list(collect(grid, messages, timeout=timeout))


def finishes_within(seconds: float, fn: Callable[[], object]) -> object:
    """Run ``fn`` on a thread; fail if it has not returned within ``seconds`` (a liveness bound)."""
    out: list[object] = []
    thread = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    thread.start()
    thread.join(seconds)
    assert out, f"still waiting after {seconds} s"
    return out[0]


def test_a_run_over_grpc_equals_the_simulation(federation: Federation) -> None:
    grid = federation.server.grid
    assert isinstance(grid, Grid) and isinstance(grid, TransportGrid)
    app = counting_app()
    keys = [NodeKey.generate() for _ in range(4)]
    clients = [federation.add(app, pid, key=keys[pid]) for pid in range(4)]
    assert grid.node_ids() == sorted(k.node_id for k in keys)
    result = server_app().run(grid)
    expected = run_simulation(server_app(), counting_app(), 4, seed=1)
    np.testing.assert_array_equal(result.arrays["w"].numpy(), expected.arrays["w"].numpy())
    np.testing.assert_allclose(result.arrays["w"].numpy(), (1 + 4 + 9 + 16) / 10)
    assert [len(r.participants) for r in result.history.rounds] == [4, 4, 4]
    for client in clients:  # each node's state survived the rounds, in its own context
        context = client.context(grid.run_id)
        assert context.node_id == client.node_id and context.run_id == grid.run_id
        assert context.state.get_typed("counter", MetricRecord)["rounds"] == 3


def test_the_run_config_reaches_the_nodes_and_factories_run_once_per_run(
    federation_factory: Callable[..., Federation],
) -> None:
    federation = federation_factory(run_config={"seed": 11, "lr": 0.5})
    built: list[Context] = []

    def factory(context: Context) -> ClientApp:
        built.append(context)
        return counting_app()

    client = federation.add(factory, 2)
    server_app(num_rounds=2).run(federation.server.grid)
    assert len(built) == 1
    assert dict(built[0].run_config) == {"seed": 11, "lr": 0.5}
    assert dict(built[0].node_config) == {"partition-id": 2}
    assert built[0] is client.context(federation.server.run_id)


def test_a_million_parameters_travel_exactly_in_chunks(federation: Federation) -> None:
    rng = np.random.default_rng(0)
    update = rng.standard_normal(1_000_000).astype(np.float32)
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> RecordDict:
        received = msg.require_content().get_typed("arrays", ArrayRecord)["w"].numpy()
        assert np.array_equal(received, np.arange(1_000_000, dtype=np.float32))
        return RecordDict(
            {"arrays": ArrayRecord({"w": update}), "metrics": MetricRecord({"num-examples": 1})}
        )

    federation.add(app)
    before = federation.server.stats()
    run = ServerApp(
        strategy=FedAvg(),
        num_rounds=1,
        initial_arrays=ArrayRecord({"w": np.arange(1_000_000, dtype=np.float32)}),
    ).run(federation.server.grid)
    assert np.array_equal(run.arrays["w"].numpy(), update)
    after = federation.server.stats()
    sent = after.bytes_sent - before.bytes_sent
    received = after.bytes_received - before.bytes_received
    # 4 MB each way, in 64 KiB chunks of 22 bytes' framing, plus the metadata and headers.
    assert 4_000_000 < sent < 4_000_000 * 1.01 and 4_000_000 < received < 4_000_000 * 1.01
    assert after.messages_sent - before.messages_sent == 1


def test_nodes_that_are_not_connected_or_in_another_run_get_nothing(federation: Federation) -> None:
    client = federation.add(counting_app())
    grid = federation.server.grid
    assert finishes_within(10, lambda: list(grid.send_and_receive([], timeout=60))) == []
    unknown = Message.create(
        RecordDict(), message_type="query", dst_node_id=12345, round=1, run_id=grid.run_id
    )
    other_run = Message.create(
        RecordDict(), message_type="query", dst_node_id=client.node_id, round=1, run_id=7
    )
    assert finishes_within(10, lambda: list(grid.send_and_receive([unknown, other_run]))) == []
    replies = query(grid, [client.node_id, 12345])
    assert replies[0].metadata.src_node_id == client.node_id and not replies[0].has_error
    assert replies[0].require_content().get_typed("echo", ConfigRecord)["node"] == client.node_id
    assert replies[1].error is not None and replies[1].error.code == ErrorCode.NODE_UNAVAILABLE


def test_a_node_that_leaves_mid_round_is_a_dropout_at_once(
    federation: Federation, caplog: pytest.LogCaptureFixture
) -> None:
    gate = threading.Event()
    app = counting_app(gate=gate)
    leaving = federation.add(app, 0)
    federation.add(app, 1)
    federation.add(app, 2)

    def leave_while_busy() -> None:
        wait_until(lambda: leaving._contexts, 20, "the node to start training")
        leaving.stop("leaving mid-round")

    threading.Thread(target=leave_while_busy, daemon=True).start()
    # No timeout anywhere: only the runtime knowing the node is gone ends the wait.
    result = finishes_within(30, lambda: server_app(num_rounds=1).run(federation.server.grid))
    gate.set()
    record = result.history[0]  # type: ignore[attr-defined]
    assert len(record.participants) == 2
    assert record.failures[leaving.node_id].error.code == ErrorCode.NODE_UNAVAILABLE
    np.testing.assert_allclose(result.arrays["w"].numpy(), (4 + 9) / 5)  # type: ignore[attr-defined]
    assert federation.exit_of(leaving).code == ExitCode.FINISHED
    assert "1 message(s) unanswered" in caplog.text


def test_a_slow_node_times_out_and_its_late_reply_is_dropped(
    federation: Federation, caplog: pytest.LogCaptureFixture
) -> None:
    gate = threading.Event()
    slow = federation.add(counting_app(gate=gate), 0)
    federation.add(counting_app(), 1)
    caplog.set_level(logging.INFO)
    result = server_app(num_rounds=1, round_timeout=2.0).run(federation.server.grid)
    record = result.history[0]
    assert record.participants == tuple(
        n for n in federation.server.node_ids() if n != slow.node_id
    )
    assert record.failures[slow.node_id].error.code == ErrorCode.TIMEOUT
    gate.set()
    wait_until(lambda: "no exchange waits for (late, or unknown)" in caplog.text, 20)
    assert query(federation.server.grid, [slow.node_id])[0].has_error is False  # still serving


def test_a_silent_node_is_dropped_after_the_heartbeat_timeout(
    federation: Federation, caplog: pytest.LogCaptureFixture
) -> None:
    raw = RawNode(federation.server.port)
    raw.join()  # then says nothing, not even heartbeats
    grid = federation.server.grid
    assert raw.key.node_id in grid.node_ids()
    replies = finishes_within(20, lambda: query(grid, [raw.key.node_id], timeout=None))
    assert replies[0].error is not None  # type: ignore[index]
    assert replies[0].error.code == ErrorCode.NODE_UNAVAILABLE  # type: ignore[index]
    assert "nothing received for" in caplog.text and "the node died or hangs" in caplog.text
    assert raw.key.node_id not in federation.server.node_ids()  # the grid's would wait for it
    raw.close()


def test_a_reconnecting_node_keeps_its_id_and_its_state(federation: Federation) -> None:
    key = NodeKey.generate()
    federation.add(counting_app(), 0, key=key)
    server = federation.server
    server_app(num_rounds=1).run(server.grid)
    with server._lock:
        session = server._sessions[key.node_id]
    server._kill(session, "the test cuts the connection")
    wait_until(
        lambda: key.node_id in server.node_ids() and server._sessions[key.node_id] is not session,
        20,
    )
    result = server_app(num_rounds=1).run(server.grid)
    assert result.history[0].participants == (key.node_id,)
    assert result.history[0].train_metrics["rounds"] == 2  # the context survived
    assert server.stats().connections == 2


def test_a_late_node_joins_the_next_round(federation: Federation) -> None:
    federation.add(counting_app(), 0)
    grid = federation.server.grid
    first = server_app(num_rounds=1).run(grid)
    late = federation.add(counting_app(), 1)
    second = server_app(num_rounds=1).run(grid)
    assert len(first.history[0].participants) == 1
    assert late.node_id in second.history[0].participants


def test_a_second_connection_with_the_same_key_replaces_the_first(federation: Federation) -> None:
    key = NodeKey.generate()
    first = federation.add(counting_app(), 0, key=key)
    second = federation.add(counting_app(), 0, key=key, wait=False)
    outcome = federation.exit_of(first)
    assert outcome.code == ExitCode.REPLACED
    assert "a newer connection with the same node key replaced this one" in outcome.reason
    wait_until(lambda: key.node_id in federation.server.node_ids(), 20)
    assert not query(federation.server.grid, [second.node_id])[0].has_error


def test_stop_ends_the_run_early_and_lets_the_nodes_go(federation: Federation) -> None:
    gate = threading.Event()
    clients = [federation.add(counting_app(gate=gate), pid) for pid in range(2)]
    server = federation.server
    results: list[object] = []
    thread = threading.Thread(
        target=lambda: results.append(server_app(num_rounds=5).run(server.grid)), daemon=True
    )
    thread.start()
    wait_until(lambda: clients[0]._contexts, 20, "round 1 to start")
    server.request_stop("received SIGTERM")
    thread.join(20)
    result = results[0]
    assert result.stopped == "received SIGTERM"  # type: ignore[attr-defined]
    assert len(result.history) == 1  # type: ignore[attr-defined]
    gate.set()
    server.stop("the server is shutting down (received SIGTERM)")
    for client in clients:
        outcome = federation.exit_of(client)
        assert outcome.code == ExitCode.FINISHED
        assert (
            outcome.reason
            == "the server let this node go: the server is shutting down (received SIGTERM)"
        )


def test_messages_too_large_for_the_other_side_become_error_replies(
    federation_factory: Callable[..., Federation],
) -> None:
    federation = federation_factory(
        settings=ServerSettings(max_message_bytes=4096, heartbeat_interval=0.2, heartbeat_timeout=3)
    )
    small = federation.add(
        counting_app(size=2000),
        0,
        settings=ClientSettings(max_message_bytes=4096, retry_for=5),
    )
    big_model = server_app(num_rounds=1, size=2000).run(federation.server.grid)
    failure = big_model.history[0].failures[small.node_id]
    assert failure.error.code == ErrorCode.UNKNOWN
    assert "the server could not send this message: [MessageTooLargeError]" in failure.error.reason
    # The other way round: the node's reply is too large for the server.
    small_model = server_app(num_rounds=1, size=8).run(federation.server.grid)
    assert small_model.history[0].participants == ()
    failure = small_model.history[0].failures[small.node_id]
    assert failure.error.code == ErrorCode.INVALID_REPLY
    assert "the reply cannot be sent" in failure.error.reason


def test_a_node_gives_up_on_an_unreachable_server() -> None:
    from flowerpets.transport import NodeClient

    client = NodeClient(
        counting_app(),
        "127.0.0.1:9",  # discard port: nothing listens
        settings=ClientSettings(retry_initial=0.05, retry_max=0.1, retry_for=0.5),
    )
    outcome = finishes_within(30, client.run)
    assert outcome.code == ExitCode.UNREACHABLE  # type: ignore[attr-defined]
    assert "no connection to 127.0.0.1:9 for 0.5 s; giving up" in outcome.reason  # type: ignore[attr-defined]


def test_an_unknown_key_is_refused_and_the_node_exits(
    federation_factory: Callable[..., Federation], caplog: pytest.LogCaptureFixture
) -> None:
    known = NodeKey.generate()
    federation = federation_factory(node_keys={known.public_bytes: "known"})
    federation.add(counting_app(), 0, key=known)
    stranger = federation.add(counting_app(), 1, wait=False)
    outcome = federation.exit_of(stranger)
    assert outcome.code == ExitCode.REFUSED
    assert "unknown node key" in outcome.reason
    assert "[AuthenticationError] unknown node key" in caplog.text
    assert federation.server.node_ids() == [known.node_id]


def test_tls_needs_the_right_ca(
    federation_factory: Callable[..., Federation], tmp_path: Path
) -> None:
    good = create_credentials(tmp_path / "good", nodes=1)
    other = create_credentials(tmp_path / "other")
    tls = ServerTls.from_files(good.server_certificate, good.server_key)  # type: ignore[arg-type]
    keys = load_public_keys([good.node_public_keys])  # type: ignore[list-item]
    federation = federation_factory(tls=tls, node_keys=keys)
    key = NodeKey.load(good.node_keys[0])
    trusted = ClientTls.from_file(good.ca_certificate)  # type: ignore[arg-type]
    client = federation.add(counting_app(), 0, key=key, tls=trusted)
    assert not query(federation.server.grid, [client.node_id])[0].has_error
    quick = ClientSettings(retry_initial=0.05, retry_max=0.1, retry_for=1.0)
    untrusted = ClientTls.from_file(other.ca_certificate)  # type: ignore[arg-type]
    wrong_ca = federation.add(counting_app(), 0, key=key, tls=untrusted, settings=quick, wait=False)
    outcome = federation.exit_of(wrong_ca)
    assert outcome.code == ExitCode.UNREACHABLE
    assert "CERTIFICATE_VERIFY_FAILED" in outcome.reason
    assert "not signed by the CA given with --root-cert" in outcome.reason
    plain = federation.add(counting_app(), 0, key=key, settings=quick, wait=False)
    outcome = federation.exit_of(plain)
    assert outcome.code == ExitCode.UNREACHABLE
    assert "give its CA certificate with --root-cert" in outcome.reason
    assert federation.server.node_ids() == [client.node_id]  # the good node never noticed


def test_a_model_sent_to_a_cohort_is_encoded_once(
    federation: Federation, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flowerpets.transport import server as server_module

    for pid in range(4):
        federation.add(counting_app(), pid)
    calls: list[int] = []
    real = server_module.encode_content

    def counting(message: Message, limits: object) -> bytes | None:
        calls.append(message.metadata.dst_node_id)
        return real(message, limits)  # type: ignore[arg-type]

    monkeypatch.setattr(server_module, "encode_content", counting)
    result = server_app(num_rounds=2).run(federation.server.grid)
    assert [len(r.participants) for r in result.history.rounds] == [4, 4]
    assert len(calls) == 2  # one encoding per round, for four nodes
