"""Benchmark: our rounds against Flower's own, through Flower's deployment runtime, in one run.

Three parts (``--parts``):

``round``
    One real deployment on 127.0.0.1 (``flower-superlink`` and ``--nodes``
    ``flower-supernode`` processes, default 4) and, on it, one round of each case
    of ``bench/flower_apps/fpbench`` under ``flwr run``, interleaved
    (repeat 1 of every case, then repeat 2, ...), after one untimed warm-up of
    each: our SecAgg+ against Flower's (``SecAggPlusWorkflow`` with its
    ``secaggplus_mod``) and our plain FedAvg round against Flower's, on
    ``--params`` parameters (default 100,000). The time is the round's, on the
    ServerApp's clock (first message out to aggregate in hand, every node
    already connected); the ``flwr run`` wall time (app upload, ServerApp
    process start, the round, its end) is reported beside it. Each aggregate is
    checked against the exact weighted mean within its quantization bound.
    Aims (issue 11): SecAgg+ within 3x of Flower's, the plain round within 1.5x.
``inprocess``
    For scale: the same two rounds of ours (same nodes, updates and weights)
    in our in-process simulation (``run_simulation``), where a message costs no
    process start and no polling: what the protocol itself costs.
``imports``
    What one message costs a node before any work: Flower's runtime starts a
    ``flwr-clientapp`` process per message, which imports the app. The median
    over ``--import-repeats`` fresh interpreters of loading each case's
    ClientApp, on top of the modules ``flwr-clientapp`` itself has loaded.

Where a round's time goes, under Flower's runtime (flwr 1.42), per message: the
SuperNode pulls from the SuperLink every 3 s while idle, its SuperExec polls for
tasks every 1 s and starts a fresh ``flwr-clientapp`` process (about 1.5 s of
imports on a small machine, all nodes' at once), which pushes its reply, seen by
the SuperNode on a 0.5 s poll. That is the same for ours and Flower's; Flower's
own server pulls replies every 3 s (``send_and_receive``), ours within 0.1 s. The
report shows our SecAgg+ round's seconds per stage beside the in-process round
and what our ClientApp adds to each process's imports.

Run from the repository root::

    PYTHONPATH=. python bench/flower.py [--repeats 3] [--parts round imports]
    PYTHONPATH=. python bench/flower.py --json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _common import (
    Case,
    Measurement,
    add_common_arguments,
    finish,
    format_seconds,
    format_table,
    positive_int,
    run_cases,
    update_app,
)

from flowerpets.flower.deployment import LocalDeployment

APPS = Path(__file__).resolve().parent / "flower_apps"
sys.path.insert(0, str(APPS))
from fpbench import CASES  # noqa: E402

PARTS = ("round", "inprocess", "imports")
PAIRS = {"secagg": ("ours_secagg", "flwr_secagg", 3.0), "plain": ("ours_plain", "flwr_plain", 1.5)}
INPROCESS_BOUND = 1e-6  # float32 model; SecAgg+'s own quantization bound is far below
# What a flwr-clientapp process has imported before it loads the app.
FLWR_CLIENTAPP = "import flwr.supernode.cli.flwr_clientapp"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--nodes", type=positive_int, default=4, help="SuperNodes (default 4)")
    parser.add_argument("--params", type=positive_int, default=100_000)
    parser.add_argument("--import-repeats", type=positive_int, default=7)
    parser.add_argument(
        "--run-timeout", type=positive_int, default=300, help="seconds one flwr run may take"
    )
    add_common_arguments(parser, repeats=3)
    return parser.parse_args(argv)


def _say(args: argparse.Namespace, line: str) -> None:
    if not args.quiet:
        print(line, file=sys.stderr, flush=True)


# -- part 1: rounds through a SuperLink ---------------------------------------------------------
def _app_for(case: str, into: Path) -> Path:
    """A copy of the bench app whose components are ``case``'s."""
    target = into / f"app-{case}"
    if not target.exists():
        shutil.copytree(APPS, target, ignore=shutil.ignore_patterns("__pycache__"))
        pyproject = target / "pyproject.toml"
        text = pyproject.read_text(encoding="utf-8")
        text = re.sub(r'serverapp = "[^"]*"', f'serverapp = "fpbench.{case}:server"', text)
        text = re.sub(r'clientapp = "[^"]*"', f'clientapp = "fpbench.{case}:client"', text)
        pyproject.write_text(text, encoding="utf-8")
    return target


