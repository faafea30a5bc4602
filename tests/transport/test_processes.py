"""Real processes on loopback: one server, several nodes, TLS and node keys.

Each test starts ``python -m flowerpets.transport server`` and ``... client``
processes (the same code as ``flowerpets server``/``client``), bounds every
wait, and kills every process at the end (see ``conftest.py``).
"""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from flowerpets.core.codec import decode_record_dict
from flowerpets.transport import Credentials, NodeKey
from flowerpets.transport._frames import Head

from .conftest import Processes, RawNode, wait_until

pytest.importorskip("sklearn")


def tls_server_args(credentials: Credentials) -> list[str]:
    return [
        "--cert",
        str(credentials.server_certificate),
        "--key",
        str(credentials.server_key),
        "--node-keys",
        str(credentials.node_public_keys),
    ]


def tls_client_args(credentials: Credentials, index: int) -> list[str]:
    return [
        "--root-cert",
        str(credentials.ca_certificate),
        "--key",
        str(credentials.node_keys[index]),
        "--node-config",
        f"partition-id={index}",
    ]


def history(path: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(path.read_text())
    return loaded


def node_id(credentials: Credentials, index: int) -> int:
    return NodeKey.load(credentials.node_keys[index]).node_id


# -- FedAvg on digits: the same model as the simulation -------------------------------------------
@pytest.mark.slow
def test_five_processes_reach_the_simulation_model(
    processes: Processes, credentials: Credentials, tmp_path: Path
) -> None:
    from flowerpets.examples.digits import deploy
    from flowerpets.simulation import run_simulation

    config = {"num-partitions": 5, "num-rounds": 3, "seed": 7}
    server, port = processes.server(
        "--app",
        "flowerpets.examples.digits.deploy:server_app",
        "--run-config",
        *(f"{k}={v}" for k, v in config.items()),
        "--seed",
        "7",
        "--min-nodes",
        "5",
        "--history",
        "history.json",
        "--save",
        "final.fprd",
        *tls_server_args(credentials),
    )
    clients = [
        processes.client(
            f"client-{i}",
            port,
            "--app",
            "flowerpets.examples.digits.deploy:client_app",
            *tls_client_args(credentials, i),
        )
        for i in range(5)
    ]
    assert server.wait() == 0, server.log()
    for client in clients:
        assert client.wait() == 0, client.log()
        assert "the server let this node go: the run is over" in client.log()

    # The simulation of the same run, in this process.
    server_app, client_app = deploy.build(config)
    expected = run_simulation(server_app, client_app, 5, seed=7, run_config=config)

    got = decode_record_dict((tmp_path / "final.fprd").read_bytes())["arrays"]
    assert list(got) == list(expected.arrays)
    for name, array in expected.arrays.items():
        # Both runs sum the same float64 products, only in reply-arrival order; a float64
        # sum of 5 terms reordered moves by at most a few float64 ulps, and the float32
        # model then differs by at most one float32 ulp (in practice: not at all).
        np.testing.assert_array_max_ulp(got[name].numpy(), array.numpy(), maxulp=1)
    recorded = history(tmp_path / "history.json")
    assert recorded["stopped"] is None
    rounds = recorded["history"]
    assert [r["participants"] for r in rounds] == [5, 5, 5]
    assert all(not r["failures"] and r["error"] is None for r in rounds)
    for mine, theirs in zip(rounds, expected.history.to_dicts(), strict=True):
        assert mine["server_metrics"]["accuracy"] == pytest.approx(
            theirs["server_metrics"]["accuracy"], abs=1e-6
        )
    ids = {node_id(credentials, i) for i in range(5)}
    assert ids == {int(n) for n in re.findall(r"node (\d+) \(node-\d", server.log())}


def server_apps(*run_config: str) -> list[str]:
    return ["--app", "transport_test_apps:server_app", "--run-config", *run_config]


CLIENT_APP = ["--app", "transport_test_apps:client_app"]
# Short, with room for a busy machine: 2 cores shared by these processes and other jobs.
FAST = ["--heartbeat-interval", "0.3", "--heartbeat-timeout", "3"]


# -- refusals, each in the server's log, while the run goes on ------------------------------------
def test_refusals_are_logged_and_the_run_goes_on(
    processes: Processes, credentials: Credentials, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    server, port = processes.server(
        *server_apps("rounds=3", f"gate-file={gate}", "gate-round=2"),
        "--min-nodes",
        "2",
        "--max-message-mb",
        "1",
        "--history",
        "history.json",
        *FAST,
        *tls_server_args(credentials),
    )
    clients = [
        processes.client(f"client-{i}", port, *CLIENT_APP, *tls_client_args(credentials, i))
        for i in range(2)
    ]
    server.wait_for_log(r"round 1: 2 participant\(s\)")  # round 2 now waits at its gate
    ca = credentials.ca_certificate.read_bytes()  # type: ignore[union-attr]
    spare = NodeKey.load(credentials.node_keys[5])  # a key the server knows; no node uses it

    stranger = RawNode(port, root_certificates=ca)
    stranger.send(stranger.hello().encode())
    assert stranger.wait_closed()[0] == grpc.StatusCode.UNAUTHENTICATED
    server.wait_for_log(r"refused the unauthenticated connection .*\[AuthenticationError\] unknown")

    genuine = RawNode(port, key=spare, root_certificates=ca)
    hello = genuine.hello()
    genuine.join(hello)
    genuine.close()
    replayed = RawNode(port, key=spare, root_certificates=ca)
    replayed.send(hello.encode())
    assert replayed.wait_closed()[0] == grpc.StatusCode.UNAUTHENTICATED
    server.wait_for_log(r"\[ReplayError\] node key SHA256:\w+: .* a replayed request")

    plain = RawNode(port)  # plain text to the TLS port: no CHALLENGE ever comes
    plain.send(plain.hello(challenge=bytes(16)).encode())
    assert plain.wait_closed()[0] == grpc.StatusCode.UNAVAILABLE
    server.wait_for_log(
        r"WARNING flowerpets.transport.grpc: refused a connection: the TLS handshake failed: "
        r"the peer did not speak TLS"
    )

    garbage = RawNode(port, root_certificates=ca)
    garbage.send(b"\x00garbage" * 8)
    assert garbage.wait_closed()[0] == grpc.StatusCode.INVALID_ARGUMENT
    server.wait_for_log(r"refused the unauthenticated connection .*\[FrameError\] bad magic")

    oversized = RawNode(port, key=spare, root_certificates=ca)
    oversized.join()
    oversized.send(oversized.signed(Head(oversized.next_seq(), 2**31, bytes(32))))
    assert oversized.wait_closed()[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    server.wait_for_log(
        r"ERROR .* closing the connection of node \d+ \(node-5, .*\): \[MessageTooLargeError\] "
        r"a message of 2147483648 bytes was announced, more than max-message=1048576 bytes"
    )
    for node in (stranger, genuine, replayed, plain, garbage, oversized):
        node.close()

    gate.touch()
    assert server.wait() == 0, server.log()
    for client in clients:
        assert client.wait() == 0, client.log()
    rounds = history(tmp_path / "history.json")["history"]
    assert [(r["participants"], r["failures"], r["error"]) for r in rounds] == [(2, {}, None)] * 3
    assert "Traceback" not in server.log()


# -- SecAgg+ with a node killed during the masked-input stage --------------------------------------
try:
    from flowerpets.secagg import Stage

    SECAGG_MISSING = None
except ImportError as exc:  # pragma: no cover - only while flowerpets.secagg is being written
    SECAGG_MISSING = f"flowerpets.secagg cannot be imported yet: {exc}"


@pytest.mark.skipif(SECAGG_MISSING is not None, reason=str(SECAGG_MISSING))
def test_secagg_survives_a_node_killed_during_masked_input(
    processes: Processes, credentials: Credentials, tmp_path: Path
) -> None:
    capture, markers = tmp_path / "capture", tmp_path / "markers"
    capture.mkdir()
    markers.mkdir()
    victim = 3
    server, port = processes.server(
        *server_apps(
            "rounds=1",
            "integer=true",
            "size=6",
            "secagg=true",
            "secagg-degree=4",
            "secagg-threshold=3",
            f"capture-dir={capture}",
            f"marker-dir={markers}",
            f"hold-pid={victim}",
            "hold-round=1",
            f"hold-step={Stage.COLLECT_MASKED_INPUT}",
        ),
        "--min-nodes",
        "5",
        "--history",
        "history.json",
        *FAST,
        *tls_server_args(credentials),
    )
    clients = [
        processes.client(f"client-{i}", port, *CLIENT_APP, *tls_client_args(credentials, i))
        for i in range(5)
    ]
    held = markers / f"{victim}-1-{Stage.COLLECT_MASKED_INPUT.replace('/', '_')}"
    wait_until(held.exists, what="the victim to receive its masked-input request")
    clients[victim].signal(signal.SIGKILL)  # mid-stage: its masked input never leaves
    assert server.wait() == 0, server.log()
    for i, client in enumerate(clients):
        if i != victim:
            assert client.wait() == 0, client.log()

    ids = [node_id(credentials, i) for i in range(5)]
    survivors = [i for i in range(5) if i != victim]
    summary = json.loads((capture / "round-1.json").read_text())
    assert sorted(summary["participants"]) == sorted(ids[i] for i in survivors)
    assert summary["failures"] == {str(ids[victim]): Stage.COLLECT_MASKED_INPUT}
    aggregate = decode_record_dict((capture / "round-1.fprd").read_bytes())["aggregate"]
    # Node i sends (i + 1) * [1..6] with weight i + 1: the survivors' weighted sum, exactly.
    expected = sum((i + 1) * (i + 1) * np.arange(1, 7, dtype=np.int64) for i in survivors)
    assert aggregate["w"].numpy().dtype == np.int64
    assert np.array_equal(aggregate["w"].numpy(), expected)
    assert summary["total_weight"] == sum(i + 1 for i in survivors)
    assert history(tmp_path / "history.json")["history"][0]["error"] is None


# -- SIGTERM: a node leaves, then the server shuts down; everybody exits cleanly -----------------
def test_sigterm_stops_a_node_and_then_the_server_cleanly(
    processes: Processes, credentials: Credentials, tmp_path: Path
) -> None:
    markers = tmp_path / "markers"
    markers.mkdir()
    server, port = processes.server(
        *server_apps("rounds=100", "train-seconds=0.2", f"marker-dir={markers}"),
        "--min-nodes",
        "2",
        "--history",
        "history.json",
        *FAST,
        *tls_server_args(credentials),
    )
    clients = [
        processes.client(f"client-{i}", port, *CLIENT_APP, *tls_client_args(credentials, i))
        for i in range(2)
    ]
    wait_until((markers / "1-2-train").exists, what="round 2")
    clients[1].signal(signal.SIGTERM)
    assert clients[1].wait() == 0, clients[1].log()
    assert "exits (FINISHED): stopped: received SIGTERM" in clients[1].log()
    server.wait_for_log(rf"node {node_id(credentials, 1)} \(node-1, .*\) left")
    wait_until((markers / "0-4-train").exists, what="round 4")
    server.signal(signal.SIGTERM)
    assert server.wait() == 0, server.log()
    assert clients[0].wait() == 0, clients[0].log()
    assert (
        "the server let this node go: the server is shutting down (received SIGTERM)"
        in clients[0].log()
    )
    recorded = history(tmp_path / "history.json")
    assert recorded["stopped"] == "received SIGTERM"
    rounds = recorded["history"]
    assert 4 <= len(rounds) < 100 and rounds[-1]["error"] == "received SIGTERM"
    assert rounds[-2]["participants"] == 1 and rounds[-2]["error"] is None


# -- a node that hangs is a dropout, reconnects, and rejoins with its state -----------------------
def test_a_hung_node_is_dropped_then_rejoins_with_its_state(
    processes: Processes, credentials: Credentials, tmp_path: Path
) -> None:
    markers = tmp_path / "markers"
    markers.mkdir()
    victim = 2
    server, port = processes.server(
        *server_apps(
            "rounds=4",
            "wait-nodes=3",
            f"marker-dir={markers}",
            f"hold-pid={victim}",
            "hold-round=2",
            "hold-step=train",
            "hold-seconds=1",
        ),
        "--min-nodes",
        "3",
        "--history",
        "history.json",
        *FAST,
        *tls_server_args(credentials),
    )
    clients = [
        processes.client(f"client-{i}", port, *CLIENT_APP, *tls_client_args(credentials, i))
        for i in range(3)
    ]
    wait_until((markers / f"{victim}-2-train").exists, what="the victim's round 2")
    clients[victim].signal(signal.SIGSTOP)  # hangs mid-round: no replies, no heartbeats
    victim_id = node_id(credentials, victim)
    server.wait_for_log(rf"dropping the node {victim_id} .*: nothing received for")
    clients[victim].signal(signal.SIGCONT)
    assert server.wait() == 0, server.log()
    for client in clients:
        assert client.wait() == 0, client.log()
    rounds = history(tmp_path / "history.json")["history"]
    assert [r["participants"] for r in rounds] == [3, 2, 3, 3]
    assert list(rounds[1]["failures"]) == [str(victim_id)]
    assert "NODE_UNAVAILABLE" in rounds[1]["failures"][str(victim_id)]
    # Every node has handled 4 train messages by round 4, the victim too: its state survived.
    assert rounds[3]["train_metrics"]["handled"] == 4
    joins = re.findall(r"joined run \d+ at .* as node (\d+)", clients[victim].log())
    assert joins == [str(victim_id)] * 2


def test_plain_text_off_loopback_is_refused_at_start(processes: Processes) -> None:
    server = processes.start(
        "server", "server", "--app", "transport_test_apps:server_app", "--address", "0.0.0.0:0"
    )
    assert server.wait() == 2
    assert "cannot start the server: refusing to serve plain text on 0.0.0.0:0" in server.log()
    client = processes.start(
        "client", "client", "--app", "transport_test_apps:client_app", "--server", "10.0.0.1:1"
    )
    assert client.wait() == 2
    assert "refusing to connect in plain text to 10.0.0.1:1" in client.log()
