"""``flowerpets demo``: federated learning on scikit-learn's handwritten digits.

Twenty simulated clients (by default) each hold a slice of the 1,797 8x8
digit images, split IID or label-skewed (Dirichlet), train a numpy model
locally, and the server averages their models for ten rounds of FedAvg.

Which PETs run is ``--pets``:

* ``recommended`` (what ``flowerpets demo`` runs with no PET flag): the
  composition a careful deployment would run, SecAgg+ secure aggregation with
  central DP calibrated to epsilon :data:`RECOMMENDED_EPSILON` for the whole
  run, on clients Poisson-sampled at rate :data:`RECOMMENDED_SAMPLE_RATE`. The
  demo prints what the server sees of one round (a masked vector against the
  sum it unmasks) and the epsilon spent after every round. The DP and SecAgg+
  options tune it (``--target-epsilon 4``, ``--clip 0.5``, ``--sample-rate``,
  ``--secagg-dropout-rate``, ...);
* ``none``: plain FedAvg only;
* without ``--pets``, ``--secagg``, ``--dp`` and ``--he`` choose the PETs one by
  one (they cannot be combined with ``--pets``).

Whenever a PET runs, the same run without PETs (same clients, sampling and
seed) follows, and the demo ends with both accuracies. Library callers of
:func:`add_arguments` get ``none`` unless they ask for ``recommended``.

Flags that do not go together, or that the chosen PETs would ignore, are
refused before the run with a one-line error and exit status 2; a run in which
every round failed exits with status 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, TextIO

import numpy as np
from numpy.typing import NDArray

from flowerpets._argtypes import OneLineParser, checked, integer, number, one_line
from flowerpets._validation import one_of
from flowerpets.core import (
    ClientApp,
    FixedSizeSampling,
    PoissonSampling,
    RoundRecord,
    RunJournal,
    ServerApp,
)
from flowerpets.core.sampling import CohortSampling
from flowerpets.examples.digits.apps import (
    DigitsTask,
    TrainSettings,
    make_client_app,
    make_server_app,
)
from flowerpets.examples.digits.data import (
    DigitsData,
    load_digits_split,
    partition_dirichlet,
    partition_iid,
)
from flowerpets.examples.digits.features import Composition, compose
from flowerpets.examples.digits.model import MODELS
from flowerpets.examples.digits.pets import FEATURES
from flowerpets.examples.digits.pets.dp import DELTA
from flowerpets.examples.digits.server_view import ServerView
from flowerpets.examples.digits.stored import add_store_arguments, check_storable, open_runs
from flowerpets.exceptions import FlowerpetsError, ParameterValueError
from flowerpets.secagg import SecAggPlus, secaggplus_mod
from flowerpets.simulation import run_simulation
from flowerpets.simulation.run import SimulationResult

__all__ = [
    "DESCRIPTION",
    "NONE",
    "RECOMMENDED",
    "RECOMMENDED_EPSILON",
    "RECOMMENDED_SAMPLE_RATE",
    "DemoApps",
    "ProgressBar",
    "add_arguments",
    "build_apps",
    "format_table",
    "main",
    "resolve",
    "run",
    "test_metric",
]

#: What ``--help`` says the demo is (plain text: argparse shows it as it is).
DESCRIPTION = (
    "Federated learning on scikit-learn's handwritten digits. With no PET flag it runs the "
    "recommended composition: SecAgg+ secure aggregation with central differential privacy "
    "at a target epsilon, on Poisson-sampled clients, then the same run without PETs to "
    "compare. --pets none runs plain FedAvg only; --secagg, --dp and --he choose PETs one "
    "by one instead."
)

RECOMMENDED, NONE = "recommended", "none"
CUSTOM = "custom"  # --secagg, --dp or --he, without --pets
#: The recommended composition's privacy target for the whole run (at the default delta).
RECOMMENDED_EPSILON = 8.0
#: ... and its Poisson sampling rate, when neither --cohort-size nor --sample-rate is given.
RECOMMENDED_SAMPLE_RATE = 0.5

# Flag -> attribute of the switches that turn a PET on.
_PET_FLAGS = {"--secagg": "secagg", "--dp": "dp", "--he": "he"}

Partitioner = Callable[[DigitsData, int, float, np.random.Generator], list[NDArray[np.int64]]]

PARTITIONERS: dict[str, Partitioner] = {
    "iid": lambda data, n, alpha, rng: partition_iid(len(data.y_train), n, rng),
    "dirichlet": lambda data, n, alpha, rng: partition_dirichlet(
        data.y_train, n, alpha=alpha, rng=rng
    ),
}


_positive_int = checked(
    integer, lambda v: v >= 1, "must be >= 1, got {value}", name="_positive_int"
)
_positive_float = checked(
    number, lambda v: math.isfinite(v) and v > 0, "must be finite and > 0, got {text}"
)
_rate = checked(number, lambda v: 0 < v <= 1, "must be in (0, 1], got {text}")


def add_arguments(parser: argparse.ArgumentParser, *, default_pets: str = NONE) -> None:
    """The demo's options (shared by ``flowerpets demo``, ``python -m`` and the deploy apps).

    ``default_pets`` is the composition when the command line names no PET:
    ``flowerpets demo`` passes :data:`RECOMMENDED`; the default, :data:`NONE`,
    keeps a library caller's run plain unless its flags say otherwise.
    """
    one_of("default_pets", default_pets, (RECOMMENDED, NONE))
    parser.set_defaults(default_pets=default_pets)
    parser.add_argument("--clients", type=_positive_int, default=20, help="number of nodes")
    parser.add_argument("--rounds", type=_positive_int, default=10, help="rounds of FedAvg")
    parser.add_argument(
        "--partition",
        choices=sorted(PARTITIONERS),
        default="iid",
        help="how the training set is split across nodes",
    )
    parser.add_argument(
        "--alpha",
        type=_positive_float,
        default=0.5,
        help="Dirichlet concentration for --partition dirichlet (smaller is more skewed)",
    )
    parser.add_argument("--model", choices=sorted(MODELS), default="softmax")
    defaults = TrainSettings()
    parser.add_argument(
        "--epochs", type=_positive_int, default=defaults.epochs, help="local epochs per round"
    )
    parser.add_argument("--batch-size", type=_positive_int, default=defaults.batch_size)
    parser.add_argument(
        "--lr", type=_positive_float, default=defaults.learning_rate, help="local learning rate"
    )
    cohort = parser.add_mutually_exclusive_group()
    cohort.add_argument(
        "--cohort-size",
        type=_positive_int,
        help="sample this many nodes per round (default: all, or Poisson sampling under "
        "--pets recommended)",
    )
    cohort.add_argument(
        "--sample-rate",
        type=_rate,
        help="Poisson-sample each node with this probability per round (--pets recommended: "
        f"{RECOMMENDED_SAMPLE_RATE:g} unless --cohort-size is given)",
    )
    parser.add_argument(
        "--federated-evaluation",
        action="store_true",
        help="also evaluate on the nodes' test slices (on by itself when the server "
        "cannot read the model)",
    )
    parser.add_argument("--seed", type=integer, default=0, help="seed for a reproducible run")
    parser.add_argument("--json", action="store_true", help="print the history as JSON")
    parser.add_argument(
        "--pets",
        choices=[RECOMMENDED, NONE],
        default=None,
        help=f"{RECOMMENDED}: SecAgg+ with central DP at epsilon {RECOMMENDED_EPSILON:g} "
        "on Poisson-sampled clients, then a plain run to compare (the DP and SecAgg+ options "
        "below tune it: --target-epsilon, --clip, --sample-rate, ...); none: plain FedAvg "
        "only. Without --pets: "
        f"{default_pets}, unless --secagg, --dp or --he choose the PETs one by one (they "
        "cannot be combined with --pets)",
    )
    for feature in FEATURES:
        feature.add_arguments(parser)


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with ``--pets`` applied and the demo's own flags checked (``ValueError``).

    The result's ``composition`` is :data:`RECOMMENDED`, :data:`NONE` or
    ``"custom"`` (PETs chosen one by one). Resolving twice changes nothing.
    """
    if getattr(args, "composition", None) is not None:
        return args
    resolved = argparse.Namespace(**vars(args))
    chosen = [flag for flag, name in _PET_FLAGS.items() if getattr(args, name, None)]
    pets = getattr(args, "pets", None)
    if pets is not None and chosen:
        raise ParameterValueError(
            f"--pets {pets} is a whole composition, and {', '.join(chosen)} pick PETs one by "
            "one: give one or the other"
        )
    if pets is None:
        pets = CUSTOM if chosen else getattr(args, "default_pets", NONE)
    if getattr(resolved, "dp", None) == "distributed" and not getattr(resolved, "he", False):
        resolved.secagg = True  # distributed DP's noise shares are summed by SecAgg+
    if pets == RECOMMENDED:
        resolved.secagg, resolved.dp = True, "central"
        if getattr(args, "noise_multiplier", None) is None and (
            getattr(args, "target_epsilon", None) is None
        ):
            resolved.target_epsilon = RECOMMENDED_EPSILON
        if args.cohort_size is None and args.sample_rate is None:
            resolved.sample_rate = RECOMMENDED_SAMPLE_RATE
    resolved.composition = pets
    if args.cohort_size is not None and args.cohort_size > args.clients:
        raise ParameterValueError(
            f"--cohort-size {args.cohort_size} exceeds the number of clients "
            f"(--clients {args.clients})"
        )
    return resolved


