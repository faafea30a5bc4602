"""Shared helpers for the benchmarks in ``bench/``.

A benchmark describes what it measures as a list of :class:`Case` objects and
hands them to :func:`run_cases`, which

* runs every case once, untimed, under :mod:`tracemalloc` (this is also the
  warm-up) and records the *peak of traced allocations above what was
  allocated when the run started*: numpy reports its array buffers to
  tracemalloc, so this is the extra memory the case needed (temporaries,
  accumulators, copies), not the inputs prepared beforehand;
* then times ``repeats`` runs of every case with :func:`time.perf_counter`,
  interleaved (repeat 1 of every case, then repeat 2, ...) so that a slow
  stretch of a noisy machine hits every case rather than one, with a
  ``gc.collect()`` and a short untimed pause (``settle``) before each run and
  tracemalloc off. The pause matters: after a BLAS call, OpenBLAS's worker
  threads busy-wait for about 0.1 s, which on a small machine takes a core
  away from whatever runs next.

Results are :class:`Measurement` objects: report their *median*
(:func:`ratio` against a baseline), as a table (:func:`measurement_table`) or
as one JSON object (:func:`emit_json`). Memory is reported in MiB (``MB`` here
is 2**20 bytes). :func:`finish` (or :func:`emit_result`) is a benchmark's last
step: the JSON object or the report, then its failures and exit status.
:func:`add_common_arguments` gives every benchmark the same ``--repeats``,
``--json``, ``--settle`` and ``--quiet`` options, :func:`profile_call` a quick
cProfile of one case, and :func:`environment` what a reader needs to compare
numbers across machines. :func:`update_app` is the ClientApp the round
benchmarks share: each node replies with a pre-made update.

Usage sketch::

    cases = [Case("numpy", lambda: np.add(a, b)), Case("ours", lambda: ours(a, b))]
    results = run_cases(cases, repeats=args.repeats)
    print(measurement_table(results.values(), baseline="numpy"))
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import math
import os
import platform
import pstats
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TextIO, TypeVar

from numpy.typing import NDArray

from flowerpets._argtypes import non_negative_float, positive_int
from flowerpets.core import (
    WEIGHT_KEY,
    ArrayRecord,
    ClientApp,
    ClientMod,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)

__all__ = [
    "MEMORY_METRIC",
    "Case",
    "Measurement",
    "add_common_arguments",
    "emit_json",
    "emit_result",
    "environment",
    "finish",
    "format_seconds",
    "format_table",
    "max_rss_mb",
    "measure_peak",
    "measurement_table",
    "non_negative_float",
    "positive_int",
    "profile_call",
    "ratio",
    "run_cases",
    "time_call",
    "update_app",
]

MB = 1024 * 1024

MEMORY_METRIC = (
    "tracemalloc peak above the start of one untimed run (numpy buffers included; "
    "inputs prepared before the run are not counted)"
)


# -- describing and running measurements ---------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Case:
    """One thing to measure: a callable run as is, many times.

    ``run`` must do the whole job each call (no state carried between calls
    unless that is what is measured); what it returns is kept as the
    measurement's ``result`` so the benchmark can check it.
    """

    name: str
    run: Callable[[], Any]
    note: str = ""


@dataclass(slots=True)
class Measurement:
    """The timings and peak memory of one case."""

    name: str
    note: str = ""
    times: list[float] = field(default_factory=list)
    peak_bytes: int | None = None
    result: Any = None

    @property
    def median(self) -> float:
        return statistics.median(self.times) if self.times else math.nan

    @property
    def best(self) -> float:
        return min(self.times) if self.times else math.nan

    @property
    def peak_mb(self) -> float | None:
        return None if self.peak_bytes is None else self.peak_bytes / MB

    def to_json(self, baseline: Measurement | None = None) -> dict[str, Any]:
        return {
            "median_s": self.median,
            "min_s": self.best,
            "times_s": list(self.times),
            "ratio": ratio(self, baseline) if baseline is not None else None,
            "peak_mb": self.peak_mb,
            "note": self.note,
        }


def time_call(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``(fn(), seconds)``, after a full garbage collection so earlier garbage is not billed."""
    gc.collect()
    started = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - started


