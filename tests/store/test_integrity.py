"""A damaged store is refused with a typed error, never read as a shorter or fresher run.

SQLite's check on open catches a damaged file structure; the rows' SHA-256
catches damaged values SQLite never looks at; the ledger's hash chain and the
run's round counter catch rows that went missing.
"""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowerpets.exceptions import CorruptStoreError, StoreError
from flowerpets.store import RunStore
from tests.store import stored_runs as files_of
from tests.store.stored_runs import StoredRun, model, record, same_bits, write_run


def damage(path: Path, sql: str, *args: object) -> None:
    """Change a row behind the store's back, as a bit flip or a careless operator would."""
    with sqlite3.connect(path) as connection:
        connection.execute(sql, args)
    connection.close()


def read_everything(path: Path, run_id: str) -> None:
    with RunStore(path) as store:
        store.load(run_id)
        for info in store.runs():
            store.spends(info.population_id)


def round_three_file(run: StoredRun) -> Path:
    """The file holding round 3's arrays, found by their bytes."""
    needle = model(3)["dense.weight"].numpy().tobytes()[:64]
    # The arrays are stored as the codec wrote them: raw little-endian bytes.
    (found,) = [p for p in files_of.array_files(run.path) if needle in p.read_bytes()]
    return found


def test_a_flipped_byte_in_the_arrays_is_refused_on_read(stored_run: StoredRun) -> None:
    file = round_three_file(stored_run)
    data = bytearray(file.read_bytes())
    data[data.find(model(3)["dense.weight"].numpy().tobytes()[:64]) + 10] ^= 0x01
    file.write_bytes(bytes(data))
    store = RunStore(stored_run.path)  # SQLite's structure is intact: the open succeeds
    with store, pytest.raises(CorruptStoreError, match=r"arrays of round 3 .* SHA-256"):
        store.load(stored_run.run_id)


def test_a_missing_arrays_file_is_refused_on_read(stored_run: StoredRun) -> None:
    round_three_file(stored_run).unlink()
    with RunStore(stored_run.path) as store:
        with pytest.raises(CorruptStoreError, match=r"arrays of round 3 .* missing"):
            store.load(stored_run.run_id)
        assert same_bits(store.arrays_at(stored_run.run_id, 2), stored_run.arrays[2])


def test_a_cut_arrays_file_is_refused_on_read(stored_run: StoredRun) -> None:
    file = round_three_file(stored_run)
    file.write_bytes(file.read_bytes()[:-1])
    with RunStore(stored_run.path) as store, pytest.raises(CorruptStoreError, match="length"):
        store.load(stored_run.run_id)


def test_another_rounds_file_in_place_of_the_arrays_is_refused(stored_run: StoredRun) -> None:
    file = round_three_file(stored_run)
    (other,) = [p for p in files_of.array_files(stored_run.path) if p != file][-1:]
    file.write_bytes(other.read_bytes())  # a whole, valid frame, but not round 3's
    with RunStore(stored_run.path) as store, pytest.raises(CorruptStoreError, match="SHA-256"):
        store.load(stored_run.run_id)


def test_files_no_row_names_are_collected_on_open(stored_run: StoredRun) -> None:
    kept = files_of.array_files(stored_run.path)
    directory = files_of.arrays_directory(stored_run.path)
    strays = [directory / ("ab" * 32 + ".fpa"), directory / "123-4f.partial"]
    for stray in strays:
        stray.write_bytes(b"left by a commit that never reached COMMIT")
    with RunStore(stored_run.path) as store:
        snapshot = store.load(stored_run.run_id)
    assert files_of.array_files(stored_run.path) == kept  # no stray keeps its name
    left = sorted(p.name.rpartition(".")[2] for p in directory.iterdir() if p not in kept)
    assert left == ["spare", "spare"]  # kept to be overwritten by later rounds, named by no row
    assert snapshot.arrays is not None and same_bits(snapshot.arrays, stored_run.arrays[3])
    with RunStore(stored_run.path) as store, store.resume_run(stored_run.run_id) as writer:
        writer.commit_round(record(4), arrays=model(4), sampler=np.random.default_rng(4))
        assert same_bits(store.load(stored_run.run_id).arrays or model(0), model(4))
    assert len(files_of.array_files(stored_run.path)) == len(kept) + 1
    assert len(list(directory.iterdir())) == len(kept) + 1 + 1  # round 4 took a spare


def test_thinned_rounds_files_are_dropped_by_the_next_commit(tmp_path: Path) -> None:
    path = tmp_path / "runs.db"
    with RunStore(path) as store:
        with store.start_run("r", config={}, keep_arrays_every=None) as writer:
            for rnd in (1, 2, 3):
                writer.commit_round(
                    record(rnd), arrays=model(rnd), sampler=np.random.default_rng(rnd)
                )
                # The round's file, and the one its commit stopped naming (readers that
                # began before it may still open it), dropped by the next commit.
                assert len(files_of.array_files(path)) == min(rnd, 2)
        assert same_bits(store.load("r").arrays or model(0), model(3))
    # Closing the writer dropped round 2's: kept as the spare the next frame overwrites.
    names = sorted(p.suffix for p in files_of.arrays_directory(path).iterdir())
    assert names == [".fpa", ".spare"]