def _sampling(args: argparse.Namespace) -> CohortSampling | None:
    if args.cohort_size is not None:
        return FixedSizeSampling(args.cohort_size)
    if args.sample_rate is not None:
        return PoissonSampling(args.sample_rate)
    return None


def test_metric(record: RoundRecord, name: str) -> float:
    """The server's test metric, or the nodes' (federated) one when the server has none.

    Under homomorphic encryption the server cannot read the model, so only the
    nodes can evaluate it.
    """
    for source in (record.server_metrics, record.evaluate_metrics):
        if name in source:
            return source[name]
    return math.nan


def _epsilon(record: RoundRecord) -> float:
    """The privacy spent so far: central DP's epsilon, or local DP's (per node, composed)."""
    for name in ("epsilon", "dp-local-epsilon"):
        if name in record.train_metrics:
            return record.train_metrics[name]
    return math.nan


class ProgressBar:
    """A one-line progress bar on a terminal stream, redrawn after each round."""

    def __init__(
        self, total: int, stream: TextIO = sys.stderr, width: int = 30, label: str = ""
    ) -> None:
        self.total, self.stream, self.width, self.label = total, stream, width, label
        self.started = time.perf_counter()
        self.drawn = 0

    def __call__(self, record: RoundRecord) -> None:
        done = self.drawn = record.round
        filled = self.width * done // self.total
        bar = "#" * filled + "." * (self.width - filled)
        elapsed = time.perf_counter() - self.started
        acc = test_metric(record, "accuracy")
        status = "failed" if record.error else f"accuracy {acc:.3f}"
        epsilon = _epsilon(record)
        if math.isfinite(epsilon):
            status += f"  epsilon {epsilon:.3g}"
        self.stream.write(
            f"\r{self.label}[{bar}] round {done}/{self.total}  {status}  {elapsed:5.1f}s  "
        )
        if done == self.total:
            self.stream.write("\n")
        self.stream.flush()

    def close(self) -> None:
        """End the bar's line when the run ended early (a budget stop)."""
        if 0 < self.drawn < self.total:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = self.total


