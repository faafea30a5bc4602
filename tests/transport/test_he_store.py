"""A CKKS run's server process SIGKILLed in any phase of a round resumes with the nodes' key.

Real processes: ``flowerpets server --store`` and three ``flowerpets client``
nodes (see :mod:`he_store_apps`). The server kills itself at one phase of round
3 of 4; the nodes live on, holding the run's CKKS key in their contexts, and
reconnect to a new server process started on the same address with the same
options. It restores the key's public side and the sealed model's layout from
the store, runs no new key set-up, checks that the nodes still hold the key,
and runs rounds 3 and 4: the final model the nodes open is the uninterrupted
run's within CKKS's precision (its encryption is randomized, so not bit for
bit), and each round is in the history once. Nodes that did not outlive the
server (new processes, new keys) hold no key: the resume is refused, the store
untouched.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pytest

from flowerpets.store import RunStore
from tests.store.faulty_runs import KILL_ROUND, PHASES

from .conftest import Proc, Processes, wait_until
from .he_store_apps import KILL_ENV, ROUNDS, client_app, opened, server_app, step
from .test_processes import FAST

NODES = 3
RUN_ID = "77"  # the transport's run id: a node keeps its context (and key) per run id
SERVER_APP = ["--app", "he_store_apps:server_app", "--run-id", RUN_ID, "--seed", "1"]
# CKKS (scale 2^40) decrypts a sum of a few small values to about 1e-8 of them; the
# model then goes through float32 (about 1e-7 of them), round after round.
ATOL = 1e-4


@pytest.fixture(scope="module")
def uninterrupted() -> np.ndarray:
    """The final model of the same run in simulation, as the nodes open it."""
    from flowerpets.core import ConfigRecord
    from flowerpets.simulation import run_simulation

    result = run_simulation(server_app(ConfigRecord()), client_app(), NODES, seed=1)
    model = opened(result.history.rounds[-1].evaluate_metrics)
    np.testing.assert_allclose(model, ROUNDS * step(NODES), rtol=0, atol=ATOL)
    return model


def serve(processes: Processes, name: str, port: int, store: Path, *extra: str) -> Proc:
    """A server process on ``port`` (0: any) for the stored run; waits until it listens."""
    port_file = processes.directory / f"{name}.port"
    proc = processes.start(
        name,
        "server",
        "--address",
        f"127.0.0.1:{port}",
        "--port-file",
        str(port_file),
        *SERVER_APP,
        "--store",
        str(store),
        "--min-nodes",
        str(NODES),
        *FAST,
        *extra,
    )
    wait_until(
        lambda: (port_file.exists() and port_file.read_text().strip()) or proc.popen.poll(),
        what=f"{name} to listen",
    )
    return proc


def nodes(processes: Processes, name: str, port: int) -> list[Proc]:
    return [
        processes.client(
            f"{name}-{i}",
            port,
            "--app",
            "he_store_apps:client_app",
            "--node-config",
            f"partition-id={i}",
            "--retry-for",
            "60",
        )
        for i in range(NODES)
    ]


def kill_in_round_three(
    processes: Processes, monkeypatch: pytest.MonkeyPatch, store: Path, phase: str
) -> tuple[int, list[Proc]]:
    """Run the server until it kills itself at ``phase``; its port and the (live) nodes."""
    monkeypatch.setenv(KILL_ENV, phase)
    first = serve(processes, "first", 0, store)
    monkeypatch.delenv(KILL_ENV)
    port = int((processes.directory / "first.port").read_text())
    live = nodes(processes, "node", port)
    assert first.wait() == -signal.SIGKILL, first.log()
    with RunStore(store) as runs:
        assert runs.run("server").last_round == KILL_ROUND - 1  # nothing of round 3
    assert "generated the CKKS key" in first.log()
    return port, live


@pytest.mark.slow
@pytest.mark.parametrize("phase", PHASES)
def test_an_he_server_killed_in_any_phase_resumes_with_the_nodes_that_hold_its_key(
    processes: Processes,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    phase: str,
    uninterrupted: np.ndarray,
) -> None:
    store = tmp_path / "run.db"
    port, live = kill_in_round_three(processes, monkeypatch, store, phase)
    with RunStore(store) as runs:
        key_state = runs.load("server").pet_states["he"]

    second = serve(processes, "second", port, store, "--history", "history.json")
    assert second.wait() == 0, second.log()
    for node in live:  # the same node processes, through both servers
        assert node.wait() == 0, node.log()
        assert "the run is over" in node.log()

    log = second.log()
    assert "generated the CKKS key" not in log and "installed it" not in log  # no new key set-up
    assert f"{NODES} node(s) still hold the resumed run's CKKS key" in log
    assert "round 1:" not in log and "round 2:" not in log  # rounds 1 and 2 came from the store
    history = json.loads((tmp_path / "history.json").read_text())["history"]
    assert [(r["round"], r["participants"], r["error"]) for r in history] == [
        (rnd, NODES, None) for rnd in range(1, ROUNDS + 1)
    ]
    final = opened(history[-1]["evaluate_metrics"])
    np.testing.assert_allclose(final, uninterrupted, rtol=0, atol=ATOL)
    with RunStore(store, check="full") as runs:
        stored = runs.load("server")
    assert stored.round == ROUNDS
    assert [r.round for r in stored.history.rounds] == list(range(1, ROUNDS + 1))
    assert stored_key(stored.pet_states["he"]) == stored_key(key_state)  # the same key throughout


def stored_key(state: object) -> tuple[str, bytes, str]:
    """The key id, public context and phase a stored HE state holds."""
    from flowerpets.core import RecordDict
    from flowerpets.core.codec import decode_record_dict
    from flowerpets.he._state import ServerKeys

    assert isinstance(state, bytes)
    keys = ServerKeys.require(RecordDict({"he.server": decode_record_dict(state)["he.server"]}))
    return keys.key_id, keys.public_context, keys.phase.value


@pytest.mark.slow
def test_nodes_that_did_not_outlive_the_server_hold_no_key_and_the_resume_is_refused(
    processes: Processes, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    store = tmp_path / "run.db"
    port, live = kill_in_round_three(processes, monkeypatch, store, "after-aggregation")
    for node in live:
        node.signal(signal.SIGKILL)
        node.wait()
    with RunStore(store) as runs:
        before = runs.load("server")

    second = serve(processes, "second", port, store)
    fresh = nodes(processes, "fresh", port)
    assert second.wait() == 1, second.log()  # the ServerApp failed
    assert "KeyHoldersGoneError" in second.log()
    assert "none of the 3 node(s) that held it is connected" in second.log()
    with RunStore(store, check="full") as runs:
        after = runs.load("server")
    assert after.round == before.round == KILL_ROUND - 1  # nothing committed on top
    assert after.history.rounds == before.history.rounds
    for node in fresh:
        node.signal(signal.SIGKILL)


def test_a_stored_he_server_without_a_run_id_is_refused_at_start(
    processes: Processes, tmp_path: Path
) -> None:
    store = tmp_path / "run.db"
    refused = processes.start(
        "refused", "server", "--app", "he_store_apps:server_app", "--store", str(store)
    )
    assert refused.wait() == 2, refused.log()  # a bad argument
    assert "draws a new run id, under which the nodes hold no context: give --run-id" in (
        refused.log()
    )
    assert not store.exists()
