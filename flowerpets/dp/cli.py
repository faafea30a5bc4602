"""``flowerpets accountant``: epsilon, noise and round plans from the command line.

.. code-block:: text

    flowerpets accountant epsilon --noise-multiplier 1.1 --sample-rate 0.01 --steps 10000 \\
        --delta 1e-5 [--accountant pld|rdp|all] [--json]
    flowerpets accountant noise --target-epsilon 3 --sample-rate 0.01 --steps 1000 --delta 1e-5
    flowerpets accountant plan --population 1000 --clients-per-round 50 --rounds 200 \\
        --noise-multiplier 1.0 --delta 1e-6 [--sampling poisson|fixed] [--plot eps.png]
    flowerpets accountant ledger --store runs.db [--delta 1e-5] [--json]
    flowerpets accountant distributed-epsilon --clients-per-round 100 --min-clients 70 \\
        --noise-multiplier 6 --clip 1 --bits 20 --dimension 65536 --rounds 100 --delta 1e-5 \\
        [--mechanism skellam|discrete-gaussian] [--dropout worst-case|survivors] [--survivors 93]
    flowerpets accountant distributed-noise --target-epsilon 8 --clients-per-round 100 \\
        --min-clients 70 --clip 1 --scale 1000 --dimension 65536 --rounds 100 --delta 1e-5

``epsilon`` and ``noise`` describe Poisson-sampled Gaussian steps (a sample
rate of 1 means every step sees everyone: no amplification). ``plan`` describes
federated rounds: clients sampled from a population by Poisson sampling at
rate ``clients / population`` (the default) or as a fixed-size cohort drawn
without replacement, and prints epsilon after each round. ``--accountant``
picks PLD (default, tightest, also for fixed-size plans, under replace-one),
RDP (fast), or ``all`` side by side with the time each took. ``ledger``
prints what each population of a run store (:mod:`flowerpets.store`) has
spent: its events, every run's, composed sequentially by the accountant its
runs counted them with, at the delta they were counted at (the smallest, if
its runs used several) or at ``--delta``.

``distributed-epsilon`` and ``distributed-noise`` describe distributed DP
(each client adds a discrete noise share before SecAgg+): the epsilon of a
run, with each client's share given as its variance in the integer domain
(``--local-variance``, with ``--scale``) or as the summed noise's multiplier
over the rounded sensitivity (``--noise-multiplier``), and the share that
reaches a target epsilon. The scale is given (``--scale``) or chosen for a
bit width (``--bits``) as :class:`~flowerpets.dp.DistributedDp` chooses it (the
largest scale whose sum wraps with probability at most ``--max-wrap``), and
the dimension is padded to a power of two as its rotation does. The epsilon is
reported against the server (which sees who takes part: no amplification) and,
with ``--sampling``, against anyone who does not. A table by
default, one JSON object with ``--json``. Bad arguments print one line on
stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from flowerpets._argtypes import OneLineParser, checked, integer, number, one_line
from flowerpets.core.sampling import CohortSampling, FixedSizeSampling, PoissonSampling
from flowerpets.dp._primitives.distributed import DEFAULT_BETA
from flowerpets.dp._primitives.rotation import padded_dimension
from flowerpets.dp.accountant import (
    ACCOUNTANTS,
    Accountant,
    DistributedDiscreteGaussianEvent,
    DistributedEvent,
    DropoutPolicy,
    FixedSizeSampledGaussian,
    FullParticipationGaussian,
    PoissonSampledGaussian,
    PrivacyEvent,
    SkellamEvent,
    calibrate_distributed_noise,
    calibrate_noise_multiplier,
    default_accountant,
    default_neighbouring,
)
from flowerpets.dp.distributed import Mechanism
from flowerpets.dp.distributed._plan import WRAP_LIMIT, plan
from flowerpets.exceptions import FlowerpetsError

__all__ = ["DESCRIPTION", "add_parser", "main"]

#: What ``flowerpets accountant --help`` says (plain text: argparse shows it as it is).
DESCRIPTION = "Privacy accounting from the command line: epsilon, noise multipliers and plans."

ALL = "all"
MAX_POINTS = 50  # rounds evaluated by `plan` unless --points says otherwise


# -- argument types --------------------------------------------------------------------------------
_number = checked(number, math.isfinite, "expected a finite number, got {text!r}")
_positive = checked(_number, lambda v: v > 0, "must be > 0, got {text}")
_probability = checked(_number, lambda v: 0 < v < 1, "must be in (0, 1), got {text}")
_rate = checked(_number, lambda v: 0 < v <= 1, "must be in (0, 1], got {text}")
_count = checked(integer, lambda v: v >= 1, "must be an integer >= 1, got {text}")
_non_negative = checked(_number, lambda v: v >= 0, "must be >= 0, got {text}")
_beta = checked(_number, lambda v: 0 <= v < 1, "must be in [0, 1), got {text}")
_bits = checked(integer, lambda v: 2 <= v <= 32, "must be an integer in [2, 32], got {text}")


# -- the parsers -----------------------------------------------------------------------------------
def _add_common(parser: argparse.ArgumentParser, *, accountants: bool = True) -> None:
    """``--delta`` and ``--json``, and ``--accountant`` where the event has a choice of them."""
    parser.add_argument(
        "--delta", type=_probability, required=True, help="the delta epsilon is reported at"
    )
    if accountants:
        parser.add_argument(
            "--accountant",
            choices=[*sorted(ACCOUNTANTS), ALL],
            default=None,
            help="pld (default, tightest), rdp (fast), or all side by side",
        )
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _add_steps(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sample-rate",
        type=_rate,
        required=True,
        help="Poisson sampling rate of each step (1: every step sees everyone)",
    )
    parser.add_argument("--steps", type=_count, required=True, help="number of steps")


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``accountant`` and its subcommands (epsilon, noise, plan, ledger, distributed)."""
    parser = subparsers.add_parser(
        "accountant",
        help="privacy accounting: epsilon, noise multiplier, epsilon per round",
        description=DESCRIPTION,
    )
    if type(parser) is argparse.ArgumentParser:
        parser.__class__ = OneLineParser  # its errors are one line too
    commands = parser.add_subparsers(metavar="QUERY", required=True, parser_class=OneLineParser)

    epsilon = commands.add_parser(
        "epsilon", help="epsilon of T sampled Gaussian steps", description="Print epsilon."
    )
    epsilon.add_argument("--noise-multiplier", type=_positive, required=True)
    _add_steps(epsilon)
    _add_common(epsilon)
    epsilon.set_defaults(command=_run(_epsilon_command))

    noise = commands.add_parser(
        "noise",
        help="noise multiplier that reaches a target epsilon",
        description="Print the smallest noise multiplier within the target epsilon.",
    )
    noise.add_argument("--target-epsilon", type=_positive, required=True)
    _add_steps(noise)
    _add_common(noise)
    noise.set_defaults(command=_run(_noise_command))

    plan = commands.add_parser(
        "plan",
        help="epsilon after each round of a federated run",
        description="Print epsilon after each round of a federated run.",
    )
    plan.add_argument("--population", type=_count, required=True, help="clients available")
    plan.add_argument("--clients-per-round", type=_count, required=True)
    plan.add_argument("--rounds", type=_count, required=True)
    plan.add_argument("--noise-multiplier", type=_positive, required=True)
    plan.add_argument(
        "--sampling",
        choices=sorted(_PLAN_EVENTS),
        default="poisson",
        help="how each round's clients are drawn (default poisson)",
    )
    plan.add_argument(
        "--points",
        type=_count,
        default=None,
        help=f"rounds to evaluate, evenly spaced (default every round, at most {MAX_POINTS})",
    )
    plan.add_argument(
        "--plot",
        metavar="FILE.png",
        help="draw epsilon against rounds into this file (.png, .pdf, .svg, ...)",
    )
    _add_common(plan)
    plan.set_defaults(command=_run(_plan_command))

    ledger = commands.add_parser(
        "ledger",
        help="what each population of a run store has spent",
        description="Print each population's events and epsilon, every run's composed.",
    )
    ledger.add_argument("--store", required=True, metavar="PATH", help="the run store file")
    ledger.add_argument(
        "--delta",
        type=_probability,
        default=None,
        help="report epsilon at this delta (default: the delta the runs counted at)",
    )
    ledger.add_argument("--json", action="store_true", help="print one JSON object")
    ledger.set_defaults(command=_run(_ledger_command))

    distributed = commands.add_parser(
        "distributed-epsilon",
        help="epsilon of a distributed-DP run (noise shares added by the clients)",
        description="Print the epsilon of a distributed-DP run, against the server and others.",
    )
    share = distributed.add_mutually_exclusive_group(required=True)
    share.add_argument(
        "--local-variance",
        type=_non_negative,
        help="each client's share: Skellam variance mu or discrete Gaussian sigma^2, in the "
        "integer domain (needs --scale)",
    )
    share.add_argument(
        "--noise-multiplier",
        type=_positive,
        help="the summed noise's std over the rounded L2 sensitivity, for the shares the "
        "dropout policy counts on (--min-clients under worst-case, --clients-per-round under "
        "survivors)",
    )
    distributed.add_argument(
        "--survivors",
        type=_count,
        default=None,
        help="clients whose share is in each released sum (default --clients-per-round)",
    )
    _add_distributed(distributed)
    distributed.set_defaults(command=_run(_distributed_epsilon_command))

    distributed_noise = commands.add_parser(
        "distributed-noise",
        help="each client's noise share for a distributed-DP run within a target epsilon",
        description="Print each client's noise share that keeps a distributed-DP run within "
        "the target epsilon.",
    )
    distributed_noise.add_argument("--target-epsilon", type=_positive, required=True)
    _add_distributed(distributed_noise)
    distributed_noise.set_defaults(command=_run(_distributed_noise_command))