def _cell(value: float, width: int, spec: str) -> str:
    return f"{value:>{width}{spec}}" if math.isfinite(value) else f"{'-':>{width}}"


def format_table(records: Sequence[RoundRecord]) -> str:
    """A per-round table of the test loss and accuracy, and what else the run reported.

    The training loss appears when the nodes reported it (DP withholds it, it
    is not private), and an ``epsilon`` column when a DP mod reported the
    privacy spent (``epsilon/node`` for local DP: each node's own, composed
    over its rounds). A value that was not measured is ``-``.
    """
    with_loss = any("train-loss" in r.train_metrics for r in records)
    central = any("epsilon" in r.train_metrics for r in records)
    local = not central and any("dp-local-epsilon" in r.train_metrics for r in records)
    eps_name = "epsilon" if central else "epsilon/node"
    header = f"{'round':>5}  {'nodes':>5}  {'failed':>6}"
    if with_loss:
        header += f"  {'train loss':>10}"
    header += f"  {'test loss':>9}  {'accuracy':>8}  {'seconds':>7}"
    if central or local:
        header += f"  {eps_name:>12}"
    lines = [header]
    for r in records:
        line = f"{r.round:>5}  {len(r.participants):>5}  {len(r.failures):>6}"
        if with_loss:
            line += "  " + _cell(r.train_metrics.get("train-loss", math.nan), 10, ".4f")
        line += "  " + _cell(test_metric(r, "loss"), 9, ".4f")
        line += "  " + _cell(test_metric(r, "accuracy"), 8, ".4f")
        line += f"  {r.seconds:>7.2f}"
        if central or local:
            line += "  " + _cell(_epsilon(r), 12, ".3f")
        lines.append(line)
    return "\n".join(lines)


