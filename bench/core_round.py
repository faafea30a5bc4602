"""Benchmark: one FedAvg round through the real path, against plain numpy.

The workload: ``--nodes`` nodes (default 100), each holding a pre-made update
of ``--params`` float32 parameters (default 1,000,000) and a weight
(``num-examples``). No training happens: a node's train handler wraps its
update in an ``ArrayRecord`` and replies. What is measured:

``round``
    ``run_simulation(ServerApp(strategy=FedAvg(), num_rounds=1, ...), app, nodes)``
    with handlers that wrap the update with ``copy=False``: the full round
    (node set-up, messages over the in-process grid, validation, streaming
    float64 sum, the mean cast back to float32), nothing but the core's cost.
``round_copy``
    the same with ``copy=True``, as a real client builds a fresh array: each
    handler also copies 4 bytes x params.
``weighted_sum``
    ``WeightedSum.add`` over the same updates and the division by the total
    weight, without any messaging: the aggregation alone.
``grid_only``
    the same messages through the same ``SimulationGrid`` (set-up, send,
    handlers, receive), replies drained without aggregating: the messaging alone.
``numpy_*``
    plain numpy weighted averages of the same arrays, inputs already in memory
    (the stacked ones on a pre-stacked ``(nodes, params)`` array):

    * ``numpy_loop``: ``acc += w * x`` with a float64 ``acc`` (the product is float32);
    * ``numpy_loop_f64``: ``acc += np.multiply(x, w, dtype=float64)`` (the product is
      float64, the very arithmetic ``WeightedSum`` does);
    * ``numpy_average``: ``np.average(stack, weights=w, axis=0)``;
    * ``numpy_tensordot``: ``np.tensordot(w, stack, 1)`` with float64 weights (numpy
      converts the stack to float64, then BLAS dgemv);
    * ``numpy_tensordot_f32``: the same with float32 weights: BLAS sgemv, which
      *accumulates in float32*. It is reported for scale but is not a candidate
      for the limit, because the core's contract is float64 accumulation.

    The fastest float64-accumulating one is *the limit*; every ratio is to it.

Peak memory is the tracemalloc peak above the start of one untimed run of the
case (numpy buffers included, the pre-made updates not). The bench checks that
the round's model equals the limit's weighted average within float32
tolerance, and exits with status 1 if it does not.

Run from the repository root::

    PYTHONPATH=src python bench/core_round.py [--nodes 100] [--params 1000000] [--repeats 5]
    PYTHONPATH=src python bench/core_round.py --json
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from _common import (
    MEMORY_METRIC,
    Case,
    Measurement,
    add_common_arguments,
    finish,
    max_rss_mb,
    measurement_table,
    positive_int,
    profile_call,
    ratio,
    run_cases,
    update_app,
)
from numpy.typing import NDArray

from flowerpets.core import (
    ArrayRecord,
    ClientApp,
    Context,
    FedAvg,
    RecordDict,
    ServerApp,
    WeightedSum,
    collect,
    request_messages,
)
from flowerpets.simulation import run_simulation
from flowerpets.simulation.grid import SimulationGrid

NAME = "params"  # the model's one array
# Numpy ways whose accumulation is float64, as the core's is: candidates for the limit.
LIMIT_CANDIDATES = ("numpy_loop", "numpy_loop_f64", "numpy_average", "numpy_tensordot")
# The core's cases, which must reproduce the limit's result.
CORE_CASES = ("weighted_sum", "round", "round_copy")
# The numpy way doing WeightedSum's very arithmetic (float64 products, float64 sums).
SAME_ARITHMETIC = "numpy_loop_f64"
CASE_NAMES = (
    *LIMIT_CANDIDATES,
    "numpy_tensordot_f32",
    "weighted_sum",
    "grid_only",
    "round",
    "round_copy",
)
FLOAT32_EPS = float(np.finfo(np.float32).eps)

Vector = NDArray[Any]


# -- the workload --------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Workload:
    """The updates (rows of one C-contiguous stack, so no case pays for stacking) and weights."""

    stack: NDArray[np.float32]  # (nodes, params)
    weights: tuple[int, ...]  # num-examples per node
    seed: int

    @property
    def nodes(self) -> int:
        return int(self.stack.shape[0])

    @property
    def params(self) -> int:
        return int(self.stack.shape[1])

    @property
    def total_weight(self) -> int:
        return sum(self.weights)

    def initial_arrays(self) -> ArrayRecord:
        return ArrayRecord.from_numpy({NAME: np.zeros(self.params, dtype=np.float32)}, copy=False)

    def records(self) -> list[ArrayRecord]:
        """Each node's update as the server receives it (no copy)."""
        return [ArrayRecord.from_numpy({NAME: row}, copy=False) for row in self.stack]