@pytest.mark.parametrize(
    ("sql", "match"),
    [
        (
            "UPDATE rounds SET record_json = replace(record_json, '\"cohort_size\":3', "
            "'\"cohort_size\":4') WHERE round = 2",
            "round 2",
        ),
        ('UPDATE runs SET config_json = \'{"lr":0.5,"rounds":3}\'', "run 'run-a'"),
        ("UPDATE pet_states SET value = x'00' WHERE name = 'he/public'", "he/public"),
        ("UPDATE arrays SET round = 9 WHERE round = 3", "arrays of its last round"),
        ("DELETE FROM rounds WHERE round = 3", "rounds were lost"),
        ("UPDATE runs SET last_round = 2", "run 'run-a'"),
        ("DELETE FROM privacy_ledger WHERE seq = 2", "lacks entry 2"),
        ("DELETE FROM privacy_ledger WHERE seq = 3", "truncated"),
        ('UPDATE privacy_ledger SET event_json = \'{"kind":"none"}\' WHERE seq = 1', "entry 1"),
        ("DELETE FROM populations", "no ledger"),
    ],
)
def test_a_damaged_row_is_refused(stored_run: StoredRun, sql: str, match: str) -> None:
    damage(stored_run.path, sql)
    with pytest.raises(CorruptStoreError, match=match):
        read_everything(stored_run.path, stored_run.run_id)


def test_a_damaged_ledger_refuses_the_resume(stored_run: StoredRun) -> None:
    damage(stored_run.path, "DELETE FROM privacy_ledger WHERE seq = 3")
    with RunStore(stored_run.path) as store, pytest.raises(CorruptStoreError):
        store.resume_run(stored_run.run_id)


def test_a_damaged_page_is_refused_on_open(stored_run: StoredRun) -> None:
    data = bytearray(stored_run.path.read_bytes())
    page = int.from_bytes(data[16:18], "big")  # the header's page size (1 stands for 64 KiB)
    page = 65536 if page == 1 else page
    data[page * 1] = 0x2A  # page 2's b-tree page type: no valid type
    stored_run.path.write_bytes(bytes(data))
    with pytest.raises(CorruptStoreError):
        RunStore(stored_run.path)


def test_a_file_that_is_no_store_is_refused(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not a database, just bytes" * 100)
    with pytest.raises(CorruptStoreError):
        RunStore(garbage)
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as connection:
        connection.execute("CREATE TABLE t (x)")
    connection.close()
    with pytest.raises(StoreError, match="tables of its own"):
        RunStore(other)


@pytest.mark.parametrize("keep", [0.9, 0.5, 0.1])
def test_a_truncated_file_is_refused(stored_run: StoredRun, keep: float) -> None:
    size = stored_run.path.stat().st_size
    with stored_run.path.open("r+b") as f:
        f.truncate(int(size * keep))
    with pytest.raises(CorruptStoreError):
        read_everything(stored_run.path, stored_run.run_id)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> StoredRun:
    return write_run(tmp_path_factory.mktemp("pristine") / "runs.db", rounds=2)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_any_damage_is_refused_or_harmless(
    pristine: StoredRun, tmp_path: Path, data: st.DataObject
) -> None:
    """Flip a byte anywhere, or cut a file anywhere (the SQLite file or an arrays file):
    the store refuses, or reads the truth."""
    copy = tmp_path / "copy.db"
    shutil.copyfile(pristine.path, copy)
    shutil.rmtree(files_of.arrays_directory(copy), ignore_errors=True)
    shutil.copytree(files_of.arrays_directory(pristine.path), files_of.arrays_directory(copy))
    for suffix in ("-wal", "-shm"):
        Path(f"{copy}{suffix}").unlink(missing_ok=True)
    originals = [pristine.path, *files_of.array_files(pristine.path)]
    which = data.draw(st.integers(0, len(originals) - 1), label="file")
    original, target = originals[which], [copy, *files_of.array_files(copy)][which]
    size = original.stat().st_size
    if data.draw(st.booleans(), label="truncate"):
        with target.open("r+b") as f:
            f.truncate(data.draw(st.integers(0, size - 1), label="length"))
    else:
        # Most of a fresh file is zeros no reader looks at: flip where something is written.
        used = np.flatnonzero(np.frombuffer(original.read_bytes(), dtype=np.uint8))
        at = int(used[data.draw(st.integers(0, len(used) - 1), label="written byte")])
        bit = data.draw(st.integers(0, 7), label="bit")
        raw = bytearray(target.read_bytes())
        raw[at] ^= 1 << bit
        target.write_bytes(bytes(raw))
    try:
        with RunStore(copy, check="full") as store:
            snapshot = store.load(pristine.run_id)
            spends = store.spends(snapshot.info.population_id)
    except StoreError:
        return  # refused: what damage must lead to
    assert snapshot.round == 2 and snapshot.arrays is not None
    assert same_bits(snapshot.arrays, pristine.arrays[2])
    assert snapshot.history.rounds == pristine.records
    assert snapshot.sampler_state == pristine.sampler_states[-1]
    assert len(spends) == 2
