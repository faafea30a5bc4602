"""A CentralDp server process (alone, or over SecAgg+) SIGKILLed in each phase of a round.

Each test runs :mod:`tests.store.faulty_runs` (``dp`` or ``dp-secagg``) in a
child process that kills itself in round 3 (of 4), over SecAgg+ also inside
its stages, then resumes the run from
the store in this process. The budget is never under-counted: a round's spend
is committed before any node sees the round, so a round killed after that
point (while the nodes computed, after the noised sum was released to the
strategy, or inside the round's commit) stays counted, and the run spends it
once more when it runs the round again; a round killed before it reached
CentralDp spent nothing. Epsilon per round is then the uninterrupted run's,
shifted by that one extra event.

The model equals the uninterrupted run's bit for bit: the noise comes from
``CentralDp(noise_seed=...)`` (test only, insecure), which draws each round's
noise from a generator seeded by (seed, round), so a round run again in a new
process draws the noise the uninterrupted run drew. The secure default source
cannot be replayed, and is not what these tests run.
"""

from __future__ import annotations

import signal
import warnings
from pathlib import Path

import numpy as np
import pytest

from flowerpets.core import FullParticipation
from flowerpets.dp import CentralDp
from flowerpets.dp.accountant import default_accountant, event_for_round
from flowerpets.exceptions import InsecureRandomnessWarning, ParameterValueError
from flowerpets.simulation import SimulationResult
from flowerpets.store import RunStore
from tests.store.faulty_runs import (
    CLIP,
    DELTA,
    KILL_ROUND,
    NOISE_MULTIPLIER,
    PHASES,
    SECAGG_PHASES,
    run,
    uninterrupted,
)
from tests.store.processes import run_python
from tests.store.stored_runs import same_bits
from tests.store.test_resume import NODES, ROUNDS

_SPENT_BEFORE_THE_KILL = {  # did the killed round commit its spend?
    "before-send": False,  # killed outside CentralDp: the round never reached it
    "mid-collection": True,  # the nodes saw the round: spent first
    "after-share-keys": True,  # SecAgg+'s stages: inside CentralDp's round
    "mid-unmask": True,
    "after-aggregation": True,  # the noised sum was released to the strategy
    "mid-commit": True,
}


def epsilon_after(events: int) -> float:
    """Epsilon (at DELTA) of ``events`` rounds of the runs' sampling (every node) and noise."""
    event = event_for_round(FullParticipation(), NODES, NOISE_MULTIPLIER)
    return default_accountant(event).compose(event, events).get_epsilon(DELTA)


def metric(result: SimulationResult, name: str) -> list[float]:
    return [value for _, value in result.history.metric(name, source="train_metrics")]


_whole: dict[str, SimulationResult] = {}


def whole_run(kind: str) -> SimulationResult:
    if kind not in _whole:
        whole = _whole[kind] = uninterrupted(kind)
        assert metric(whole, "epsilon") == [epsilon_after(k) for k in range(1, ROUNDS + 1)]
    return _whole[kind]


@pytest.mark.parametrize(
    ("kind", "phase"),
    [("dp", phase) for phase in PHASES] + [("dp-secagg", phase) for phase in SECAGG_PHASES],
)
def test_a_dp_server_killed_in_any_phase_resumes_with_every_spend_counted_to_the_same_model(
    tmp_path: Path, kind: str, phase: str
) -> None:
    whole = whole_run(kind)
    path = tmp_path / "runs.db"
    killed = run_python("-m", "tests.store.faulty_runs", str(path), kind, phase)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    extra = int(_SPENT_BEFORE_THE_KILL[phase])
    with RunStore(path, check="full") as store:
        population = store.run("r").population_id
        assert store.run("r").last_round == KILL_ROUND - 1
        before = [s.round for s in store.spends(population)]
        with (
            warnings.catch_warnings(),  # CentralDp(noise_seed=...) warns: a test-only source
            store.resume_run("r") as writer,
        ):
            warnings.simplefilter("ignore", InsecureRandomnessWarning)
            resumed = run(kind, writer)
        after = [s.round for s in store.spends(population)]

    killed_round = [KILL_ROUND] * extra
    assert before == [*range(1, KILL_ROUND), *killed_round]  # spent before the kill, on disk
    assert after == [*range(1, KILL_ROUND), *killed_round, *range(KILL_ROUND, ROUNDS + 1)]
    epsilons = metric(resumed, "epsilon")
    assert epsilons[: KILL_ROUND - 1] == metric(whole, "epsilon")[: KILL_ROUND - 1]
    assert epsilons[KILL_ROUND - 1 :] == [
        epsilon_after(k + extra) for k in range(KILL_ROUND, ROUNDS + 1)
    ]  # the killed round's spend stays counted: an over-count, never an under-count
    if not extra:
        assert epsilons == metric(whole, "epsilon")
    assert metric(resumed, "dp-clip") == metric(whole, "dp-clip") == [CLIP] * ROUNDS
    assert same_bits(resumed.arrays, whole.arrays)  # the noise of each round drawn again


def test_a_dp_server_committing_every_two_rounds_pays_again_for_the_rounds_it_runs_again(
    tmp_path: Path,
) -> None:
    whole = whole_run("dp")
    path = tmp_path / "runs.db"
    # Killed while the nodes compute round 4: round 3 ran and spent, but never committed.
    killed = run_python(
        "-m", "tests.store.faulty_runs", str(path), "dp", "mid-collection", "4", "2"
    )
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    with RunStore(path, check="full") as store:
        population = store.run("r").population_id
        assert store.run("r").last_round == 2
        before = [s.round for s in store.spends(population)]
        with warnings.catch_warnings(), store.resume_run("r") as writer:
            warnings.simplefilter("ignore", InsecureRandomnessWarning)
            resumed = run("dp", writer, commit_every=2)
        after = [s.round for s in store.spends(population)]
    assert before == [1, 2, 3, 4]  # spent before the kill, on disk
    assert after == [1, 2, 3, 4, 3, 4]
    epsilons = metric(resumed, "epsilon")
    assert epsilons[:2] == metric(whole, "epsilon")[:2]
    assert epsilons[2:] == [epsilon_after(5), epsilon_after(6)]  # rounds 3 and 4 count twice
    assert same_bits(resumed.arrays, whole.arrays)  # re-run from round 2's model and clip


def test_the_noise_of_a_seeded_round_is_its_own_and_the_rest_of_the_run_changes_it(
    tmp_path: Path,
) -> None:
    # The bit-for-bit comparison above can fail: the noise moves the model, and a different
    # noise seed gives a different model (the same seed, the same one, as the matrix shows).
    whole = whole_run("dp")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("tests.store.faulty_runs.NOISE_SEED", 8)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", InsecureRandomnessWarning)
            other = run("dp")
    assert metric(other, "epsilon") == metric(whole, "epsilon")
    assert not np.array_equal(other.arrays["w"].numpy(), whole.arrays["w"].numpy())


def test_a_noise_seed_warns_and_excludes_a_generator() -> None:
    with pytest.warns(InsecureRandomnessWarning, match="noise_seed"):
        CentralDp(noise_multiplier=1.0, clipping_norm=1.0, noise_seed=3)
    with pytest.raises(ParameterValueError, match="not both"):
        CentralDp(
            noise_multiplier=1.0,
            clipping_norm=1.0,
            noise_seed=3,
            rng=np.random.default_rng(3),
        )
