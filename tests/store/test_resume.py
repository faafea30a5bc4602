"""A plain run stopped after round 2 of 4 and resumed ends with the uninterrupted run's model.

Bit for bit: the simulation's seeds fix the node ids, the nodes' updates and the
cohort draws, one worker thread fixes the order replies are summed in (with
more, float sums differ in the last place from run to run, resumed or not), and
the store gives back the model, the history and the cohort generator exactly as
they were after round 2.
"""

from __future__ import annotations

import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from flowerpets.core import (
    ArrayRecord,
    ClientApp,
    ClientMod,
    Context,
    FedAvg,
    FixedSizeSampling,
    Message,
    MetricRecord,
    RecordDict,
    RoundRecord,
    ServerApp,
)
from flowerpets.exceptions import (
    MissingRunError,
    ParameterValueError,
    RoundSequenceError,
    StopRunError,
    StoreWriteError,
)
from flowerpets.simulation import SimulationResult, run_simulation
from flowerpets.store import RunStore, RunWriter
from tests.store.processes import run_python
from tests.store.stored_runs import same_bits

NODES, ROUNDS, SEED = 6, 4, 11


def local_training(mods: Sequence[ClientMod] = ()) -> ClientApp:
    """Each node moves the model by noise drawn from its partition, the round and the seed."""
    app = ClientApp(mods=mods)

    @app.train()
    def train(msg: Message, context: Context) -> RecordDict:
        pid = int(context.node_config["partition-id"])  # type: ignore[arg-type]
        rnd = int(msg.metadata.round)
        w = msg.require_content().get_typed("arrays", ArrayRecord)["w"].numpy()
        rng = np.random.default_rng([SEED, pid, rnd])
        update = w + rng.standard_normal(w.shape).astype(np.float32)
        return RecordDict(
            {
                "arrays": ArrayRecord({"w": update}),
                "metrics": MetricRecord({"num-examples": 10 + pid, "loss": float(rng.random())}),
            }
        )

    return app


def server(
    store: object = None, shape: tuple[int, ...] = (4, 5), *, commit_every: int = 1
) -> ServerApp:
    return ServerApp(
        strategy=FedAvg(sampling=FixedSizeSampling(3)),  # the cohort draws matter
        num_rounds=ROUNDS,
        initial_arrays=ArrayRecord({"w": np.zeros(shape, np.float32)}),
        store=store,  # type: ignore[arg-type]
        commit_every=commit_every,
    )


def simulate(
    app: ServerApp, *, seed: int = SEED, client: ClientApp | None = None, **options: Any
) -> SimulationResult:
    nodes = local_training() if client is None else client
    return run_simulation(app, nodes, NODES, seed=seed, max_workers=1, **options)


class CrashError(Exception):
    """The server dies right after round 2 was committed."""


def crash_after_round_two(record: RoundRecord) -> None:
    if record.round == 2:
        raise CrashError


def comparable(records: list[RoundRecord]) -> list[dict[str, object]]:
    # Timings differ, and replies arrive from the simulation's threads in any order.
    return [
        {**r.to_json_dict(), "seconds": 0.0, "participants": sorted(r.participants)}
        for r in records
    ]


def test_a_run_resumed_after_round_two_ends_where_the_uninterrupted_one_does(
    tmp_path: Path,
) -> None:
    whole = simulate(server())
    assert all(r.ok for r in whole.history)

    with RunStore(tmp_path / "runs.db") as store:
        with store.start_run("r", config={"rounds": ROUNDS}) as writer, pytest.raises(CrashError):
            simulate(server(writer), on_round=crash_after_round_two)
        assert store.run("r").last_round == 2
        with store.resume_run("r", config={"rounds": ROUNDS}) as writer:
            resumed = simulate(server(writer))
        stored = store.load("r")

    assert same_bits(resumed.arrays, whole.arrays)
    assert comparable(resumed.history.rounds) == comparable(whole.history.rounds)
    assert stored.round == ROUNDS and stored.arrays is not None
    assert same_bits(stored.arrays, whole.arrays)
    cohorts = [frozenset(r.participants) for r in resumed.history]
    assert cohorts == [frozenset(r.participants) for r in whole.history]
    assert len(set(cohorts)) > 1  # the sampler's state mattered


# -- commit_every: the model stored every N rounds and after the last ----------------------------
def test_a_run_committing_every_two_rounds_resumes_from_its_last_commit_to_the_same_model(
    tmp_path: Path,
) -> None:
    whole = simulate(server())
    committed: list[int] = []

    def crash_after_round_three(record: RoundRecord) -> None:
        committed.append(store.run("r").last_round)
        if record.round == 3:
            raise CrashError

    with RunStore(tmp_path / "runs.db") as store:
        with store.start_run("r", config={}) as writer, pytest.raises(CrashError):
            simulate(server(writer, commit_every=2), on_round=crash_after_round_three)
        assert committed == [0, 2, 2]  # round 1 and round 3 waited for the next commit
        crashed = store.load("r")
        assert crashed.round == 2 and [r.round for r in crashed.history] == [1, 2]
        with pytest.raises(MissingRunError):
            store.arrays_at("r", 3)  # round 3 ran, but nothing of it is stored
        with store.resume_run("r") as writer:
            resumed = simulate(server(writer, commit_every=2))  # rounds 3 and 4 again
        stored = store.load("r")
        kept = [rnd for rnd in range(ROUNDS + 1) if _has_arrays(store, rnd)]

    assert same_bits(resumed.arrays, whole.arrays)
    assert comparable(resumed.history.rounds) == comparable(whole.history.rounds)
    assert comparable(stored.history.rounds) == comparable(whole.history.rounds)
    assert stored.arrays is not None and same_bits(stored.arrays, whole.arrays)
    assert kept == [2, 4]  # the model of each commit, no other
    cohorts = [frozenset(r.participants) for r in resumed.history]
    assert cohorts == [frozenset(r.participants) for r in whole.history]


