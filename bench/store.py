"""Benchmark: the cost of committing one round to the run store, against its limit.

For each ``--params`` size (default 1,000,000 and 10,000,000 float32
parameters) it measures:

``limit``
    the same parameter bytes written to a file with one ``write`` and one
    ``fsync`` (opened with ``O_TRUNC``): what making those bytes durable costs
    at the least.
``limit_in_place``
    the same, written over a file that already holds as many bytes (no
    ``O_TRUNC``): its blocks and cached pages are reused, so the write
    allocates and frees nothing. The store overwrites a dropped round's file
    (a spare) the same way, so this is the limit of what it does; it is
    quoted beside the first, never instead of it.
``commit_round``
    ``RunWriter.commit_round`` of the next round on a store that keeps only the
    last round's arrays (``keep_arrays_every=None``, the steady state of a long
    run): encoding the arrays in the core's codec (with its CRC-32); inside one
    ``BEGIN IMMEDIATE`` transaction, their frame written to its own file with
    one ``write`` and one ``fsync`` while a helper thread computes its SHA-256
    (the file's name), the file renamed into place and its directory fsynced,
    then the small rows naming it and the ``COMMIT`` (WAL,
    ``synchronous=FULL``: the log's fsync); after it, the previous round's file
    deleted (``collect``) and, once the log holds ``--checkpoint-bytes`` (the
    store's default, 256 MiB), the checkpoint that copies it into the main
    file. The log now holds only small rows, so the bench's commits never
    checkpoint; ``ratio_mean`` (mean over mean) would spread one over them.

The parts of each commit (``encode``, ``digest``: the wait for the SHA-256
once the file is on disk, ``write``: the file, ``commit``: the rows and
``COMMIT``, ``collect``, ``checkpoint``: ``RunWriter.last_commit_seconds``)
are reported as medians, and
the ratio to the limit both for the whole commit and for the part before the
checkpoint (when the round is already durable). Every commit's arrays are read
back and checked bit for bit at the end; the bench exits with status 1 if they
differ. Files go to ``--dir`` (default: the system's temporary directory), on
the same file system for both cases.

Run from the repository root::

    PYTHONPATH=$PWD python bench/store.py [--params 1000000 10000000] [--repeats 5]
    PYTHONPATH=$PWD python bench/store.py --json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from _common import (
    MEMORY_METRIC,
    Case,
    add_common_arguments,
    finish,
    format_table,
    max_rss_mb,
    measurement_table,
    positive_int,
    ratio,
    run_cases,
)

from flowerpets.core import ArrayRecord, RoundRecord
from flowerpets.store import RunStore, RunWriter

PARTS = ("encode", "digest", "write", "commit", "collect", "checkpoint")


def write_and_fsync(path: Path, data: memoryview, *, truncate: bool = True) -> int:
    """The limit: one write and one fsync of ``data`` (over the old bytes: ``truncate=False``)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if truncate else 0), 0o600)
    try:
        written = os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    if written != len(data):
        raise RuntimeError(f"short write: {written} of {len(data)} bytes")
    return written


class Committer:
    """Commits round after round of the same arrays; keeps each commit's parts."""

    def __init__(self, writer: RunWriter, arrays: ArrayRecord, update: np.ndarray) -> None:
        self.writer = writer
        self.arrays = arrays
        self.update = update  # the arrays' buffer
        self.rng = np.random.default_rng(0)
        self.parts: list[dict[str, float]] = []

    def __call__(self) -> int:
        rnd = self.writer.last_round + 1
        # Each round's model differs, as in a run: the store keeps one file per distinct
        # frame, so the same bytes again would be found stored and not written twice.
        self.update[0] = rnd
        self.rng.random()
        self.writer.commit_round(RoundRecord(round=rnd), arrays=self.arrays, sampler=self.rng)
        self.parts.append(dict(self.writer.last_commit_seconds))
        return rnd


