"""A server process SIGKILLed in any phase of a round resumes to the uninterrupted run's model.

Each test runs :mod:`tests.store.faulty_runs` in a child process that kills
itself at one phase of round 3 (of 4), then resumes the run from the store in
this process. Whatever the phase, the store holds round 2 and nothing of round 3,
and the resumed run ends with the uninterrupted run's model bit for bit and each
round once in its history.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from subprocess import CompletedProcess

import numpy as np
import pytest

from flowerpets.simulation import SimulationResult
from flowerpets.store import RunStore
from tests.store.faulty_runs import BIG_SHAPE, KILL_ROUND, PHASES, run
from tests.store.processes import ROOT, child_env, run_python
from tests.store.stored_runs import same_bits, stored_bytes
from tests.store.test_resume import ROUNDS, comparable


def server_process(path: Path, kind: str, phase: str, *extra: str) -> CompletedProcess[str]:
    """Run the faulty server to its end (its death, for a phase) in a process of its own."""
    return run_python("-m", "tests.store.faulty_runs", str(path), kind, phase, *extra)


@pytest.fixture(scope="module")
def uninterrupted() -> SimulationResult:
    whole = run("plain")
    assert [r.round for r in whole.history.rounds] == list(range(1, ROUNDS + 1))
    assert all(r.ok for r in whole.history.rounds)
    return whole


@pytest.mark.parametrize("phase", PHASES)
def test_a_server_killed_in_any_phase_resumes_to_the_uninterrupted_model(
    tmp_path: Path, phase: str, uninterrupted: SimulationResult
) -> None:
    path = tmp_path / "runs.db"
    killed = server_process(path, "plain", phase)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    with RunStore(path, check="full") as store:
        assert store.run("r").last_round == KILL_ROUND - 1  # nothing of the killed round
        assert [r.round for r in store.load("r").history.rounds] == list(range(1, KILL_ROUND))
        with store.resume_run("r") as writer:
            resumed = run("plain", writer)
        stored = store.load("r")
    assert same_bits(resumed.arrays, uninterrupted.arrays)
    assert [r.round for r in resumed.history.rounds] == list(
        range(1, ROUNDS + 1)
    )  # each round once
    assert comparable(resumed.history.rounds) == comparable(uninterrupted.history.rounds)
    assert stored.round == ROUNDS and stored.arrays is not None
    assert same_bits(stored.arrays, uninterrupted.arrays)
    assert comparable(stored.history.rounds) == comparable(uninterrupted.history.rounds)


@pytest.mark.parametrize("phase", ["before-send", "mid-collection"])
def test_a_server_committing_every_two_rounds_killed_in_round_four_reruns_round_three(
    tmp_path: Path, phase: str, uninterrupted: SimulationResult
) -> None:
    path = tmp_path / "runs.db"
    killed = server_process(path, "plain", phase, "4", "2")  # round 3 ran, never committed
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    with RunStore(path, check="full") as store:
        snapshot = store.load("r")
        assert snapshot.round == 2 and [r.round for r in snapshot.history.rounds] == [1, 2]
        with store.resume_run("r") as writer:
            resumed = run("plain", writer, commit_every=2)  # from round 2's model
        stored = store.load("r")
    assert same_bits(resumed.arrays, uninterrupted.arrays)
    assert comparable(resumed.history.rounds) == comparable(uninterrupted.history.rounds)
    assert stored.arrays is not None and same_bits(stored.arrays, uninterrupted.arrays)
    assert comparable(stored.history.rounds) == comparable(uninterrupted.history.rounds)


def test_a_disk_full_during_a_commit_stops_the_run_and_keeps_the_last_round(
    tmp_path: Path,
) -> None:
    expected_path = tmp_path / "expected.db"
    with RunStore(expected_path) as store:
        with store.start_run("r", config={}) as writer:
            whole = run("plain", writer, shape=BIG_SHAPE)
        before = store.arrays_at("r", KILL_ROUND - 1)
        history_before = comparable(store.load("r").history.rounds[: KILL_ROUND - 1])

    path = tmp_path / "runs.db"
    full = server_process(path, "plain", "disk-full")
    assert full.returncode == 3, full.stdout + full.stderr
    error, _, reason = full.stdout.strip().partition(": ")
    assert error == "StoreWriteError" and "full" in reason, full.stdout
    with RunStore(path, check="full") as store:
        snapshot = store.load("r")
        assert snapshot.round == KILL_ROUND - 1 and snapshot.arrays is not None
        assert same_bits(snapshot.arrays, before)
        assert comparable(snapshot.history.rounds) == history_before
        with store.resume_run("r") as writer:  # room again: the run goes on from there
            resumed = run("plain", writer, shape=BIG_SHAPE)
    assert same_bits(resumed.arrays, whole.arrays)
    assert comparable(resumed.history.rounds) == comparable(whole.history.rounds)


# -- HE --------------------------------------------------------------------------------------------
# After round 1 the global model is sealed: CKKS ciphertexts under a key that only the nodes hold
# (in their contexts, which die with a simulation's process). The store keeps the key's public
# side (parameters, public context, key id, holders) and the model's layout, never a key. A new
# server process restores them and asks the nodes whether they still hold the key; a simulation's
# new nodes hold none, and no new key can open the sealed model: the resume is refused with a
# typed error that ends the run, and the store keeps the last round. (Nodes that outlive the
# server, in a deployment, let it resume: tests/transport/test_he_store.py.)


def he_key_holders_secrets(result: SimulationResult) -> list[bytes]:
    from flowerpets.he._state import ClientKeys

    secrets = [ClientKeys.load(c.state).secret_context for c in result.contexts]
    return [s for s in secrets if s]


@pytest.mark.parametrize("phase", PHASES)
def test_an_he_run_killed_after_its_model_was_sealed_is_refused_on_resume(
    tmp_path: Path, phase: str
) -> None:
    from flowerpets.exceptions import ConfigurationError, KeyHoldersGoneError

    path = tmp_path / "runs.db"
    killed = server_process(path, "he", phase)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    with RunStore(path, check="full") as store:
        before = store.load("r")
        assert before.round == KILL_ROUND - 1 and before.arrays is not None
        gone = "none of the nodes that held it holds it any more .6 of 6 hold no key.: the nodes"
        with store.resume_run("r") as writer, pytest.raises(KeyHoldersGoneError, match=gone):
            run("he", writer)
        after = store.load("r")
    assert issubclass(KeyHoldersGoneError, ConfigurationError)  # the ServerApp ends the run
    assert after.round == KILL_ROUND - 1  # no round failed on top of it: it can be resumed later
    assert after.arrays is not None and same_bits(after.arrays, before.arrays)
    assert [r.round for r in after.history.rounds] == list(range(1, KILL_ROUND))
    assert all(r.ok for r in after.history.rounds)


def test_an_he_run_killed_before_any_round_committed_resumes_with_a_new_key(
    tmp_path: Path,
) -> None:
    from flowerpets.he import open_model

    whole = run("he")
    path = tmp_path / "runs.db"
    killed = server_process(path, "he", "after-aggregation", "1")
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    with RunStore(path) as store:
        assert store.run("r").last_round == 0
        with store.resume_run("r") as writer:
            resumed = run("he", writer)
        stored = store.load("r")
    assert [r.round for r in resumed.history.rounds] == list(range(1, ROUNDS + 1))
    assert all(r.ok for r in resumed.history.rounds)
    assert comparable(resumed.history.rounds) == comparable(whole.history.rounds)
    # CKKS is approximate and its encryption randomized: equal to its precision, not bit for bit.
    expected = open_model(whole.arrays, whole.contexts[0])["w"].numpy()
    got = open_model(resumed.arrays, resumed.contexts[0])["w"].numpy()
    assert np.allclose(got, expected, atol=1e-4, rtol=0)
    assert stored.arrays is not None and same_bits(stored.arrays, resumed.arrays)


def test_the_store_of_an_he_run_holds_no_secret_key(tmp_path: Path) -> None:
    from flowerpets.core import RecordDict
    from flowerpets.core.codec import decode_record_dict
    from flowerpets.he._primitives.params import COMPACT, load_public_context
    from flowerpets.he._state import ClientKeys, ServerKeys, ServerPhase

    path = tmp_path / "runs.db"
    with RunStore(path, checkpoint_bytes=1 << 30) as store:
        with store.start_run("r", config={}) as writer:
            result = run("he", writer)
        secrets = he_key_holders_secrets(result)
        stored = stored_bytes(path)  # the file, its log before the checkpoint, the arrays
        state = store.load("r").pet_states["he"]
    assert len(secrets) == len(result.contexts)
    sealed = max((a.numpy().tobytes() for a in result.arrays.values()), key=len)
    assert sealed[len(sealed) // 2 :][:32] in stored  # the search finds what is stored

    # The HE state: the key's public side and the layout, with the settings; nothing else.
    assert isinstance(state, bytes)
    record = decode_record_dict(state)
    assert set(record) == {"he.server", "he.model", "he.settings"}
    keys = ServerKeys.require(RecordDict({"he.server": record["he.server"]}))
    node = ClientKeys.load(result.contexts[0].state)
    assert (keys.phase, keys.key_id, keys.params) == (ServerPhase.KEYED, node.key_id, COMPACT)
    assert sorted(keys.holders) == sorted(c.node_id for c in result.contexts)
    assert not load_public_context(keys.public_context, COMPACT).is_private()
    assert keys.public_context in stored and state in stored

    for secret in secrets:
        # Any 32 bytes of the serialized secret context, at 64 places across it, but those it
        # shares with the public context (the parameters' header both serializations begin with).
        step = max(1, (len(secret) - 32) // 64)
        windows = [secret[at : at + 32] for at in range(0, len(secret) - 32, step)]
        secret_only = [w for w in windows if w not in keys.public_context]
        assert len(secret_only) >= len(windows) - 2
        for window in secret_only:
            assert window not in stored
            assert window not in state


# -- one server per run ----------------------------------------------------------------------------
def test_a_second_server_process_for_a_live_run_is_refused(
    tmp_path: Path, uninterrupted: SimulationResult
) -> None:
    path = tmp_path / "runs.db"
    first = subprocess.Popen(
        [sys.executable, "-m", "tests.store.faulty_runs", str(path), "plain", "hold"],
        env=child_env(),
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert first.stdin is not None and first.stdout is not None
        assert first.stdout.readline().strip() == "holding"  # mid-run, lease held
        second = server_process(path, "plain", "resume")
        assert second.returncode == 3, second.stdout + second.stderr
        error, _, reason = second.stdout.strip().partition(": ")
        assert error == "StoreLockedError" and f"pid {first.pid}" in reason
        first.stdin.write("go\n")
        first.stdin.flush()
        assert first.stdout.readline().strip() == "finished"
        assert first.wait(timeout=60) == 0
    finally:
        if first.poll() is None:
            first.kill()
        first.wait(timeout=30)
    with RunStore(path) as store:
        stored = store.load("r")
    assert stored.arrays is not None and same_bits(stored.arrays, uninterrupted.arrays)
    assert [r.round for r in stored.history.rounds] == list(range(1, ROUNDS + 1))
    again = server_process(path, "plain", "resume")  # the lease was released: allowed
    assert (again.returncode, again.stdout.strip()) == (0, "finished"), again.stderr