def _add_distributed(parser: argparse.ArgumentParser) -> None:
    """The options both distributed-DP queries take: the pipeline, the cohort, the rounds."""
    parser.add_argument(
        "--mechanism",
        choices=sorted(_MECHANISMS),
        default="skellam",
        help="the clients' noise (default skellam)",
    )
    parser.add_argument(
        "--clients-per-round", type=_count, required=True, help="clients expected in each sum"
    )
    parser.add_argument(
        "--min-clients",
        type=_count,
        default=None,
        help="the fewest survivors SecAgg+ releases a sum for, less any client that may "
        "collude with the server (default --clients-per-round)",
    )
    parser.add_argument(
        "--dropout",
        choices=sorted(_DROPOUTS),
        default=DropoutPolicy.WORST_CASE.value,
        help="which shares a round's epsilon counts (default worst-case: --min-clients)",
    )
    parser.add_argument("--clip", type=_positive, required=True, help="L2 clip, model units")
    scale = parser.add_mutually_exclusive_group(required=True)
    scale.add_argument(
        "--scale", type=_positive, help="what the clipped update is multiplied by before rounding"
    )
    scale.add_argument(
        "--bits",
        type=_bits,
        help="the modulus's bit width: the scale is chosen so the noised sum fits in it",
    )
    parser.add_argument(
        "--max-wrap",
        type=_probability,
        default=None,
        help="with --bits: the bound on the chance that a round's sum wraps around the modulus "
        "(default DistributedDp's, 1e-6)",
    )
    parser.add_argument(
        "--dimension",
        type=_count,
        required=True,
        help="the model's parameters (padded to a power of two for the rotation)",
    )
    parser.add_argument(
        "--beta",
        type=_beta,
        default=DEFAULT_BETA,
        help="conditional randomized rounding's beta (default DistributedDp's, exp(-1/2); "
        "0: plain randomized rounding)",
    )
    parser.add_argument("--rounds", type=_count, required=True)
    parser.add_argument(
        "--sampling",
        choices=sorted(_COHORTS),
        default="full",
        help="how each round's clients are drawn from --population (default full: no "
        "amplification)",
    )
    parser.add_argument(
        "--population", type=_count, default=None, help="clients available (with --sampling)"
    )
    _add_common(parser, accountants=False)  # only RDP analyses these sums