def measure(
    args: argparse.Namespace, params: int, directory: Path, progress: Any
) -> dict[str, Any]:
    update = np.random.default_rng(params).standard_normal(params, dtype=np.float32)
    arrays = ArrayRecord.from_numpy({"params": update}, copy=False)
    raw = memoryview(update.data).cast("B")
    limit_path = directory / f"limit-{params}.bin"
    in_place_path = directory / f"in-place-{params}.bin"
    write_and_fsync(in_place_path, raw)
    store_path = directory / f"store-{params}.db"
    with RunStore(store_path, checkpoint_bytes=args.checkpoint_bytes) as store:
        writer = store.start_run(
            f"bench-{params}", config={"params": params}, keep_arrays_every=None
        )
        committer = Committer(writer, arrays, update)
        cases = [
            Case("limit", lambda: write_and_fsync(limit_path, raw), "one write + fsync"),
            Case(
                "limit_in_place",
                lambda: write_and_fsync(in_place_path, raw, truncate=False),
                "one write + fsync over the old bytes",
            ),
            Case("commit_round", committer, "encode + file write/fsync + SHA-256 + rows + COMMIT"),
        ]
        results = run_cases(cases, args.repeats, settle=args.settle, progress=progress)
        timed = committer.parts[1:]  # not the tracemalloc run
        parts = {name: statistics.median(p[name] for p in timed) for name in PARTS}
        writer.close()
        stored = store.load(f"bench-{params}").arrays
        stored_mb = (
            sum(
                p.stat().st_size
                for p in (store_path, *store_path.with_name(store_path.name + ".arrays").iterdir())
            )
            / 2**20
        )
    exact = stored is not None and stored["params"].numpy().tobytes() == update.tobytes()
    limit, commit = results["limit"], results["commit_round"]
    durable = [sum(p[n] for n in PARTS if n not in ("collect", "checkpoint")) for p in timed]
    return {
        "params": params,
        "bytes": raw.nbytes,
        "results": {name: m.to_json(limit) for name, m in results.items()},
        "ratio": ratio(commit, limit),
        "ratio_mean": statistics.mean(commit.times) / statistics.mean(limit.times),
        "ratio_in_place": commit.median / results["limit_in_place"].median,
        "ratio_before_checkpoint": statistics.median(durable) / limit.median,
        "parts_s": parts,
        "parts_in_limits": {name: s / limit.median for name, s in parts.items()},
        "store_mb": stored_mb,
        "exact": exact,
        "_measurements": results,
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="A round's commit to the run store.")
    parser.add_argument(
        "--params",
        type=positive_int,
        nargs="+",
        default=[1_000_000, 10_000_000],
        help="float32 parameters per commit (default 1,000,000 and 10,000,000)",
    )
    parser.add_argument("--dir", type=Path, default=None, help="where the files go")
    parser.add_argument(
        "--checkpoint-bytes",
        type=int,
        default=256 << 20,
        help="RunStore(checkpoint_bytes=...): log bytes between checkpoints (0: every commit)",
    )
    add_common_arguments(parser, repeats=5)
    return parser.parse_args(argv)


def report(args: argparse.Namespace, sizes: dict[str, Any]) -> str:
    lines = [f"store: medians of {args.repeats} run(s); peak MB = {MEMORY_METRIC}", ""]
    for size in sizes.values():
        lines += [
            f"{size['params']:,} float32 parameters ({size['bytes'] / 2**20:.1f} MiB); "
            f"read back bit for bit: {size['exact']}; "
            f"durable (before collect, checkpoint): "
            f"{size['ratio_before_checkpoint']:.2f}x the limit; "
            f"mean over mean: {size['ratio_mean']:.2f}x; "
            f"{size['ratio_in_place']:.2f}x the in-place limit",
            measurement_table(size["_measurements"].values(), baseline="limit"),
            format_table(
                ("commit part", "median s", "x limit"),
                [(n, s, size["parts_in_limits"][n]) for n, s in size["parts_s"].items()],
            ),
            "",
        ]
    lines.append(f"process RSS high-water mark: {max_rss_mb() or float('nan'):.0f} MB")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    progress = None if args.quiet else sys.stderr
    sizes: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="flowerpets-bench-store-", dir=args.dir) as tmp:
        for params in args.params:
            sizes[str(params)] = measure(args, params, Path(tmp), progress)
    failed = [f"{n} params: the stored arrays differ" for n, s in sizes.items() if not s["exact"]]
    payload = {
        "config": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
            if k not in ("json", "quiet")
        },
        "memory_metric": MEMORY_METRIC,
        "sizes": {
            n: {k: v for k, v in s.items() if not k.startswith("_")} for n, s in sizes.items()
        },
        "ok": not failed,
        "failed": failed,
    }
    return finish(args, "store", payload, lambda: report(args, sizes), failed)


if __name__ == "__main__":
    sys.exit(main())