MAX_NOTES = 5  # rounds with failures listed under the table


def failure_notes(
    records: Sequence[RoundRecord],
    node_index: Callable[[int], int] | None = None,
    stopped: str | None = None,
) -> list[str]:
    """One line per round that failed or lost nodes: how many, and the first reason.

    ``stopped`` is why a mod ended the run (the record of the round it
    refused carries it as its error).
    """

    def name(node: int) -> str:
        try:
            return f"node {node_index(node)}" if node_index is not None else f"node {node}"
        except KeyError:
            return f"node {node}"

    notes = []
    for r in records:
        if not r.error and not r.failures:
            continue
        if r.error and r.error == stopped:
            parts = [f"not run, the run stopped: {one_line(r.error)}"]
        elif r.error:
            parts = [f"failed, the model is unchanged: {one_line(r.error)}"]
        else:
            parts = []
        if r.failures:
            node, failure = next(iter(r.failures.items()))
            parts.append(f"{len(r.failures)} node(s) failed, the first: {name(node)} at {failure}")
        notes.append(f"round {r.round}: " + "; ".join(parts))
    if len(notes) > MAX_NOTES:
        notes = [*notes[:MAX_NOTES], f"... and {len(notes) - MAX_NOTES} more (--json lists all)"]
    return notes


@dataclass(frozen=True)
class DemoApps:
    """What the demo's options build: the task and the two apps, PET mods included."""

    task: DigitsTask
    client_app: ClientApp
    server_app: ServerApp
    pets: Composition


def build_apps(
    args: argparse.Namespace,
    *,
    with_pets: bool = True,
    view: ServerView | None = None,
    store: RunJournal | None = None,
) -> DemoApps:
    """The task and apps that ``args`` describe; ``ValueError`` for flags that clash.

    The simulation (:func:`run`) and the gRPC deployment
    (:mod:`flowerpets.examples.digits.deploy`) both build their apps here, so
    the same options compute the same thing in both. ``with_pets=False``
    builds the same run without any PET (the demo's comparison); ``view``
    records what the server sees of a SecAgg+ round; ``store`` is where the
    server app commits each round (and resumes from).
    """
    args = resolve(args)
    data = load_digits_split(seed=args.seed)
    rng = np.random.default_rng(args.seed)
    partitions = PARTITIONERS[args.partition](data, args.clients, args.alpha, rng)
    task = DigitsTask.create(data, partitions, MODELS[args.model](), seed=args.seed)
    settings = TrainSettings(epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr)
    pets = compose(FEATURES if with_pets else [], args, task)
    client_mods, server_mods = list(pets.client), list(pets.server)
    if view is not None and secaggplus_mod in client_mods:
        at = client_mods.index(secaggplus_mod)
        client_mods[at : at + 1] = [view.outside, secaggplus_mod, view.inside]
        at = next(i for i, mod in enumerate(server_mods) if isinstance(mod, SecAggPlus))
        server_mods[at:at] = [view.unmasked]
        server_mods.insert(0, view.released)
    client_app = make_client_app(task, settings, mods=client_mods)
    sealed = pets.needs_federated_evaluation  # the server cannot read the model
    server_app = make_server_app(
        task,
        num_rounds=args.rounds,
        sampling=_sampling(args),
        federated_evaluation=args.federated_evaluation or sealed,
        central_evaluation=not sealed,
        mods=server_mods,
        seed=args.seed,
        store=store,
    )
    return DemoApps(task=task, client_app=client_app, server_app=server_app, pets=pets)


def _error(exc: BaseException, prog: str = "flowerpets demo") -> int:
    print(f"{prog}: error: {one_line(exc)}", file=sys.stderr)
    return 2