def measure_peak(fn: Callable[[], Any]) -> tuple[Any, int]:
    """``(fn(), peak bytes)``: the tracemalloc peak above what was traced when ``fn`` started.

    If tracemalloc is already tracing (``PYTHONTRACEMALLOC``), it is left on and
    only its peak is reset; otherwise it is started and stopped around ``fn``.
    Tracing slows Python-heavy code down, so never time a call measured here.
    """
    gc.collect()
    started_here = not tracemalloc.is_tracing()
    if started_here:
        tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before, _ = tracemalloc.get_traced_memory()
        result = fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        if started_here:
            tracemalloc.stop()
    return result, max(0, peak - before)


def run_cases(
    cases: Sequence[Case],
    repeats: int,
    *,
    memory: bool = True,
    settle: float = 0.25,
    progress: TextIO | None = None,
) -> dict[str, Measurement]:
    """Measure every case: one untimed run (peak memory, warm-up), then ``repeats`` timed runs.

    Timed runs are interleaved across cases, each after a ``settle``-second pause.
    With ``memory=False`` the first run is a plain warm-up and ``peak_bytes``
    stays None. ``progress`` (for example ``sys.stderr``) gets one line per run.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    names = [case.name for case in cases]
    if len(set(names)) != len(names):
        raise ValueError(f"case names must be unique, got {names}")
    results = {case.name: Measurement(case.name, case.note) for case in cases}
    for case in cases:
        m = results[case.name]
        _say(progress, f"{case.name}: {'peak memory' if memory else 'warm-up'}")
        m.result = None  # let go of a previous result before running again
        if memory:
            m.result, m.peak_bytes = measure_peak(case.run)
        else:
            m.result, _ = time_call(case.run)
    for repeat in range(1, repeats + 1):
        for case in cases:
            m = results[case.name]
            m.result = None
            time.sleep(settle)
            m.result, seconds = time_call(case.run)
            m.times.append(seconds)
            _say(progress, f"{case.name}: repeat {repeat}/{repeats}: {seconds:.4f} s")
    return results


def _say(stream: TextIO | None, line: str) -> None:
    if stream is not None:
        print(line, file=stream, flush=True)


def ratio(measurement: Measurement, baseline: Measurement) -> float:
    """Median over median (NaN if the baseline's median is 0 or missing)."""
    base = baseline.median
    return measurement.median / base if base > 0 else math.nan


def profile_call(fn: Callable[[], Any], *, top: int = 30, sort: str = "cumulative") -> str:
    """Run ``fn`` once under cProfile (this thread only) and return the top of the stats."""
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        fn()
    finally:
        profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).strip_dirs().sort_stats(sort).print_stats(top)
    return out.getvalue()


