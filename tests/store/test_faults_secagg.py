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
from pathlib import Path

import pytest

from flowerpets.core import RoundRecord
from flowerpets.simulation import SimulationResult
from flowerpets.store import RunStore
from tests.store.faulty_runs import (
    KILL_ROUND,
    SECAGG_COHORT,
    SECAGG_PHASES,
    SecAggRecorder,
    run,
    secrets_path,
    uninterrupted,
)
from tests.store.processes import run_python
from tests.store.stored_runs import same_bits, stored_bytes
from tests.store.test_resume import ROUNDS, comparable

# The phases a node's mod kills in: the round's session began before the kill.
_STARTED = {"after-share-keys", "mid-collection", "mid-unmask", "after-aggregation", "mid-commit"}


def timeless(records: list[RoundRecord]) -> list[dict[str, object]]:
    """:func:`comparable` records, without SecAgg+'s timing of each stage."""
    out = []
    for data in comparable(records):
        metrics = data["train_metrics"]
        assert isinstance(metrics, dict)
        kept = {k: v for k, v in metrics.items() if not k.startswith("secagg-seconds")}
        out.append({**data, "train_metrics": kept})
    return out


@pytest.fixture(scope="module")
def whole() -> SimulationResult:
    return uninterrupted("secagg")


@pytest.mark.parametrize("phase", SECAGG_PHASES)
def test_a_secagg_server_killed_in_any_phase_resumes_with_a_new_session_to_the_same_model(
    tmp_path: Path, phase: str, whole: SimulationResult
) -> None:
    path = tmp_path / "runs.db"
    killed = run_python("-m", "tests.store.faulty_runs", str(path), "secagg", phase)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    abandoned = json.loads(secrets_path(path).read_text())
    stored_at_the_kill = stored_bytes(path)  # before anything opens it again
    recorder = SecAggRecorder()
    with RunStore(path, check="full") as store:
        assert store.run("r").last_round == KILL_ROUND - 1  # nothing of the killed round
        with store.resume_run("r") as writer:
            resumed = run("secagg", writer, recorder=recorder)
        stored = store.load("r")
    stored_at_the_end = stored_bytes(path)

    assert same_bits(resumed.arrays, whole.arrays)
    assert stored.arrays is not None and same_bits(stored.arrays, whole.arrays)
    assert timeless(resumed.history.rounds) == timeless(whole.history.rounds)
    assert timeless(stored.history.rounds) == timeless(whole.history.rounds)
    assert sorted(recorder.sessions) == [KILL_ROUND, ROUNDS]  # rounds 1 and 2 not run again
    assert len(recorder.secrets[KILL_ROUND]) >= 2 * SECAGG_COHORT  # the round run again
    secrets = [bytes.fromhex(s) for s in abandoned["secrets"]] + recorder.secrets[KILL_ROUND]
    if phase in _STARTED:
        session = bytes.fromhex(abandoned["session"])
        assert recorder.sessions[KILL_ROUND] != session  # the round ran again in a new session
        assert len(abandoned["secrets"]) >= 2 * SECAGG_COHORT  # every node's keys at least
        secrets.append(session)
    else:
        assert abandoned == {"session": None, "secrets": []}  # killed before the round began
    # The search finds what is stored: the final model's bytes are there.
    assert whole.arrays["w"].numpy().tobytes()[:32] in stored_at_the_end
    for secret in secrets:
        assert secret[:32] not in stored_at_the_kill
        assert secret[:32] not in stored_at_the_end
