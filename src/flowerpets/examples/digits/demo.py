"""``flowerpets demo``: federated learning on scikit-learn's handwritten digits.

Twenty simulated clients (by default) each hold a slice of the 1,797 8x8
digit images, split IID or label-skewed (Dirichlet), train a numpy model
locally, and the server averages their models for ten rounds of FedAvg.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TextIO

import numpy as np
from numpy.typing import NDArray

from flowerpets._argtypes import checked
from flowerpets.core import ClientApp, FixedSizeSampling, PoissonSampling, RoundRecord, ServerApp
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
from flowerpets.simulation import run_simulation

__all__ = [
    "DemoApps",
    "ProgressBar",
    "add_arguments",
    "build_apps",
    "format_table",
    "main",
    "run",
    "test_metric",
]

Partitioner = Callable[[DigitsData, int, float, np.random.Generator], list[NDArray[np.int64]]]

PARTITIONERS: dict[str, Partitioner] = {
    "iid": lambda data, n, alpha, rng: partition_iid(len(data.y_train), n, rng),
    "dirichlet": lambda data, n, alpha, rng: partition_dirichlet(
        data.y_train, n, alpha=alpha, rng=rng
    ),
}


# Text that is no number is argparse's own "invalid _positive_int value: 'x'".
_positive_int = checked(int, lambda v: v >= 1, "must be >= 1, got {value}", name="_positive_int")
_positive_float = checked(
    float, lambda v: v > 0, "must be > 0, got {value}", name="_positive_float"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's options (shared by ``flowerpets demo`` and ``python -m``)."""
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
        "--cohort-size", type=_positive_int, help="sample this many nodes per round (default: all)"
    )
    cohort.add_argument(
        "--sample-rate",
        type=_positive_float,
        help="Poisson-sample each node with this probability per round",
    )
    parser.add_argument(
        "--federated-evaluation",
        action="store_true",
        help="also evaluate on the nodes' test slices (on by itself when the server "
        "cannot read the model)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for a reproducible run")
    parser.add_argument("--json", action="store_true", help="print the history as JSON")
    for feature in FEATURES:
        feature.add_arguments(parser)


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


class ProgressBar:
    """A one-line progress bar on a terminal stream, redrawn after each round."""

    def __init__(self, total: int, stream: TextIO = sys.stderr, width: int = 30) -> None:
        self.total, self.stream, self.width = total, stream, width
        self.started = time.perf_counter()

    def __call__(self, record: RoundRecord) -> None:
        done = record.round
        filled = self.width * done // self.total
        acc = test_metric(record, "accuracy")
        bar = "#" * filled + "." * (self.width - filled)
        elapsed = time.perf_counter() - self.started
        self.stream.write(
            f"\r[{bar}] round {done}/{self.total}  accuracy {acc:.3f}  {elapsed:5.1f}s"
        )
        if done == self.total:
            self.stream.write("\n")
        self.stream.flush()


def format_table(records: Sequence[RoundRecord]) -> str:
    """A per-round table of training loss, test loss and test accuracy.

    An ``epsilon`` column is added when a DP mod reported the privacy spent.
    """
    with_epsilon = any("epsilon" in r.train_metrics for r in records)
    lines = [
        f"{'round':>5}  {'nodes':>5}  {'failed':>6}  {'train loss':>10}  "
        f"{'test loss':>9}  {'accuracy':>8}  {'seconds':>7}"
        + (f"  {'epsilon':>8}" if with_epsilon else "")
    ]
    for r in records:
        lines.append(
            f"{r.round:>5}  {len(r.participants):>5}  {len(r.failures):>6}  "
            f"{r.train_metrics.get('train-loss', math.nan):>10.4f}  "
            f"{test_metric(r, 'loss'):>9.4f}  "
            f"{test_metric(r, 'accuracy'):>8.4f}  {r.seconds:>7.2f}"
            + (f"  {r.train_metrics.get('epsilon', math.nan):>8.3f}" if with_epsilon else "")
        )
    return "\n".join(lines)


@dataclass(frozen=True)
class DemoApps:
    """What the demo's options build: the task and the two apps, PET mods included."""

    task: DigitsTask
    client_app: ClientApp
    server_app: ServerApp
    pets: Composition


def build_apps(args: argparse.Namespace) -> DemoApps:
    """The task and apps that ``args`` describe; ``ValueError`` for flags that clash.

    The simulation (:func:`run`) and the gRPC deployment
    (:mod:`flowerpets.examples.digits.deploy`) both build their apps here, so
    the same options compute the same thing in both.
    """
    data = load_digits_split(seed=args.seed)
    rng = np.random.default_rng(args.seed)
    partitions = PARTITIONERS[args.partition](data, args.clients, args.alpha, rng)
    task = DigitsTask.create(data, partitions, MODELS[args.model](), seed=args.seed)
    settings = TrainSettings(epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr)
    pets = compose(FEATURES, args, task)
    client_app = make_client_app(task, settings, mods=pets.client)
    server_app = make_server_app(
        task,
        num_rounds=args.rounds,
        sampling=_sampling(args),
        federated_evaluation=args.federated_evaluation or pets.needs_federated_evaluation,
        mods=pets.server,
        seed=args.seed,
    )
    return DemoApps(task=task, client_app=client_app, server_app=server_app, pets=pets)


def run(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    """Run the demo as ``args`` say; returns a process exit code."""
    try:
        apps = build_apps(args)
    except ValueError as exc:  # flags that do not go together
        print(f"flowerpets demo: error: {exc}", file=sys.stderr)
        return 2
    if not args.json:
        data = apps.task.data
        sizes = [len(p) for p in apps.task.partitions]
        print(
            f"digits: {len(data.y_train)} training and {len(data.y_test)} test images, "
            f"{args.clients} clients ({args.partition}, {min(sizes)}-{max(sizes)} images each), "
            f"model {args.model}, {args.rounds} rounds of FedAvg"
            + "".join(f"\n  with {summary}" for summary in apps.pets.summaries),
            file=out,
            flush=True,
        )
    progress = None if args.json else ProgressBar(args.rounds)
    result = run_simulation(
        apps.server_app, apps.client_app, args.clients, seed=args.seed, on_round=progress
    )
    if args.json:
        json.dump({"history": result.history.to_dicts(), "stopped": result.stopped}, out)
        out.write("\n")
    else:
        print(format_table(result.history.rounds), file=out)
        final = test_metric(result.history.rounds[-1], "accuracy")
        print(f"final test accuracy: {final:.4f}", file=out)
    if result.stopped:
        print(f"run stopped early: {result.stopped}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flowerpets demo", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