# -- reporting -----------------------------------------------------------------------------------
def format_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A plain-text table: the first column left-aligned, the others right-aligned."""
    cells = [[str(h) for h in headers], *([_cell(v) for v in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(
            value.ljust(width) if i == 0 else value.rjust(width)
            for i, (value, width) in enumerate(zip(row, widths, strict=True))
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *(line(row) for row in cells[1:])])


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.4f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def measurement_table(
    measurements: Iterable[Measurement], *, baseline: str, label: str | None = None
) -> str:
    """Name, median seconds, ratio to ``baseline``'s median, peak MB.

    The ratio column is headed ``x <label>`` (default: the baseline's name).
    """
    rows = list(measurements)
    base = next((m for m in rows if m.name == baseline), None)
    if base is None:
        raise ValueError(f"baseline {baseline!r} is not among the measurements")
    headers = ("name", "median s", f"x {label or baseline}", "peak MB")
    return format_table(
        headers,
        (
            (
                m.name,
                format_seconds(m.median),
                f"{ratio(m, base):.2f}x",
                None if m.peak_mb is None else f"{m.peak_mb:.1f}",
            )
            for m in rows
        ),
    )


def format_seconds(seconds: float) -> str:
    """Four decimals, or three significant digits below a millisecond."""
    if math.isnan(seconds):
        return "-"
    return f"{seconds:.4f}" if seconds >= 1e-3 else f"{seconds:.2e}"


def emit_json(payload: Mapping[str, Any], stream: TextIO | None = None) -> None:
    """Write ``payload`` as one JSON object (NaN and infinity become null)."""
    print(json.dumps(_json_safe(payload), indent=2), file=stream or sys.stdout)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return _json_safe(value.item())
    return value


def emit_result(
    args: argparse.Namespace,
    benchmark: str,
    payload: Mapping[str, Any],
    report: Callable[[], str],
    *,
    process_rss: bool = True,
) -> None:
    """Print a benchmark's result: one JSON object with ``--json``, else ``report()``.

    The JSON object is ``{"benchmark": benchmark, **payload, "process_max_rss_mb": ...,
    "environment": ...}`` (without ``process_max_rss_mb`` if ``process_rss`` is false).
    """
    if args.json:
        rss = {"process_max_rss_mb": max_rss_mb()} if process_rss else {}
        emit_json({"benchmark": benchmark, **payload, **rss, "environment": environment()})
    else:
        print(report())


def finish(
    args: argparse.Namespace,
    benchmark: str,
    payload: Mapping[str, Any],
    report: Callable[[], str],
    failed: Sequence[str],
) -> int:
    """:func:`emit_result`, then the exit status: 1 after ``FAILED: a; b`` on stderr, or 0."""
    emit_result(args, benchmark, payload, report)
    if failed:
        print("FAILED: " + "; ".join(failed), file=sys.stderr)
        return 1
    return 0


# -- a round's workload --------------------------------------------------------------------------
_T_co = TypeVar("_T_co", covariant=True)


class _Indexed(Protocol[_T_co]):
    """What ``[index]`` reads from: a sequence, a mapping by index, an array's rows."""

    def __getitem__(self, index: int, /) -> _T_co: ...


def update_app(
    updates: _Indexed[NDArray[Any]],
    weights: _Indexed[int],
    *,
    name: str = "params",
    copy: bool = False,
    mods: Sequence[ClientMod] = (),
) -> ClientApp:
    """A ClientApp whose train handler replies with the node's pre-made update.

    Node ``partition-id`` = i replies ``updates[i]`` as the array ``name`` (wrapped
    without a copy unless ``copy``) and ``weights[i]`` as its weight.
    """
    app = ClientApp(mods=mods)

    @app.train()
    def train(msg: Message, context: Context) -> RecordDict:
        index = int(context.node_config["partition-id"])  # type: ignore[arg-type]
        return RecordDict(
            {
                "arrays": ArrayRecord.from_numpy({name: updates[index]}, copy=copy),
                "metrics": MetricRecord({WEIGHT_KEY: weights[index]}),
            }
        )

    return app


# -- command line and environment ----------------------------------------------------------------
# positive_int and non_negative_float (argparse types) come from flowerpets._argtypes.
def add_common_arguments(parser: argparse.ArgumentParser, *, repeats: int = 5) -> None:
    """The options every benchmark has: ``--repeats``, ``--json``, ``--settle``, ``--quiet``."""
    parser.add_argument(
        "--repeats",
        type=positive_int,
        default=repeats,
        help=f"timed runs of each case; medians are reported (default {repeats})",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object on stdout instead of the table",
    )
    parser.add_argument(
        "--settle",
        type=non_negative_float,
        default=0.25,
        metavar="SECONDS",
        help="untimed pause before each timed run, so BLAS threads left spinning by the "
        "previous case go idle (default 0.25)",
    )
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="no progress lines on stderr",
    )


def max_rss_mb() -> float | None:
    """The process's resident-set high-water mark so far, in MB (None where unknown)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MB if sys.platform == "darwin" else peak * 1024 / MB  # bytes on macOS, else KB


def environment() -> dict[str, Any]:
    """What a reader needs to compare numbers across machines."""
    import numpy as np

    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        # Reported, never set: it changes which BLAS kernels numpy's dot/tensordot use.
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
    }