class _Collect(logging.Handler):
    """Keeps the library's log messages of a run, to print them once, after the table."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(one_line(record.getMessage()))


@contextmanager
def _library_logs() -> Iterator[_Collect]:
    logger = logging.getLogger("flowerpets")
    handler, propagate = _Collect(), logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def _log_notes(messages: Sequence[str], shown: Sequence[str], limit: int = 3) -> list[str]:
    """The library's distinct messages that say something the failure notes do not."""
    errors = [text for text in shown if text]
    fresh = [m for m in dict.fromkeys(messages) if not any(e in m for e in errors)]
    notes = [f"warning: {m}" for m in fresh[:limit]]
    if len(fresh) > limit:
        notes.append(f"... and {len(fresh) - limit} more warning(s)")
    return notes


def _final(
    history: Sequence[RoundRecord],
) -> tuple[float, int | None]:
    """The last measured accuracy and its round (NaN, None when no round measured one)."""
    for record in reversed(history):
        accuracy = test_metric(record, "accuracy")
        if math.isfinite(accuracy):
            return accuracy, record.round
    return math.nan, None


def _pets_phrase(args: argparse.Namespace, records: Sequence[RoundRecord]) -> str:
    names = [
        label
        for label, on in (
            ("SecAgg+", getattr(args, "secagg", False)),
            (f"{getattr(args, 'dp', None)} DP", getattr(args, "dp", None)),
            ("CKKS", getattr(args, "he", False)),
        )
        if on
    ]
    phrase = " and ".join(names)
    epsilon = _epsilon(records[-1]) if records else math.nan
    if not math.isfinite(epsilon):
        for record in reversed(records):
            epsilon = _epsilon(record)
            if math.isfinite(epsilon):
                break
    if math.isfinite(epsilon):
        delta = next(
            (r.train_metrics["delta"] for r in reversed(records) if "delta" in r.train_metrics),
            getattr(args, "delta", None) or DELTA,
        )
        per = " per node" if getattr(args, "dp", None) == "local" else ""
        phrase += f", epsilon {epsilon:.3g}{per} at delta {delta:g}"
    return phrase


def _header(args: argparse.Namespace, apps: DemoApps) -> str:
    data = apps.task.data
    sizes = [len(p) for p in apps.task.partitions]
    if args.cohort_size is not None:
        sampling = f", {args.cohort_size} sampled per round"
    elif args.sample_rate is not None:
        sampling = f", Poisson-sampled at rate {args.sample_rate:g} per round"
    else:
        sampling = ""
    lines = [
        f"digits: {len(data.y_train)} training and {len(data.y_test)} test images, "
        f"{args.clients} clients ({args.partition}, {min(sizes)}-{max(sizes)} images each"
        f"{sampling}), model {args.model}, {args.rounds} rounds of FedAvg"
    ]
    if args.composition == RECOMMENDED:
        lines.append("the recommended composition (--pets none: plain FedAvg only):")
    lines += [f"  with {summary}" for summary in apps.pets.summaries]
    return "\n".join(lines)


def _simulate(apps: DemoApps, args: argparse.Namespace, label: str = "") -> SimulationResult:
    progress = None if args.json else ProgressBar(args.rounds, label=label)
    # A stored run sums the replies in one order (one worker thread), so that a resumed
    # run ends bit for bit where the uninterrupted one does.
    workers = None if apps.server_app.store is None else 1
    try:
        return run_simulation(
            apps.server_app,
            apps.client_app,
            args.clients,
            seed=args.seed,
            on_round=progress,
            max_workers=workers,
        )
    finally:
        if progress is not None:
            progress.close()