def _one_run(
    args: argparse.Namespace, deployment: LocalDeployment, case: str, work: Path, label: str
) -> dict[str, Any]:
    result_file = work / f"result-{case}-{label}.json"
    config = {"nodes": args.nodes, "params": args.params, "result-file": str(result_file)}
    started = time.perf_counter()
    done = deployment.run(_app_for(case, work), run_config=config, timeout=args.run_timeout)
    wall = time.perf_counter() - started
    if not result_file.exists():
        raise RuntimeError(
            f"{case}: flwr run wrote no result (exit {done.returncode}):\n"
            f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    result: dict[str, Any] = json.loads(result_file.read_text(encoding="utf-8"))
    result["run_wall_s"] = wall
    _say(args, f"{case} {label}: round {result['seconds']:.2f} s, flwr run {wall:.2f} s")
    return result


def round_part(args: argparse.Namespace) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {case: [] for case in args.cases}
    with tempfile.TemporaryDirectory(prefix="fp-bench-flower-") as tmp:
        work = Path(tmp)
        runs_at_most = (args.repeats + 1) * len(args.cases)
        with LocalDeployment(
            args.nodes, home=work / "deployment", hard_limit=runs_at_most * args.run_timeout
        ) as deployment:
            _say(args, f"deployment up: {deployment.address}, {args.nodes} SuperNodes")
            for case in args.cases:
                _one_run(args, deployment, case, work, "warm-up")
            for repeat in range(1, args.repeats + 1):
                for case in args.cases:
                    time.sleep(args.settle)
                    runs[case].append(_one_run(args, deployment, case, work, f"{repeat}"))
    measurements = {
        case: Measurement(case, times=[r["seconds"] for r in results])
        for case, results in runs.items()
    }
    walls = {
        case: Measurement(f"{case} (flwr run)", times=[r["run_wall_s"] for r in results])
        for case, results in runs.items()
    }
    ratios: dict[str, Any] = {}
    for pair, (ours, theirs, aim) in PAIRS.items():
        if ours in measurements and theirs in measurements:
            ratio = measurements[ours].median / measurements[theirs].median
            ratios[pair] = {
                "ours": ours,
                "theirs": theirs,
                "ratio": ratio,
                "aim": aim,
                "met": ratio <= aim,
                "gap": max(0.0, ratio - aim),
                "run_wall_ratio": walls[ours].median / walls[theirs].median,
            }
    checks = {
        case: {
            "max_abs_error": max(r["max_abs_error"] for r in results),
            "error_bound": min(r["error_bound"] for r in results),
            "within_bound": all(r["within_bound"] for r in results),
            "full_participation": all(
                r.get("participants", args.nodes) == args.nodes for r in results
            ),
        }
        for case, results in runs.items()
    }
    stages: dict[str, dict[str, float]] = {}
    for case, results in runs.items():
        names = {name for r in results for name in r.get("stages_s", {})}
        if names:
            stages[case] = {
                name: statistics.median(r["stages_s"][name] for r in results)
                for name in sorted(names)
            }
    return {
        "nodes": args.nodes,
        "params": args.params,
        "results": {
            case: {**m.to_json(), "run_wall_median_s": walls[case].median, "runs": runs[case]}
            for case, m in measurements.items()
        },
        "ratios": ratios,
        "checks": checks,
        "stages_s": stages,
        "_measurements": measurements,
        "_walls": walls,
    }


# -- part 2: the same rounds of ours in process ---------------------------------------------------
def inprocess_part(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    from fpbench.common import expected_mean, node_update, node_weight

    from flowerpets.core import ArrayRecord, ClientMod, FedAvg, ServerApp, ServerMod
    from flowerpets.secagg import SecAggPlus, secaggplus_mod
    from flowerpets.simulation import run_simulation

    updates = [node_update(pid, args.params) for pid in range(args.nodes)]
    weights = [node_weight(pid) for pid in range(args.nodes)]
    initial = ArrayRecord.from_numpy({"w": np.zeros(args.params, np.float32)})

    def one_round(server_mods: list[ServerMod], client_mods: list[ClientMod]) -> Any:
        app = update_app(updates, weights, name="w", mods=client_mods)
        server = ServerApp(
            strategy=FedAvg(), num_rounds=1, initial_arrays=initial, mods=server_mods
        )
        return run_simulation(server, app, args.nodes, seed=0).arrays["w"].numpy()

    cases = [
        Case(
            "ours_secagg", lambda: one_round([SecAggPlus(max_weight=args.nodes)], [secaggplus_mod])
        ),
        Case("ours_plain", lambda: one_round([], [])),
    ]
    progress = None if args.quiet else sys.stderr
    results = run_cases(cases, args.repeats, memory=False, settle=args.settle, progress=progress)
    want = expected_mean(args.nodes, args.params)
    errors = {
        name: float(np.max(np.abs(m.result.astype(np.float64) - want)))
        for name, m in results.items()
    }
    return {
        "results": {
            name: {**m.to_json(), "max_abs_error": errors[name]} for name, m in results.items()
        },
        "_measurements": results,
    }


# -- part 3: what a node's process imports per message ------------------------------------------
_IMPORT_PROBE = """
import sys, time
{pre}
started = time.perf_counter()
import fpbench.{case}
fpbench.{case}.client
print(time.perf_counter() - started)
"""


def imports_part(args: argparse.Namespace) -> dict[str, Any]:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(APPS), root, env.get("PYTHONPATH")]))
    out: dict[str, Any] = {}
    for case in args.cases:
        code = _IMPORT_PROBE.format(pre=FLWR_CLIENTAPP, case=case)
        times = []
        for _ in range(args.import_repeats):
            done = subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
            )
            times.append(float(done.stdout.split()[-1]))
        out[case] = Measurement(f"{case}_client", times=times)
        _say(args, f"import {case}_client: {out[case].median * 1000:.1f} ms")
    # For scale: a whole fresh interpreter that imports what flwr-clientapp imports.
    process = Measurement("flwr-clientapp start")
    for _ in range(args.import_repeats):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", FLWR_CLIENTAPP], env=env, check=True)
        process.times.append(time.perf_counter() - started)
    _say(args, f"flwr-clientapp's own start: {process.median:.2f} s")
    return {
        "after": FLWR_CLIENTAPP,
        "results": {case: m.to_json() for case, m in out.items()},
        "flwr_clientapp_start": process.to_json(),
        "_measurements": out,
        "_process": process,
    }


