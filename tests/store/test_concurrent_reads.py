"""A reader in one process while a writer in another commits round after round: never an error.

The writer keeps only the last round's arrays (``keep_arrays_every=None``), so
every commit drops the file the round before named, and records a spend on
the run's population before each round, as ``CentralDp`` does. The reader
loads the run, reads the population's ledger and the run's row over and over
(as ``flowerpets accountant ledger --store`` and a dashboard would) until the
writer is done: each read must succeed and be one consistent state (the
arrays are the round's own, the history as long as the counter, the ledger at
least as long as the rounds committed).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from flowerpets.core import ArrayRecord
from flowerpets.store import RunStore
from tests.store.processes import ROOT, child_env

ROUNDS = 150
SIZE = 50_000  # 200 kB of arrays a round: the file takes a while to read

_WRITER = textwrap.dedent(
    """
    import sys

    import numpy as np

    from flowerpets.core import ArrayRecord, RoundRecord
    from flowerpets.store import RunStore

    path, rounds, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    with RunStore(path) as store:
        with store.start_run(
            "r", config={}, keep_arrays_every=None, initial_arrays=ArrayRecord(
                {"w": np.zeros(size, np.float32)}
            )
        ) as writer:
            print("started", flush=True)
            sys.stdin.readline()  # the reader is open: hammer it
            rng = np.random.default_rng(0)
            for rnd in range(1, rounds + 1):
                writer.record_spend({"round": rnd}, round=rnd)
                arrays = ArrayRecord({"w": np.full(size, rnd, np.float32)})
                writer.commit_round(RoundRecord(round=rnd), arrays=arrays, sampler=rng)
    print("done", flush=True)
    """
)


def model_round(arrays: ArrayRecord | None) -> int:
    assert arrays is not None
    w = arrays["w"].numpy()
    assert w.shape == (SIZE,) and np.all(w == w[0])  # one round's arrays, whole
    return int(w[0])


def test_a_reader_never_sees_an_error_while_another_process_commits(tmp_path: Path) -> None:
    path = tmp_path / "runs.db"
    writer = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path), str(ROUNDS), str(SIZE)],
        env=child_env(),
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    reads, seen = 0, set()
    try:
        assert writer.stdin is not None and writer.stdout is not None
        assert writer.stdout.readline().strip() == "started"
        with RunStore(path) as store:
            population = store.run("r").population_id
            writer.stdin.write("go\n")
            writer.stdin.flush()
            while writer.poll() is None or reads == 0:
                snapshot = store.load("r")
                assert model_round(snapshot.arrays) == snapshot.round  # the round's own
                assert [r.round for r in snapshot.history] == list(range(1, snapshot.round + 1))
                spent = [s.round for s in store.spends(population)]
                assert spent == list(range(1, len(spent) + 1))
                assert len(spent) >= snapshot.round  # each spend commits before its round
                assert store.run("r").last_round >= snapshot.round  # the counter never goes back
                seen.add(snapshot.round)
                reads += 1
        assert writer.wait(timeout=120) == 0
    finally:
        if writer.poll() is None:
            writer.kill()
        writer.wait(timeout=30)
    with RunStore(path) as store:
        assert model_round(store.load("r").arrays) == ROUNDS
    assert len(seen) > 10, f"the reads did not overlap the commits: rounds seen {sorted(seen)}"


def test_a_file_a_commit_dropped_after_the_snapshot_began_is_read_again_on_the_new_state(
    tmp_path: Path,
) -> None:
    from flowerpets.core import RoundRecord
    from flowerpets.exceptions import CorruptStoreError

    path, rng = tmp_path / "runs.db", np.random.default_rng(0)

    def arrays(rnd: int) -> ArrayRecord:
        return ArrayRecord({"w": np.full(SIZE, rnd, np.float32)})

    with (
        RunStore(path) as writing,
        RunStore(path) as reading,
        writing.start_run("r", config={}, keep_arrays_every=None) as writer,
    ):
        writer.commit_round(RoundRecord(round=1), arrays=arrays(1), sampler=rng)
        real_read, reads = reading._files.read, []

        def read_after_a_commit(digest: bytes, nbytes: int, where: str) -> bytes:
            reads.append(digest)
            if len(reads) == 1:  # the snapshot names round 1's file: round 3 drops it now
                for rnd in (2, 3):  # (2 stops naming it, 3 overwrites it as its spare)
                    writer.commit_round(RoundRecord(round=rnd), arrays=arrays(rnd), sampler=rng)
            return real_read(digest, nbytes, where)

        reading._files.read = read_after_a_commit  # type: ignore[method-assign]
        snapshot = reading.load("r")
        assert model_round(snapshot.arrays) == snapshot.round == 3  # read again, whole
        assert len(reads) == 2 and reads[0] != reads[1]
        # Damage that stays (no commit since the snapshot) is still refused.
        reading._files.read = real_read  # type: ignore[method-assign]
        for file in reading._files.directory.glob("*.fpa"):
            file.unlink()
        with pytest.raises(CorruptStoreError, match="gone"):
            reading.load("r")
