"""``flowerpets demo --store PATH`` and ``flowerpets resume``: the demo's runs in a run store.

With ``--store`` every round the demo runs is committed to the run store at
``PATH`` (:mod:`flowerpets.store`) before the next one starts. The run's
configuration is the demo's own options (everything but ``--store``, ``--run``
and ``--json``), so ``flowerpets resume --store PATH [--run ID]`` rebuilds the
same apps from the store alone and continues after the last committed round.
The comparison run without PETs is a run of its own, ``<ID>/without-pets``,
resumed (or started) after the run with PETs.

A stored run is simulated on one worker thread: the seeds then fix the order
the replies are summed in too, so a resumed run ends bit for bit where the
uninterrupted one does (with more threads, float sums may differ in the last
place from one run to the next, resumed or not).

Central DP (the recommended composition's) keeps its budget in the store: every
round's spend is committed before the round's noised sum is released, and a
resumed run continues the stored ledger, so it reports the epsilon per round an
uninterrupted run does. Its model is not the uninterrupted run's bit for bit: the
noise comes from a secure source whose state is never stored (by design).
Refused before they start: local DP, whose budget each node keeps in its own
context, which the store does not hold (a resumed simulation rebuilds its nodes,
so each would count its epsilon from 0 again), and CKKS (the key lives only in the
nodes' contexts, which the simulation rebuilds, so a resumed run could not decrypt
its model; ``flowerpets server --store`` resumes one, its nodes outlive it). SecAgg+ keeps no
state across rounds: a round interrupted mid-protocol is abandoned and the
resumed run starts a new session.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from flowerpets._argtypes import one_line
from flowerpets.exceptions import MissingRunError, ParameterValueError, RunExistsError
from flowerpets.store import RunInfo, RunStore, RunWriter

__all__ = [
    "BASELINE_SUFFIX",
    "PROGRAM",
    "StoredRuns",
    "add_store_arguments",
    "check_storable",
    "demo_config",
    "open_runs",
    "resume",
]

PROGRAM = "flowerpets demo"
_FORMAT = 1  # of the stored configuration; a later format is refused, never misread
BASELINE_SUFFIX = "/without-pets"
# Attributes of the demo's namespace that are not the run's configuration.
_NOT_CONFIG = ("command", "store", "run", "json")
_NUMBERED = re.compile(r"demo-(\d+)")


def add_store_arguments(parser: argparse.ArgumentParser) -> None:
    """``--store PATH`` and ``--run ID`` (``flowerpets demo`` and ``python -m``)."""
    group = parser.add_argument_group("durable runs")
    group.add_argument(
        "--store",
        metavar="PATH",
        help="commit every round to the run store (an SQLite file) at PATH; after a crash, "
        "'flowerpets resume --store PATH' continues from the last committed round",
    )
    group.add_argument(
        "--run",
        metavar="ID",
        help="the run's id in the store (default: demo-N, the next free N; needs --store)",
    )


def demo_config(args: argparse.Namespace) -> dict[str, Any]:
    """The stored configuration of the demo run ``args`` describe (before ``resolve``)."""
    options = {k: v for k, v in sorted(vars(args).items()) if k not in _NOT_CONFIG}
    return {"program": PROGRAM, "format": _FORMAT, "options": options}


def _options(info: RunInfo) -> dict[str, Any]:
    """The demo options of a stored run; refused if another program stored it."""
    config = info.config
    if config.get("program") != PROGRAM or not isinstance(config.get("options"), dict):
        raise ParameterValueError(
            f"run {info.run_id!r} was not stored by {PROGRAM}: continue it from the "
            "program that started it"
        )
    if config.get("format") != _FORMAT:
        raise ParameterValueError(
            f"run {info.run_id!r} was stored in format {config.get('format')!r} of {PROGRAM}; "
            f"this version reads format {_FORMAT}"
        )
    return dict(config["options"])


def check_storable(args: argparse.Namespace) -> None:
    """Refuse (``ParameterValueError``) the PETs whose state the store does not keep."""
    if getattr(args, "run", None) is not None and getattr(args, "store", None) is None:
        raise ParameterValueError("--run names a run in a store: it needs --store")
    if getattr(args, "store", None) is None:
        return
    if getattr(args, "dp", None) == "local":
        raise ParameterValueError(
            "--store cannot keep local DP's privacy accounting: each node keeps its budget in "
            "its own context, which the store does not hold, so a resumed run would count "
            "every node's epsilon from 0 again; store a run with --dp central (the default "
            "composition) instead"
        )
    if getattr(args, "he", False):
        raise ParameterValueError(
            "--store cannot resume a --he run: its CKKS key lives only in the simulated nodes' "
            "contexts, which die with the demo's process (the store keeps the key's public "
            "side, never a key), so a resumed run could not decrypt its model; nodes that "
            "outlive their server can resume one (flowerpets server --store --run-id)"
        )


def _next_run_id(store: RunStore) -> str:
    taken = [int(m.group(1)) for r in store.runs() if (m := _NUMBERED.fullmatch(r.run_id))]
    return f"demo-{max(taken, default=0) + 1}"


@dataclass
class StoredRuns:
    """The writers of one stored demo run: with PETs, and (if any) the comparison without.

    ``resumed_after`` is the last round the run with PETs had committed when it
    was opened (0 for a new run).
    """

    path: Path
    run_id: str
    main: RunWriter
    baseline: RunWriter | None
    resumed_after: int

    def describe(self, rounds: int) -> str:
        where = f"run {self.run_id!r} in {self.path}"
        if self.resumed_after == 0:
            return f"storing {where} (flowerpets resume --store {self.path} continues it)"
        return f"resuming {where} after round {self.resumed_after} of {rounds}"


def _start_or_resume(
    store: RunStore, run_id: str, config: dict[str, Any], *, resume: bool
) -> RunWriter:
    if resume and any(info.run_id == run_id for info in store.runs()):
        return store.resume_run(run_id, config=config)
    return store.start_run(run_id, config=config)


@contextmanager
def open_runs(
    args: argparse.Namespace, *, with_baseline: bool, resume: bool
) -> Iterator[StoredRuns]:
    """The run store's writers for the demo run ``args`` describe, closed on exit.

    A new run (``resume=False``) must not exist yet
    (:class:`~flowerpets.exceptions.RunExistsError`); a resumed one must, with
    the same configuration. The comparison run is started if the first run
    never reached it.
    """
    path = Path(args.store)
    config = demo_config(args)
    with ExitStack() as stack:
        store = stack.enter_context(RunStore(path))
        run_id = args.run if args.run is not None else _next_run_id(store)
        if resume:
            main = stack.enter_context(store.resume_run(run_id, config=config))
        else:
            try:
                main = stack.enter_context(store.start_run(run_id, config=config))
            except RunExistsError:
                raise RunExistsError(
                    f"the store already holds run {run_id!r}: continue it with flowerpets "
                    f"resume --store {path} --run {run_id}, or give another --run"
                ) from None
        baseline = None
        if with_baseline:
            baseline_config = {**config, "part": "without-pets"}
            baseline = stack.enter_context(
                _start_or_resume(store, run_id + BASELINE_SUFFIX, baseline_config, resume=resume)
            )
        yield StoredRuns(path, run_id, main, baseline, main.last_round)


def _chosen_run(store: RunStore, path: Path, run_id: str | None) -> RunInfo:
    if run_id is not None:
        if run_id.endswith(BASELINE_SUFFIX):  # the comparison part: resume the whole run
            run_id = run_id[: -len(BASELINE_SUFFIX)]
        return store.run(run_id)
    demo_runs = [
        info
        for info in store.runs()
        if info.config.get("program") == PROGRAM and "part" not in info.config
    ]
    if not demo_runs:
        raise MissingRunError(f"the store at {path} holds no run of {PROGRAM}")
    return demo_runs[-1]


def resume(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """``flowerpets resume``: continue a stored demo run; returns an exit code as the demo's."""
    from flowerpets.exceptions import FlowerpetsError

    try:
        from flowerpets.examples.digits import demo  # the apps to rebuild: the examples extra
    except ImportError as exc:
        print(f"flowerpets resume: error: {one_line(exc)}", file=sys.stderr)
        return 2
    path = Path(args.store)
    try:
        if not path.is_file():
            raise MissingRunError(f"there is no run store at {path}")
        with RunStore(path) as store:
            info = _chosen_run(store, path, args.run)
            options = _options(info)
    except FlowerpetsError as exc:
        print(f"flowerpets resume: error: {one_line(exc)}", file=sys.stderr)
        return 2
    stored = argparse.Namespace(**options, store=str(path), run=info.run_id, json=args.json)
    return demo.run(stored, out, resume=True, prog="flowerpets resume")