# -- report -------------------------------------------------------------------------------------
def _public(part: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in part.items() if not k.startswith("_")}


def report(args: argparse.Namespace, parts: dict[str, Any]) -> str:
    lines = [f"flower: medians of {args.repeats} round(s) per case", ""]
    if "round" in parts:
        r = parts["round"]
        lines += [
            f"one round through a SuperLink and {r['nodes']} SuperNodes on 127.0.0.1, "
            f"{r['params']:,} params (the ServerApp's clock; flwr run's wall time beside it)",
            format_table(
                ("case", "round s", "flwr run s", "max error", "bound", "ok"),
                [
                    (
                        case,
                        format_seconds(m.median),
                        format_seconds(r["_walls"][case].median),
                        f"{r['checks'][case]['max_abs_error']:.2e}",
                        f"{r['checks'][case]['error_bound']:.2e}",
                        r["checks"][case]["within_bound"],
                    )
                    for case, m in r["_measurements"].items()
                ],
            ),
            "",
            format_table(
                ("pair", "ours / theirs", "aim", "met", "gap", "flwr run ratio"),
                [
                    (
                        pair,
                        f"{x['ratio']:.2f}x",
                        f"<= {x['aim']:.1f}x",
                        x["met"],
                        f"{x['gap']:.2f}x",
                        f"{x['run_wall_ratio']:.2f}x",
                    )
                    for pair, x in r["ratios"].items()
                ],
            ),
        ]
        for case, stages in r["stages_s"].items():
            lines += ["", f"{case}: seconds per stage (server side, medians)"]
            lines.append(format_table(("stage", "median s"), list(stages.items())))
        lines.append("")
    if "inprocess" in parts:
        m = parts["inprocess"]["_measurements"]
        lines += [
            "for scale, the same rounds of ours in our in-process simulation "
            "(no process starts, no polling):",
            format_table(
                ("case", "round s", "max error"),
                [
                    (
                        name,
                        format_seconds(x.median),
                        f"{parts['inprocess']['results'][name]['max_abs_error']:.2e}",
                    )
                    for name, x in m.items()
                ],
            ),
            "",
        ]
    if "imports" in parts:
        m = parts["imports"]["_measurements"]
        lines += [
            f"loading each case's ClientApp in a fresh process after `{FLWR_CLIENTAPP}` "
            f"(what a flwr-clientapp process pays per message), medians of {args.import_repeats}",
            format_table(
                ("client app", "import ms"),
                [(f"{case}_client", f"{x.median * 1000:.1f}") for case, x in m.items()],
            ),
            "for scale, a fresh interpreter importing what flwr-clientapp imports: "
            f"{parts['imports']['_process'].median * 1000:.0f} ms",
        ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    parts: dict[str, Any] = {}
    runners = {"imports": imports_part, "inprocess": inprocess_part, "round": round_part}
    for name in args.parts:
        parts[name] = runners[name](args)
    failed = []
    for case, check in parts.get("round", {}).get("checks", {}).items():
        if not check["within_bound"]:
            failed.append(f"{case}: the aggregate is outside its quantization bound")
        if not check["full_participation"]:
            failed.append(f"{case}: a node did not take part")
    for name, result in parts.get("inprocess", {}).get("results", {}).items():
        if not result["max_abs_error"] <= INPROCESS_BOUND:
            failed.append(f"in-process {name}: the aggregate is off the exact mean")
    payload = {
        "config": {k: v for k, v in vars(args).items() if k not in ("json", "quiet")},
        **{name: _public(part) for name, part in parts.items()},
        "ok": not failed,
        "failed": failed,
    }
    return finish(args, "flower", payload, lambda: report(args, parts), failed)


if __name__ == "__main__":
    sys.exit(main())