class _UsageError(FlowerpetsError):
    """Arguments that parse but make no sense together: one line, exit status 2."""


def _run(
    command: Callable[[argparse.Namespace, TextIO], None],
) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            command(args, sys.stdout)
        # Our typed errors, and what the accountants' configuration refuses, are usage errors;
        # anything else is a bug and keeps its traceback.
        except (FlowerpetsError, ValueError, TypeError) as exc:  # _UsageError is ours too
            print(f"flowerpets accountant: error: {one_line(exc)}", file=sys.stderr)
            return 2
        return 0

    return run


# -- helpers ---------------------------------------------------------------------------------------
def _step_event(noise_multiplier: float, sample_rate: float) -> PrivacyEvent:
    if sample_rate >= 1:
        return FullParticipationGaussian(noise_multiplier)
    return PoissonSampledGaussian(noise_multiplier, sample_rate)


def _accountants(choice: str | None, event: PrivacyEvent) -> list[Accountant]:
    """The accountants ``--accountant`` asks for that analyse ``event``."""
    relation = default_neighbouring(event)
    if choice is None:
        return [default_accountant(event)]
    names = sorted(ACCOUNTANTS) if choice == ALL else [choice]
    chosen = [ACCOUNTANTS[name](neighbouring=relation) for name in names]
    usable = [a for a in chosen if a.supports(event)]
    if not usable:
        chosen[0]._convert(event)  # raises PrivacyAccountingError with the reason
    return usable


