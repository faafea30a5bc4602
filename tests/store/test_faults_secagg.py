"""A SecAgg+ server process SIGKILLed in any phase of a round, or inside one of its stages.

Each test runs :mod:`tests.store.faulty_runs` (``secagg``) in a child process
that kills itself in round 3 (of 4), then resumes the run from the store in
this process. The store holds round 2 and nothing of round 3; the resumed run
abandons the interrupted round and runs it again with a new session (new keys,
shares and masks), and ends with the uninterrupted run's model bit for bit:
the nodes' SecAgg+ randomness is seeded so that masking quantizes the same
(:class:`~tests.store.faulty_runs.SeededSecAgg`), and the masks cancel exactly.
Nothing of a session is ever stored: none of the nodes' private keys, self-mask
seeds, shares, share ciphertexts or masked inputs, of the abandoned round or of
the one run again, is anywhere in the store's files.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from flowerpets.simulation import SimulationResult
from flowerpets.store import RunStore
from tests.store.faulty_runs import (
    KILL_ROUND,
    SECAGG_COHORT,
    SECAGG_PHASES,
    SecAggRecorder,
    run,
    secrets_path,
)
from tests.store.processes import run_python
from tests.store.stored_runs import same_bits
from tests.store.test_resume import ROUNDS

# The phases a node's mod kills in: the round's session began before the kill.
_STARTED = {"after-share-keys", "mid-collection", "mid-unmask", "after-aggregation", "mid-commit"}


def timeless(records: Sequence[Any]) -> list[dict[str, Any]]:
    """The records without timings; participants in node order (SecAgg+'s ring is random)."""
    out = []
    for record in records:
        data = record.to_json_dict()
        data["seconds"] = 0
        data["participants"] = sorted(data["participants"])
        data["train_metrics"] = {
            k: v for k, v in data["train_metrics"].items() if not k.startswith("secagg-seconds")
        }
        out.append(data)
    return out


def on_disk(path: Path) -> bytes:
    """Every byte of the store: its file and, if there is one, its write-ahead log."""
    wal = Path(f"{path}-wal")
    return path.read_bytes() + (wal.read_bytes() if wal.exists() else b"")


@pytest.fixture(scope="module")
def uninterrupted() -> SimulationResult:
    whole = run("secagg")
    assert [r.round for r in whole.history.rounds] == list(range(1, ROUNDS + 1))
    assert all(r.ok and len(r.participants) == SECAGG_COHORT for r in whole.history.rounds)
    return whole


@pytest.mark.parametrize("phase", SECAGG_PHASES)
def test_a_secagg_server_killed_in_any_phase_resumes_with_a_new_session_to_the_same_model(
    tmp_path: Path, phase: str, uninterrupted: SimulationResult
) -> None:
    path = tmp_path / "runs.db"
    killed = run_python("-m", "tests.store.faulty_runs", str(path), "secagg", phase)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    abandoned = json.loads(secrets_path(path).read_text())
    stored_at_the_kill = on_disk(path)  # before anything opens it again
    recorder = SecAggRecorder()
    with RunStore(path, check="full") as store:
        assert store.run("r").last_round == KILL_ROUND - 1  # nothing of the killed round
        with store.resume_run("r") as writer:
            resumed = run("secagg", writer, recorder=recorder)
        stored = store.load("r")
    stored_at_the_end = on_disk(path)

    assert same_bits(resumed.arrays, uninterrupted.arrays)
    assert stored.arrays is not None and same_bits(stored.arrays, uninterrupted.arrays)
    assert timeless(resumed.history.rounds) == timeless(uninterrupted.history.rounds)
    assert timeless(stored.history.rounds) == timeless(uninterrupted.history.rounds)
    assert sorted(recorder.sessions) == [KILL_ROUND, ROUNDS]  # rounds 1 and 2 not run again
    secrets = [bytes.fromhex(s) for s in abandoned["secrets"]] + recorder.secrets[KILL_ROUND]
    if phase in _STARTED:
        session = bytes.fromhex(abandoned["session"])
        assert recorder.sessions[KILL_ROUND] != session  # the round ran again in a new session
        assert len(abandoned["secrets"]) >= 2 * SECAGG_COHORT  # every node's keys at least
        secrets.append(session)
    else:
        assert abandoned == {"session": None, "secrets": []}  # killed before the round began
    # The search finds what is stored: the final model's bytes are there.
    assert uninterrupted.arrays["w"].numpy().tobytes()[:32] in stored_at_the_end
    for secret in secrets:
        assert secret[:32] not in stored_at_the_kill
        assert secret[:32] not in stored_at_the_end