def make_workload(nodes: int, params: int, seed: int) -> Workload:
    rng = np.random.default_rng(seed)
    stack = rng.standard_normal((nodes, params), dtype=np.float32)
    weights = tuple(int(w) for w in rng.integers(10, 1000, size=nodes))
    return Workload(stack=stack, weights=weights, seed=seed)


# -- the cases -----------------------------------------------------------------------------------
def run_round(workload: Workload, app: ClientApp) -> Vector:
    """One FedAvg round through run_simulation; the new global model."""
    server = ServerApp(strategy=FedAvg(), num_rounds=1, initial_arrays=workload.initial_arrays())
    result = run_simulation(server, app, workload.nodes, seed=workload.seed)
    record = result.history[0]
    if not record.ok or len(record.participants) != workload.nodes:
        raise RuntimeError(
            f"the round did not complete: error={record.error!r}, "
            f"{len(record.participants)}/{workload.nodes} participants, "
            f"failures={ {n: str(f) for n, f in list(record.failures.items())[:3]} }"
        )
    return result.arrays[NAME].numpy()


def weighted_sum_alone(workload: Workload, records: Sequence[ArrayRecord]) -> Vector:
    """The aggregation alone: WeightedSum over the updates, then the mean (as RoundResult.mean)."""
    total = WeightedSum(expected=workload.initial_arrays())
    for arrays, weight in zip(records, workload.weights, strict=True):
        total.add(arrays, weight)
    out: Vector = total.result()[NAME].numpy() / total.total_weight
    return out


def grid_only(workload: Workload, app: ClientApp) -> int:
    """The messaging alone: the round's messages through a SimulationGrid, replies drained."""
    contexts = [
        Context(
            node_id=index + 1,
            run_id=1,
            node_config={"partition-id": index, "num-partitions": workload.nodes},
        )
        for index in range(workload.nodes)
    ]
    strategy = FedAvg()
    rng = np.random.default_rng(workload.seed)
    with SimulationGrid(app, contexts, run_id=1) as grid:
        request = strategy.configure_train(1, workload.initial_arrays(), grid.node_ids(), rng)
        content = RecordDict({"arrays": request.arrays, "config": request.config})
        messages = request_messages(grid, request, content)
        replies = sum(1 for reply in collect(grid, messages, timeout=None) if reply.error is None)
    if replies != workload.nodes:
        raise RuntimeError(f"grid_only: {replies}/{workload.nodes} replies")
    return replies


def numpy_loop(stack: NDArray[np.float32], weights: Sequence[int]) -> Vector:
    acc = np.zeros(stack.shape[1], dtype=np.float64)
    for x, w in zip(stack, weights, strict=True):
        acc += w * x
    out: Vector = acc / sum(weights)
    return out


def numpy_loop_f64(stack: NDArray[np.float32], weights: Sequence[int]) -> Vector:
    acc = np.zeros(stack.shape[1], dtype=np.float64)
    for x, w in zip(stack, weights, strict=True):
        acc += np.multiply(x, w, dtype=np.float64)
    out: Vector = acc / sum(weights)
    return out