def test_a_run_committing_every_three_rounds_commits_its_last_round_too(tmp_path: Path) -> None:
    whole = simulate(server())
    with RunStore(tmp_path / "runs.db") as store:
        with store.start_run("r", config={}) as writer:
            simulate(server(writer, commit_every=3))  # commits after rounds 3 and 4 (the last)
        stored = store.load("r")
        assert [rnd for rnd in range(ROUNDS + 1) if _has_arrays(store, rnd)] == [3, 4]
    assert stored.round == ROUNDS and stored.arrays is not None
    assert same_bits(stored.arrays, whole.arrays)
    assert comparable(stored.history.rounds) == comparable(whole.history.rounds)


def test_commit_every_needs_a_store_and_a_positive_count(tmp_path: Path) -> None:
    with pytest.raises(ParameterValueError, match="store"):
        server(commit_every=2)
    with (
        RunStore(tmp_path / "runs.db") as store,
        store.start_run("r", config={}) as writer,
        pytest.raises(ParameterValueError, match="commit_every"),
    ):
        server(writer, commit_every=0)


def test_rounds_committed_together_must_be_the_ones_just_before(tmp_path: Path) -> None:
    model = ArrayRecord({"w": np.zeros(3, np.float32)})
    rng = np.random.default_rng(0)
    with RunStore(tmp_path / "runs.db") as store, store.start_run("r", config={}) as writer:
        for since in ([RoundRecord(round=1)], [RoundRecord(round=2), RoundRecord(round=1)]):
            with pytest.raises(RoundSequenceError):
                writer.commit_round(RoundRecord(round=3), arrays=model, sampler=rng, since=since)
        with pytest.raises(RoundSequenceError):  # round 2 and 3 cannot follow round 0
            writer.commit_round(
                RoundRecord(round=3), arrays=model, sampler=rng, since=[RoundRecord(round=2)]
            )
        assert store.run("r").last_round == 0
        writer.commit_round(
            RoundRecord(round=2), arrays=model, sampler=rng, since=[RoundRecord(round=1)]
        )
        assert [r.round for r in store.load("r").history] == [1, 2]


def _has_arrays(store: RunStore, rnd: int) -> bool:
    try:
        store.arrays_at("r", rnd)
    except MissingRunError:
        return False
    return True


def test_a_finished_run_resumed_runs_no_round_again(tmp_path: Path) -> None:
    with RunStore(tmp_path / "runs.db") as store:
        with store.start_run("r", config={}) as writer:
            first = simulate(server(writer))
        with store.resume_run("r") as writer:
            again = simulate(server(writer), seed=SEED + 1)
        assert store.run("r").last_round == ROUNDS
    assert same_bits(again.arrays, first.arrays)
    assert len(again.history) == ROUNDS


def test_a_run_a_mod_stopped_stays_stopped_when_resumed(tmp_path: Path) -> None:
    def spent_after_two(request: Any, context: Any, call_next: Any) -> Any:
        if request.round == 3:
            raise StopRunError("the privacy budget is spent")
        return call_next(request, context)

    def stopping_server(store: RunWriter) -> ServerApp:
        return ServerApp(
            strategy=FedAvg(sampling=FixedSizeSampling(3)),
            num_rounds=ROUNDS,
            initial_arrays=ArrayRecord({"w": np.zeros((4, 5), np.float32)}),
            mods=[spent_after_two],
            store=store,
        )

    with RunStore(tmp_path / "runs.db") as store:
        with store.start_run("r", config={}) as writer:
            first = simulate(stopping_server(writer))
        with store.resume_run("r") as writer:
            again = simulate(stopping_server(writer))
        assert store.run("r").last_round == 3
    assert first.stopped == again.stopped == "the privacy budget is spent"
    assert len(again.history) == 3 and same_bits(again.arrays, first.arrays)


def test_a_commit_that_fails_ends_the_run(tmp_path: Path) -> None:
    path = tmp_path / "runs.db"
    with RunStore(path) as store, store.start_run("r", config={}):
        pass
    with RunStore(path, max_bytes=path.stat().st_size) as store:  # no room for a round
        with store.resume_run("r") as writer, pytest.raises(StoreWriteError):
            simulate(server(writer, shape=(100, 200)))  # 80 kB of arrays: new pages
        assert store.run("r").last_round == 0


_KILLED_SERVER = """
import os, signal, sys

from flowerpets.store import RunStore
from tests.store.test_resume import ROUNDS, server, simulate

store = RunStore(sys.argv[1])
writer = store.start_run("r", config={"rounds": ROUNDS})


def die_after_round_two(record):
    if record.round == 2:
        os.kill(os.getpid(), signal.SIGKILL)


simulate(server(writer), on_round=die_after_round_two)
"""


def test_a_server_process_killed_after_round_two_resumes_to_the_same_model(
    tmp_path: Path,
) -> None:
    path = tmp_path / "runs.db"
    killed = run_python("-c", _KILLED_SERVER, str(path))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    with RunStore(path) as store:
        assert store.run("r").last_round == 2
        with store.resume_run("r", config={"rounds": ROUNDS}) as writer:
            resumed = simulate(server(writer))
    whole = simulate(server())
    assert same_bits(resumed.arrays, whole.arrays)
    assert comparable(resumed.history.rounds) == comparable(whole.history.rounds)
