"""A small stored run the store tests start from, with what it should read back."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flowerpets.core import ArrayRecord, Error, ErrorCode, Failure, FailureKind, RoundRecord
from flowerpets.store import RunStore


@dataclass
class StoredRun:
    path: Path
    run_id: str
    arrays: list[ArrayRecord]  # after round r at index r (index 0: the initial arrays)
    records: list[RoundRecord]
    sampler_states: list[dict[str, object]]


def arrays_directory(path: Path) -> Path:
    """Where the store at ``path`` keeps its arrays' files."""
    return path.with_name(path.name + ".arrays")


def array_files(path: Path) -> list[Path]:
    """The arrays' files of the store at ``path`` (not those being written or deleted)."""
    directory = arrays_directory(path)
    return sorted(directory.glob("*.fpa")) if directory.is_dir() else []


def stored_bytes(path: Path) -> bytes:
    """Every byte the store at ``path`` holds: its file, its log and every file of its
    arrays directory (one being written or deleted too)."""
    wal = Path(f"{path}-wal")
    directory = arrays_directory(path)
    files = sorted(directory.iterdir()) if directory.is_dir() else []
    parts = [path, *([wal] if wal.exists() else []), *files]
    return b"".join(p.read_bytes() for p in parts)


def same_bits(a: ArrayRecord, b: ArrayRecord) -> bool:
    """The same names in the same order, each array of the same dtype, shape and bytes."""
    if list(a) != list(b):
        return False
    for name in a:
        x, y = a[name].numpy(), b[name].numpy()
        if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
            return False
    return True


def model(round: int) -> ArrayRecord:
    rng = np.random.default_rng(100 + round)
    return ArrayRecord.from_numpy(
        {
            "dense.weight": rng.standard_normal((64, 32)).astype(np.float32),
            "dense.bias": rng.standard_normal(32),
            "steps": np.array([round], dtype=np.int64),
        }
    )


def record(round: int) -> RoundRecord:
    failure = Failure("train", Error(ErrorCode.TIMEOUT, "no answer in 5 s"), FailureKind.NO_REPLY)
    return RoundRecord(
        round=round,
        cohort_size=3,
        participants=(1, 2),
        failures={3: failure},
        train_metrics={"loss": 1.0 / round, "epsilon": 0.25 * round},
        server_metrics={"accuracy": 0.5 + 0.01 * round},
        seconds=0.125,
    )


def write_run(
    path: Path, rounds: int = 3, *, run_id: str = "run-a", **options: object
) -> StoredRun:
    rng = np.random.default_rng(7)
    run = StoredRun(path, run_id, [model(0)], [], [])
    with (
        RunStore(path) as store,
        store.start_run(
            run_id, config={"rounds": rounds, "lr": 0.05}, initial_arrays=model(0), **options
        ) as writer,
    ):
        for rnd in range(1, rounds + 1):
            rng.choice(10, size=3, replace=False)  # the round's cohort draw
            writer.commit_round(
                record(rnd),
                arrays=model(rnd),
                sampler=rng,
                pet_states={"dp/ledger": {"steps": rnd}, "he/public": b"\x00pk" * rnd},
            )
            writer.record_spend({"kind": "gaussian", "noise_multiplier": 1.1}, round=rnd)
            run.arrays.append(model(rnd))
            run.records.append(record(rnd))
            run.sampler_states.append(dict(rng.bit_generator.state))
    return run
