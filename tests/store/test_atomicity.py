"""A round commits whole or not at all: a failure mid-commit, a full disk or a killed
process leaves the last committed round exactly as it was."""

from __future__ import annotations

import errno
import hashlib
import os
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from flowerpets.core import ArrayRecord
from flowerpets.exceptions import StoreError, StoreWriteError
from flowerpets.store import RunInfo, RunStore, run_writer
from flowerpets.store.array_files import ArrayFiles
from flowerpets.store.encoding import encode_arrays
from tests.store.stored_runs import (
    StoredRun,
    array_files,
    arrays_directory,
    model,
    record,
    same_bits,
    stored_bytes,
)


def assert_round_three_intact(run: StoredRun) -> None:
    with RunStore(run.path, check="full") as store:
        snapshot = store.load(run.run_id)
        spends = store.spends(snapshot.info.population_id)
    assert snapshot.round == 3
    assert snapshot.arrays is not None and same_bits(snapshot.arrays, run.arrays[3])
    assert snapshot.history.rounds == run.records
    assert snapshot.sampler_state == run.sampler_states[-1]
    assert snapshot.pet_states == {"dp/ledger": {"steps": 3}, "he/public": b"\x00pk" * 3}
    assert len(spends) == 3


def io_error() -> sqlite3.OperationalError:
    error = sqlite3.OperationalError("disk I/O error")
    error.sqlite_errorcode = 10  # type: ignore[attr-defined]  # SQLITE_IOERR
    error.sqlite_errorname = "SQLITE_IOERR"  # type: ignore[attr-defined]
    return error


def test_a_failure_mid_commit_leaves_the_last_round(
    stored_run: StoredRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_last_round = run_writer._set_last_round

    def write_all_then_fail(db: sqlite3.Connection, info: RunInfo, rnd: int) -> None:
        # Round 3's arrays deleted, round 4's rows written, the counter moved to 4...
        set_last_round(db, info, rnd)
        raise io_error()  # ...and then the disk fails before COMMIT

    with RunStore(stored_run.path) as store, store.resume_run(stored_run.run_id) as writer:
        monkeypatch.setattr(run_writer, "_set_last_round", write_all_then_fail)
        with pytest.raises(StoreWriteError, match="rolled back"):
            writer.commit_round(
                record(4),
                arrays=model(4),
                sampler=np.random.default_rng(0),
                pet_states={"dp/ledger": {"steps": 4}},
            )
        assert writer.last_round == 3
        monkeypatch.undo()
    assert_round_three_intact(stored_run)
    with RunStore(stored_run.path) as store, store.resume_run(stored_run.run_id) as writer:
        writer.commit_round(record(4), arrays=model(4), sampler=np.random.default_rng(0))
        assert writer.last_round == 4


def test_a_full_disk_leaves_the_last_round(stored_run: StoredRun) -> None:
    size = len(stored_bytes(stored_run.path))
    big = ArrayRecord.from_numpy({"w": np.ones(1_000_000, np.float32)})  # 4 MB: does not fit
    capped = RunStore(stored_run.path, max_bytes=size + 65536)
    with capped as store, store.resume_run(stored_run.run_id) as writer:
        with pytest.raises(StoreWriteError, match="full"):
            writer.commit_round(record(4), arrays=big, sampler=np.random.default_rng(0))
        assert writer.last_round == 3
    assert_round_three_intact(stored_run)


def test_a_spend_that_cannot_be_written_raises_before_any_release(stored_run: StoredRun) -> None:
    with RunStore(stored_run.path) as store, store.resume_run(stored_run.run_id) as writer:
        store._connection.set_authorizer(  # the ledger's insert is refused by SQLite
            lambda action, table, *_: (
                sqlite3.SQLITE_DENY
                if action == sqlite3.SQLITE_INSERT and table == "privacy_ledger"
                else sqlite3.SQLITE_OK
            )
        )
        with pytest.raises(StoreError) as raised:
            writer.record_spend({"kind": "gaussian"}, round=4)
        store._connection.set_authorizer(None)
    assert "rolled back" in str(raised.value)
    assert_round_three_intact(stored_run)


def test_a_store_killed_mid_commit_resumes_from_the_last_round(tmp_path: Path) -> None:
    from tests.store.processes import kill_mid_commit

    run = kill_mid_commit(tmp_path / "runs.db")
    # Killed after round 4's arrays file was fsynced, before its COMMIT: the file is there...
    orphan = ArrayFiles(run.path).path(hashlib.sha256(encode_arrays(model(4))).digest())
    assert orphan.is_file()
    assert_round_three_intact(run)
    assert not orphan.exists()  # ...and opening the store collected it
    assert len(array_files(run.path)) == 4  # rounds 0 to 3, each still read back above


def test_a_full_disk_while_writing_the_arrays_file_leaves_the_last_round(
    stored_run: StoredRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_space(fd: int, buffers: object) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    before = sorted(arrays_directory(stored_run.path).iterdir())
    with RunStore(stored_run.path) as store, store.resume_run(stored_run.run_id) as writer:
        monkeypatch.setattr(os, "writev", no_space)
        with pytest.raises(StoreWriteError, match="full"):
            writer.commit_round(record(4), arrays=model(4), sampler=np.random.default_rng(0))
        monkeypatch.undo()
        assert writer.last_round == 3
    assert sorted(arrays_directory(stored_run.path).iterdir()) == before  # no partial file
    assert_round_three_intact(stored_run)


@pytest.mark.parametrize(("checkpoint_bytes", "in_main_file"), [(0, [1]), (1 << 30, [])])
def test_committed_rounds_reach_the_main_file_at_checkpoints(
    tmp_path: Path, checkpoint_bytes: int, in_main_file: list[int]
) -> None:
    """Until a checkpoint the round is durable in the log only; the main file lags behind."""
    path = tmp_path / "runs.db"
    with RunStore(path, checkpoint_bytes=checkpoint_bytes) as store:
        with store.start_run("r", config={}) as writer:
            writer.commit_round(record(1), arrays=model(1), sampler=np.random.default_rng(0))
            main_file_only = tmp_path / "main-only.db"
            main_file_only.write_bytes(path.read_bytes())  # the log left behind
        assert store.run("r").last_round == 1  # through the log
    with RunStore(main_file_only) as copy:
        assert [info.last_round for info in copy.runs()] == in_main_file