def numpy_average(stack: NDArray[np.float32], weights: Vector) -> Vector:
    out: Vector = np.average(stack, weights=weights, axis=0)
    return out


def numpy_tensordot(stack: NDArray[np.float32], weights: Vector) -> Vector:
    out: Vector = np.tensordot(weights, stack, 1) / weights.sum()
    return out


def make_cases(workload: Workload) -> list[Case]:
    stack, weights = workload.stack, workload.weights
    w64 = np.asarray(weights, dtype=np.float64)
    w32 = np.asarray(weights, dtype=np.float32)
    records = workload.records()
    app = update_app(stack, weights, name=NAME)
    app_copy = update_app(stack, weights, name=NAME, copy=True)

    def case(name: str, run: Callable[[], Any], note: str) -> Case:
        return Case(name, run, note)

    return [
        case("numpy_loop", lambda: numpy_loop(stack, weights), "acc += w*x, float64 acc"),
        case(
            "numpy_loop_f64",
            lambda: numpy_loop_f64(stack, weights),
            "acc += multiply(x, w, dtype=f64)",
        ),
        case("numpy_average", lambda: numpy_average(stack, w64), "np.average(stack, w, axis=0)"),
        case("numpy_tensordot", lambda: numpy_tensordot(stack, w64), "tensordot, f64 weights"),
        case(
            "numpy_tensordot_f32",
            lambda: numpy_tensordot(stack, w32),
            "tensordot, f32 weights: float32 accumulation, not a limit candidate",
        ),
        case(
            "weighted_sum",
            lambda: weighted_sum_alone(workload, records),
            "WeightedSum.add x nodes + mean, no messaging",
        ),
        case("grid_only", lambda: grid_only(workload, app), "SimulationGrid messages, no sum"),
        case("round", lambda: run_round(workload, app), "run_simulation, handler copy=False"),
        case(
            "round_copy",
            lambda: run_round(workload, app_copy),
            "run_simulation, handler copy=True",
        ),
    ]


# -- checking the results ------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Check:
    """How far ``got`` is from ``expected``, and whether that is within float32 tolerance.

    Within tolerance means ``|got - expected| <= atol + rtol * |expected|`` element-wise
    with ``rtol = 2 * eps32`` and ``atol = eps32 * max|expected|``: the result agrees
    with the reference to float32 precision.
    """

    max_abs_diff: float
    max_rel_diff: float  # relative to max|expected|
    ok: bool

    def to_json(self) -> dict[str, Any]:
        return {"max_abs_diff": self.max_abs_diff, "max_rel_diff": self.max_rel_diff, "ok": self.ok}


def compare(got: Vector, expected: Vector) -> Check:
    got64 = np.asarray(got, dtype=np.float64)
    exp64 = np.asarray(expected, dtype=np.float64)
    if got64.shape != exp64.shape:
        return Check(max_abs_diff=np.inf, max_rel_diff=np.inf, ok=False)
    scale = float(np.max(np.abs(exp64))) if exp64.size else 0.0
    diff = np.abs(got64 - exp64)
    max_diff = float(np.max(diff)) if diff.size else 0.0
    ok = bool(np.all(diff <= FLOAT32_EPS * scale + 2 * FLOAT32_EPS * np.abs(exp64)))
    return Check(max_abs_diff=max_diff, max_rel_diff=max_diff / scale if scale else max_diff, ok=ok)


def checksum(values: Vector) -> dict[str, float]:
    """Sum and sum of squares in float64: enough to tell two results apart in a test."""
    v = np.asarray(values, dtype=np.float64)
    return {"sum": float(v.sum()), "sum_sq": float(np.dot(v, v))}