def _describe(event: PrivacyEvent) -> dict[str, Any]:
    fields = {"kind": type(event).__name__, "noise_multiplier": event.noise_multiplier}
    if isinstance(event, DistributedEvent):
        fields.update(dataclasses.asdict(event))
    if isinstance(event, PoissonSampledGaussian):
        fields["sample_rate"] = event.sample_rate
    if isinstance(event, FixedSizeSampledGaussian):
        fields.update(sample_size=event.sample_size, population=event.population)
    fields["neighbouring"] = default_neighbouring(event).value
    return fields


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(value: object) -> str:
        if isinstance(value, float):
            return f"{value:.6g}" if math.isfinite(value) else str(value)
        return str(value)

    cells = [[str(h) for h in headers], *([cell(v) for v in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        pairs = enumerate(zip(row, widths, strict=True))
        padded = [v.rjust(w) if i else v.ljust(w) for i, (v, w) in pairs]
        return "  ".join(padded)

    lines = [line(row) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def _emit(args: argparse.Namespace, out: TextIO, payload: dict[str, Any], text: str) -> None:
    if args.json:
        out.write(json.dumps(payload, default=str) + "\n")
    else:
        out.write(text + "\n")


# -- the commands ----------------------------------------------------------------------------------
def _epsilon_command(args: argparse.Namespace, out: TextIO) -> None:
    event = _step_event(args.noise_multiplier, args.sample_rate)
    results: dict[str, dict[str, float]] = {}
    for accountant in _accountants(args.accountant, event):
        started = time.perf_counter()
        value = accountant.compose(event, args.steps).get_epsilon(args.delta)
        results[accountant.name] = {"epsilon": value, "seconds": time.perf_counter() - started}
    payload = {
        "query": "epsilon",
        "event": _describe(event),
        "steps": args.steps,
        "delta": args.delta,
        "results": results,
    }
    header = (
        f"{args.steps} steps of a {type(event).__name__} (noise multiplier "
        f"{args.noise_multiplier:g}, sample rate {args.sample_rate:g}), delta {args.delta:g}"
    )
    rows = [(name, r["epsilon"], f"{r['seconds']:.3f}") for name, r in results.items()]
    _emit(args, out, payload, header + "\n" + _table(("accountant", "epsilon", "seconds"), rows))


def _noise_command(args: argparse.Namespace, out: TextIO) -> None:
    probe = _step_event(1.0, args.sample_rate)
    results: dict[str, dict[str, float]] = {}
    for accountant in _accountants(args.accountant, probe):
        started = time.perf_counter()
        z = calibrate_noise_multiplier(
            target_epsilon=args.target_epsilon,
            delta=args.delta,
            make_event=lambda z: _step_event(z, args.sample_rate),
            count=args.steps,
            accountant=type(accountant),
        )
        reached = accountant.fresh().compose(_step_event(z, args.sample_rate), args.steps)
        results[accountant.name] = {
            "noise_multiplier": z,
            "epsilon": reached.get_epsilon(args.delta),
            "seconds": time.perf_counter() - started,
        }
    payload = {
        "query": "noise",
        "target_epsilon": args.target_epsilon,
        "sample_rate": args.sample_rate,
        "steps": args.steps,
        "delta": args.delta,
        "results": results,
    }
    header = (
        f"noise multiplier for epsilon <= {args.target_epsilon:g} at delta {args.delta:g} after "
        f"{args.steps} steps at sample rate {args.sample_rate:g}"
    )
    rows = [
        (name, r["noise_multiplier"], r["epsilon"], f"{r['seconds']:.3f}")
        for name, r in results.items()
    ]
    _emit(
        args,
        out,
        payload,
        header + "\n" + _table(("accountant", "noise multiplier", "epsilon", "seconds"), rows),
    )


_PLAN_EVENTS: dict[str, Callable[[argparse.Namespace], PrivacyEvent]] = {
    "poisson": lambda a: _step_event(a.noise_multiplier, a.clients_per_round / a.population),
    "fixed": lambda a: FixedSizeSampledGaussian(
        a.noise_multiplier, a.clients_per_round, a.population
    ),
}


def _plan_points(rounds: int, points: int | None) -> list[int]:
    wanted = min(rounds, points if points is not None else MAX_POINTS)
    if wanted >= rounds:
        return list(range(1, rounds + 1))
    return sorted({max(1, round(rounds * (i + 1) / wanted)) for i in range(wanted)})


def _plan_command(args: argparse.Namespace, out: TextIO) -> None:
    if args.clients_per_round > args.population:
        raise _UsageError(
            f"--clients-per-round {args.clients_per_round} exceeds --population {args.population}"
        )
    if args.plot:
        _check_plot_file(args.plot)  # before the accounting, which may take a while
    event = _PLAN_EVENTS[args.sampling](args)
    accountants = _accountants(args.accountant, event)
    points = _plan_points(args.rounds, args.points)
    series: dict[str, list[float]] = {}
    seconds: dict[str, float] = {}
    for accountant in accountants:
        started, done, values = time.perf_counter(), 0, []
        for point in points:
            accountant.compose(event, point - done)
            done = point
            values.append(accountant.get_epsilon(args.delta))
        series[accountant.name] = values
        seconds[accountant.name] = time.perf_counter() - started
    if args.plot:
        _plot(args.plot, points, series, args)
    payload = {
        "query": "plan",
        "event": _describe(event),
        "population": args.population,
        "clients_per_round": args.clients_per_round,
        "sampling": args.sampling,
        "delta": args.delta,
        "rounds": points,
        "epsilon": series,
        "seconds": seconds,
        "plot": args.plot,
    }
    names = list(series)
    header = (
        f"{args.sampling} sampling of {args.clients_per_round} of {args.population} clients per "
        f"round, noise multiplier {args.noise_multiplier:g}, delta {args.delta:g} "
        f"({default_neighbouring(event).value} neighbouring)"
    )
    rows = [(p, *(series[n][i] for n in names)) for i, p in enumerate(points)]
    text = header + "\n" + _table(("round", *(f"epsilon ({n})" for n in names)), rows)
    if args.plot:
        text += f"\nplot written to {args.plot}"
    _emit(args, out, payload, text)


def _population_spent(spends: Sequence[Any], delta: float | None) -> dict[str, Any]:
    """One population's events (each with its count), runs, and epsilon at its delta."""
    from flowerpets.dp.central._durable import population_ledger

    ledger = population_ledger(spends)  # an entry that is no event of ours is refused
    runs = sorted({spend.run_id for spend in spends})
    row: dict[str, Any] = {
        "runs": runs,
        "events": sum(count for _, count in ledger),
        "distinct_events": [{**_describe(event), "count": count} for event, count in ledger],
        "accountant": None,
        "delta": delta,
        "epsilon": 0.0,
    }
    if not ledger:
        return row
    first = ledger[0][0]
    name = spends[0].event.get("accountant")
    if name not in ACCOUNTANTS:
        raise _UsageError(
            f"population {spends[0].population_id!r} was counted by an accountant this command "
            f"does not know ({name!r})"
        )
    accountant = ACCOUNTANTS[name](neighbouring=default_neighbouring(first))
    for event, count in ledger:
        accountant.compose(event, count)
    at = delta if delta is not None else min(float(spend.event["delta"]) for spend in spends)
    row.update(accountant=name, delta=at, epsilon=accountant.get_epsilon(at))
    return row


def _ledger_command(args: argparse.Namespace, out: TextIO) -> None:
    path = Path(args.store)
    if not path.is_file():
        raise _UsageError(f"--store {args.store}: no such file")
    from flowerpets.store import RunStore

    with RunStore(path) as store:
        populations = {
            p: _population_spent(store.spends(p), args.delta) for p in store.populations()
        }
    payload = {"query": "ledger", "store": str(path), "populations": populations}
    rows = [
        (
            name,
            ", ".join(row["runs"]) or "-",
            row["events"],
            row["accountant"] or "-",
            row["delta"] if row["delta"] is not None else "-",
            row["epsilon"],
        )
        for name, row in populations.items()
    ]
    header = f"privacy spent per population in {path}"
    table = _table(("population", "runs", "events", "accountant", "delta", "epsilon"), rows)
    _emit(args, out, payload, header + "\n" + table)


# -- distributed DP --------------------------------------------------------------------------------
_Distributed = SkellamEvent | DistributedDiscreteGaussianEvent
_MECHANISMS = {mechanism.value: mechanism for mechanism in Mechanism}
_DROPOUTS = {policy.value: policy for policy in DropoutPolicy}
_COHORTS: dict[str, Callable[[argparse.Namespace], CohortSampling | None]] = {
    "fixed": lambda a: FixedSizeSampling(a.clients_per_round),
    "full": lambda a: None,
    "poisson": lambda a: PoissonSampling(a.clients_per_round / a.population),
}
_SCALE_ROUNDS = 20  # fixed-point steps between the scale and the noise (--bits with a target)
_SCALE_TOLERANCE = 1e-4  # relative change of the noise multiplier that ends them


@dataclasses.dataclass(frozen=True)
class _Cohort:
    """The distributed options checked together: the cohort, its threshold, its sampling."""

    expected: int
    minimum: int
    dropout: DropoutPolicy
    sampling: CohortSampling | None
    population: int | None


def _cohort(args: argparse.Namespace) -> _Cohort:
    minimum = args.min_clients if args.min_clients is not None else args.clients_per_round
    if minimum > args.clients_per_round:
        raise _UsageError(
            f"--min-clients {minimum} exceeds --clients-per-round {args.clients_per_round}"
        )
    if (args.sampling == "full") != (args.population is None):
        raise _UsageError("--population goes with --sampling poisson or fixed, and only with it")
    if args.population is not None and args.clients_per_round > args.population:
        raise _UsageError(
            f"--clients-per-round {args.clients_per_round} exceeds --population {args.population}"
        )
    return _Cohort(
        expected=args.clients_per_round,
        minimum=minimum,
        dropout=_DROPOUTS[args.dropout],
        sampling=_COHORTS[args.sampling](args),
        population=args.population,
    )


def _distributed_event(
    args: argparse.Namespace, cohort: _Cohort, *, scale: float, share: float, shares: int
) -> _Distributed:
    """One round's event: ``shares`` noise shares of ``share`` each in the sum."""
    return _MECHANISMS[args.mechanism].event.from_pipeline(
        clip=args.clip,
        scale=scale,
        dimension=padded_dimension(args.dimension),  # the rotation pads, as DistributedDp does
        local_variance=share,
        clients_in_sum=shares,
        beta=args.beta,
        sampling=cohort.sampling,
        population=cohort.population,
        cohort_size=None if cohort.sampling is None else cohort.expected,
    )


def _planned(args: argparse.Namespace, cohort: _Cohort, z: float) -> tuple[float, float]:
    """(scale, share) for noise multiplier ``z``: given ``--scale``, or DistributedDp's plan.

    With ``--bits`` the scale is the one :class:`~flowerpets.dp.DistributedDp` chooses:
    the largest whose sum of the cohort's updates and shares wraps around ``2**bits``
    with probability at most ``--max-wrap``.
    """
    planned = cohort.dropout.counted(cohort.expected, cohort.minimum)
    if args.scale is not None:
        probe = _distributed_event(args, cohort, scale=args.scale, share=0.0, shares=planned)
        scale: float = args.scale
        return scale, probe.with_noise_multiplier(z).local_variance
    chosen = plan(
        noise_multiplier=z,
        dimension=args.dimension,
        beta=args.beta,
        cohort=cohort.expected,
        planned=planned,
        modulus_bits=args.bits,
        mechanism=_MECHANISMS[args.mechanism],
        max_wrap=WRAP_LIMIT if args.max_wrap is None else args.max_wrap,
    )
    return chosen.units / args.clip, chosen.share


def _epsilons(event: _Distributed, rounds: int, delta: float) -> dict[str, float]:
    """Epsilon against the server (no amplification) and, if sampled, against the others."""
    against = {"server": event.unamplified()}
    if event.cohort_size is not None:
        against["others"] = event
    return {
        who: default_accountant(e).compose(e, rounds).get_epsilon(delta)
        for who, e in against.items()
    }


def _share_fields(event: _Distributed) -> dict[str, float]:
    return {
        "local_variance": event.local_variance,
        "local_stddev_model_units": math.sqrt(event.local_variance) / event.scale,
        "noise_multiplier": event.noise_multiplier,
    }


def _distributed_text(
    args: argparse.Namespace, cohort: _Cohort, event: _Distributed, first: str
) -> str:
    sampled = (
        ""
        if cohort.sampling is None
        else f", {args.sampling} sampling from {cohort.population} (amplifies against others)"
    )
    bits = f" (chosen for {args.bits} bits)" if args.bits is not None else ""
    padded = "" if event.dimension == args.dimension else f" (padded to {event.dimension})"
    return (
        f"{first}\n{args.rounds} rounds of {args.mechanism} noise, {cohort.expected} clients per "
        f"round, at least {cohort.minimum}, {cohort.dropout.value} dropouts{sampled}; clip "
        f"{args.clip:g}, scale {event.scale:.6g}{bits}, dimension {args.dimension}{padded}, delta "
        f"{args.delta:g}\neach client's share: {event.local_variance:.6g} in integer units "
        f"(std {math.sqrt(event.local_variance) / event.scale:.6g} in model units); rounded "
        f"sensitivities L2 {event.l2_sensitivity:.6g}, L1 {event.l1_sensitivity:.6g}"
    )


def _distributed_epsilon_command(args: argparse.Namespace, out: TextIO) -> None:
    cohort = _cohort(args)
    survivors = args.survivors if args.survivors is not None else cohort.expected
    if not cohort.minimum <= survivors <= cohort.expected:
        raise _UsageError(
            f"--survivors {survivors} must be between --min-clients {cohort.minimum} (SecAgg+ "
            f"releases no sum below it) and --clients-per-round {cohort.expected}"
        )
    if args.local_variance is not None:
        if args.scale is None:
            raise _UsageError(
                "--local-variance is in the integer units of --scale: give --scale "
                "(or --noise-multiplier with --bits)"
            )
        scale, share = args.scale, args.local_variance
    else:
        scale, share = _planned(args, cohort, args.noise_multiplier)
    counted = cohort.dropout.counted(survivors, cohort.minimum)
    event = _distributed_event(args, cohort, scale=scale, share=share, shares=counted)
    epsilon = _epsilons(event, args.rounds, args.delta)
    payload = {
        "query": "distributed-epsilon",
        "event": _describe(event),
        **_share_fields(event),
        "mechanism": args.mechanism,
        "dropout": cohort.dropout.value,
        "survivors": survivors,
        "clients_counted": counted,
        "scale": scale,
        "bits": args.bits,
        "rounds": args.rounds,
        "delta": args.delta,
        "accountant": default_accountant(event).name,
        "epsilon": epsilon,
    }
    first = (
        f"{survivors} of {cohort.expected} clients in each sum, {counted} counted; summed noise "
        f"multiplier {event.noise_multiplier:.6g}"
    )
    rows = [(f"the {who}", value) for who, value in epsilon.items()]
    text = _distributed_text(args, cohort, event, first)
    table = _table(("against", f"epsilon ({payload['accountant']})"), rows)
    _emit(args, out, payload, text + "\n" + table)


def _calibrated_scale(args: argparse.Namespace, cohort: _Cohort) -> tuple[float, float]:
    """(scale, share): the share for the target at that scale; with --bits, their fixed point.

    The scale for a bit width depends on the noise, and the noise multiplier the
    target needs (a little) on the scale: each step plans the scale for a noise
    multiplier and calibrates the multiplier at that scale, until it settles.
    What is returned is the plan of the multiplier found, checked against the
    target at its own scale (and raised a little until it holds).
    """
    planned = cohort.dropout.counted(cohort.expected, cohort.minimum)

    def calibrate(scale: float) -> float:
        return calibrate_distributed_noise(
            target_epsilon=args.target_epsilon,
            delta=args.delta,
            rounds=args.rounds,
            clip=args.clip,
            scale=scale,
            dimension=args.dimension,
            expected_clients=cohort.expected,
            min_clients=cohort.minimum,
            beta=args.beta,
            mechanism=_MECHANISMS[args.mechanism].event,
            dropout=cohort.dropout,
            sampling=cohort.sampling,
            population=cohort.population,
        )

    def multiplier(scale: float, share: float) -> float:
        probe = _distributed_event(args, cohort, scale=scale, share=share, shares=planned)
        return probe.noise_multiplier

    if args.scale is not None:
        return args.scale, calibrate(args.scale)
    z = 1.0
    for _ in range(_SCALE_ROUNDS):
        scale, _ = _planned(args, cohort, z)
        found = multiplier(scale, calibrate(scale))
        settled = abs(found - z) <= _SCALE_TOLERANCE * z
        z = found
        if settled:
            break
    for _ in range(_SCALE_ROUNDS):
        scale, share = _planned(args, cohort, z)
        event = _distributed_event(args, cohort, scale=scale, share=share, shares=planned)
        # Calibrated against whom the sampling amplifies for (the server, without sampling).
        against = "server" if cohort.sampling is None else "others"
        if _epsilons(event, args.rounds, args.delta)[against] <= args.target_epsilon:
            return scale, share
        z *= 1 + _SCALE_TOLERANCE
    raise _UsageError(
        f"no scale within {args.bits} bits keeps epsilon {args.target_epsilon:g}: raise --bits "
        "or --target-epsilon"
    )


def _distributed_noise_command(args: argparse.Namespace, out: TextIO) -> None:
    cohort = _cohort(args)
    scale, share = _calibrated_scale(args, cohort)
    planned = cohort.dropout.counted(cohort.expected, cohort.minimum)
    event = _distributed_event(args, cohort, scale=scale, share=share, shares=planned)
    # What the share gives when every expected client survives, and when only the fewest do.
    survivors = sorted({cohort.expected, cohort.minimum}, reverse=True)
    reached = {}
    for count in survivors:
        counted = cohort.dropout.counted(count, cohort.minimum)
        at = _distributed_event(args, cohort, scale=scale, share=share, shares=counted)
        reached[count] = _epsilons(at, args.rounds, args.delta)
    payload = {
        "query": "distributed-noise",
        "target_epsilon": args.target_epsilon,
        "event": _describe(event),
        **_share_fields(event),
        "mechanism": args.mechanism,
        "dropout": cohort.dropout.value,
        "clients_counted": planned,
        "scale": scale,
        "bits": args.bits,
        "rounds": args.rounds,
        "delta": args.delta,
        "accountant": default_accountant(event).name,
        "epsilon_by_survivors": {str(count): value for count, value in reached.items()},
    }
    first = (
        f"each client's share for epsilon <= {args.target_epsilon:g} against the "
        f"{'others' if cohort.sampling is not None else 'server'}, {planned} shares counted: "
        f"{share:.6g}"
    )
    names = list(reached[survivors[0]])
    rows = [(count, *(reached[count][n] for n in names)) for count in survivors]
    accountant = payload["accountant"]
    table = _table(("survivors", *(f"epsilon against the {n} ({accountant})" for n in names)), rows)
    _emit(args, out, payload, _distributed_text(args, cohort, event, first) + "\n" + table)


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise _UsageError("--plot needs matplotlib (pip install 'flowerpets[examples]')") from None
    return plt


def _check_plot_file(path: str) -> None:
    """Refuse a file matplotlib cannot write, by its extension, before any work is done."""
    _pyplot()
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in formats:
        known = ", ".join(f".{f}" for f in sorted(formats))
        got = f"'.{suffix}'" if suffix else "no extension"
        raise _UsageError(f"--plot {path}: the file name must end in one of {known}, got {got}")


def _plot(path: str, rounds: list[int], series: dict[str, list[float]], args: Any) -> None:
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(6, 4))
    for name, values in series.items():
        axes.plot(rounds, values, marker="." if len(rounds) <= 60 else None, label=name)
    axes.set_xlabel("round")
    axes.set_ylabel(f"epsilon at delta={args.delta:g}")
    axes.set_title(
        f"{args.clients_per_round}/{args.population} clients per round ({args.sampling}), "
        f"z={args.noise_multiplier:g}"
    )
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    try:
        figure.savefig(path)
    except OSError as exc:
        raise _UsageError(f"cannot write {path}: {exc}") from None
    finally:
        plt.close(figure)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``accountant ...`` as if from ``flowerpets``: ``main(["epsilon", "--steps", ...])``."""
    parser: argparse.ArgumentParser = OneLineParser(prog="flowerpets")
    add_parser(parser.add_subparsers(metavar="COMMAND", required=True))
    args = parser.parse_args(["accountant", *(argv if argv is not None else sys.argv[1:])])
    command: Callable[[argparse.Namespace], int] = args.command
    return command(args)


if __name__ == "__main__":
    sys.exit(main())