def run(
    args: argparse.Namespace,
    out: TextIO | None = None,
    *,
    resume: bool = False,
    prog: str = "flowerpets demo",
) -> int:
    """Run the demo as ``args`` say, printing to ``out`` (stdout); returns an exit code.

    0: the run trained; 1: every round failed; 2: flags that do not go
    together, or a run store that refuses the run (one line on stderr, as
    ``prog: error: ...``). With ``args.store`` every round is committed to
    the run store there (:mod:`flowerpets.examples.digits.stored`);
    ``resume`` continues the stored run ``args.run`` instead of starting one.
    """
    out = sys.stdout if out is None else out
    view = ServerView()
    # What the library logs while the apps are built (the header says it better) and run
    # is collected and printed once, after the table.
    with _library_logs() as logs, ExitStack() as stores:
        try:
            args = resolve(args)
            check_storable(args)
            runs = None
            if getattr(args, "store", None) is not None:
                with_baseline = args.composition != NONE
                runs = stores.enter_context(
                    open_runs(args, with_baseline=with_baseline, resume=resume)
                )
            apps = build_apps(args, view=view, store=None if runs is None else runs.main)
            baseline = (
                build_apps(args, with_pets=False, store=None if runs is None else runs.baseline)
                if args.composition != NONE
                else None
            )
        # Configuration refuses bad flags with our typed errors or ValueError / TypeError;
        # the store refuses a missing, locked or damaged run with a StoreError.
        except (FlowerpetsError, ValueError, TypeError) as exc:
            return _error(exc, prog)
        if not args.json:
            print(_header(args, apps), file=out, flush=True)
            if runs is not None:
                print(runs.describe(args.rounds), file=out, flush=True)
        try:
            result = _simulate(apps, args)
            records = result.history.rounds
            trained = not all(r.error for r in records)
            plain = None
            if baseline is not None and trained:  # nothing to compare with an untrained run
                plain = _simulate(baseline, args, label="without PETs ")
        except FlowerpetsError as exc:  # a combination that only the run itself refuses
            return _error(exc, prog)
    snapshot = view.snapshot()
    if args.json:
        payload: dict[str, Any] = {
            "history": result.history.to_dicts(),
            "stopped": result.stopped,
            "baseline": None if plain is None else {"history": plain.history.to_dicts()},
            "server_view": None if snapshot is None else _view_dict(snapshot),
            "stored": None
            if runs is None
            else {"store": str(runs.path), "run": runs.run_id, "resumed_after": runs.resumed_after},
        }
        json.dump(payload, out)
        out.write("\n")
    else:
        if snapshot is not None:
            noise = next(
                (r.train_metrics.get("dp-noise-std") for r in records if r.round == snapshot.round),
                None,
            )
            print("\n".join(snapshot.lines(noise)), file=out)
        print(format_table(records), file=out)
        notes = failure_notes(records, result.node_index, result.stopped)
        for note in notes + _log_notes(logs.messages, [r.error or "" for r in records]):
            print(note, file=out)
        print(_final_line(args, records, plain) if trained else _untrained(records), file=out)
    if result.stopped and args.json:  # the table's notes say it otherwise
        print(f"run stopped early: {one_line(result.stopped)}", file=sys.stderr)
    if not trained:
        print(
            f"{prog}: every round failed, the model was never trained "
            f"(round 1: {one_line(records[0].error) if records else 'no round ran'})",
            file=sys.stderr,
        )
        return 1
    return 0


def _untrained(records: Sequence[RoundRecord]) -> str:
    accuracy, _ = _final(records)
    initial = f"{accuracy:.4f}, " if math.isfinite(accuracy) else ""
    return f"final test accuracy: {initial}the initial model's: every round failed"


def _final_line(
    args: argparse.Namespace, records: Sequence[RoundRecord], plain: SimulationResult | None
) -> str:
    accuracy, at = _final(records)
    if at is None:
        return "final test accuracy: not measured (no round was evaluated)"
    text = f"final test accuracy: {accuracy:.4f}"
    if at != records[-1].round:
        text += f" (round {at}, the last evaluated)"
    if plain is not None:
        text += f" with {_pets_phrase(args, records)}"
        plain_accuracy, _ = _final(plain.history.rounds)
        text += f"; {plain_accuracy:.4f} without PETs (same clients, sampling and seed)"
    return text


def _view_dict(snapshot: Any) -> dict[str, Any]:
    return {
        "round": snapshot.round,
        "node": snapshot.node,
        "cohort": snapshot.cohort,
        "reply": snapshot.reply.tolist(),
        "masked": snapshot.masked.tolist(),
        "mean": snapshot.mean.tolist(),
        "released": None if snapshot.released is None else snapshot.released.tolist(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m flowerpets.examples.digits.demo``: the same as ``flowerpets demo``."""
    parser = OneLineParser(prog="flowerpets demo", description=DESCRIPTION)
    add_arguments(parser, default_pets=RECOMMENDED)
    add_store_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