# -- main ----------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="One FedAvg round through run_simulation against a numpy weighted average.",
    )
    parser.add_argument("--nodes", type=positive_int, default=100, help="nodes (default 100)")
    parser.add_argument(
        "--params", type=positive_int, default=1_000_000, help="float32 parameters per update"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for the updates and the run")
    parser.add_argument(
        "--profile",
        metavar="CASE",
        choices=CASE_NAMES,
        help="also run CASE once under cProfile (the calling thread only) and print the top "
        f"functions on stderr; one of: {', '.join(CASE_NAMES)}",
    )
    add_common_arguments(parser, repeats=5)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    progress = None if args.quiet else sys.stderr
    workload = make_workload(args.nodes, args.params, args.seed)
    cases = make_cases(workload)
    assert tuple(c.name for c in cases) == CASE_NAMES

    results = run_cases(cases, args.repeats, settle=args.settle, progress=progress)

    limit = min((results[name] for name in LIMIT_CANDIDATES), key=lambda m: m.median)
    checks = {
        name: compare(m.result, limit.result)
        for name, m in results.items()
        if name != "grid_only" and m.result is not None
    }
    # The core must reproduce the limit, and the float64 numpy ways must agree with each other.
    must_pass = (*CORE_CASES, *LIMIT_CANDIDATES)
    failed = sorted(name for name in must_pass if not checks[name].ok)

    if args.profile is not None:
        case = next(c for c in cases if c.name == args.profile)
        print(f"cProfile of one run of {case.name}:", file=sys.stderr)
        print(profile_call(case.run), file=sys.stderr)

    mismatch = f"{', '.join(failed)} do(es) not match {limit.name} within float32 tolerance"
    return finish(
        args,
        "core_round",
        {
            "config": {
                "nodes": workload.nodes,
                "params": workload.params,
                "dtype": "float32",
                "repeats": args.repeats,
                "settle_s": args.settle,
                "seed": args.seed,
                "total_weight": workload.total_weight,
            },
            "limit": limit.name,
            "limit_candidates": list(LIMIT_CANDIDATES),
            "memory_metric": MEMORY_METRIC,
            "results": {name: m.to_json(limit) for name, m in results.items()},
            "ratios": {name: ratio(results[name], limit) for name in CORE_CASES},
            "same_arithmetic": SAME_ARITHMETIC,
            "ratios_same_arithmetic": {
                name: ratio(results[name], results[SAME_ARITHMETIC]) for name in CORE_CASES
            },
            "verification": {
                "reference": limit.name,
                "tolerance": "|got - ref| <= eps32 * max|ref| + 2 * eps32 * |ref|",
                "ok": not failed,
                "failed": failed,
                "checks": {name: check.to_json() for name, check in checks.items()},
                "checksums": {
                    "round": checksum(results["round"].result),
                    "round_copy": checksum(results["round_copy"].result),
                    "limit": checksum(limit.result),
                },
            },
        },
        lambda: report(workload, args.repeats, results, limit, checks, failed),
        [mismatch] if failed else [],
    )


def report(
    workload: Workload,
    repeats: int,
    results: dict[str, Measurement],
    limit: Measurement,
    checks: dict[str, Check],
    failed: Sequence[str],
) -> str:
    lines = [
        f"core_round: {workload.nodes} nodes x {workload.params:,} float32 params, "
        f"medians of {repeats} run(s)",
        "",
        measurement_table(results.values(), baseline=limit.name, label="limit"),
        "",
        f"limit = {limit.name} (fastest of the float64-accumulating numpy ways: "
        f"{', '.join(LIMIT_CANDIDATES)})",
        f"vs {SAME_ARITHMETIC} (WeightedSum's own arithmetic: float64 products and sums): "
        + ", ".join(
            f"{name} {ratio(results[name], results[SAME_ARITHMETIC]):.2f}x" for name in CORE_CASES
        ),
        f"peak MB = {MEMORY_METRIC}",
        f"process RSS high-water mark: {max_rss_mb() or float('nan'):.0f} MB",
        "",
        "vs limit (float32 tolerance): "
        + ", ".join(
            f"{name} {'ok' if c.ok else 'MISMATCH'} ({c.max_rel_diff:.1e})"
            for name, c in checks.items()
        ),
    ]
    if failed:
        lines.append(f"FAILED: {', '.join(failed)}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
