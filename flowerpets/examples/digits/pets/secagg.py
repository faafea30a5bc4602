"""``--secagg``: the digits demo with SecAgg+ secure aggregation (:mod:`flowerpets.secagg`).

The server learns only the weighted sum of each round's models. Every node
runs ``secaggplus_mod`` (outermost, so it masks what any privacy mod left);
the server runs ``SecAggPlus``, which picks the graph degree and threshold per
round from the expected dropout rate and corrupted fraction, unless
``--secagg-k`` and ``--secagg-t`` fix them. The training loss is summed under
the masks too (it is the only reply metric the demo's table shows); the server
sees no other metric.
"""

from __future__ import annotations

import argparse
from typing import Any

from flowerpets._argtypes import checked
from flowerpets.examples.digits.apps import DigitsTask
from flowerpets.examples.digits.features import FeatureMods
from flowerpets.exceptions import InfeasibleParametersError, ParameterValueError
from flowerpets.secagg import SecAggPlus, secaggplus_mod

__all__ = ["SecAggFeature"]

SECURE_METRICS = ("train-loss",)


# The demo's wording; text that is no number is argparse's "invalid _positive_int value: 'x'".
_positive_int = checked(int, lambda v: v >= 1, "must be >= 1, got {value}", name="_positive_int")
_rate = checked(float, lambda v: 0 <= v < 1, "must be in [0, 1), got {value}", name="_rate")
_positive_float = checked(
    float, lambda v: v > 0, "must be > 0, got {value}", name="_positive_float"
)


# Option attribute -> flag: the options that mean nothing without --secagg.
_OPTIONS = {
    "secagg_k": "--secagg-k",
    "secagg_t": "--secagg-t",
    "secagg_dropout_rate": "--secagg-dropout-rate",
    "secagg_corrupted_fraction": "--secagg-corrupted-fraction",
    "secagg_clipping_range": "--secagg-clipping-range",
    "secagg_max_weight": "--secagg-max-weight",
}


class SecAggFeature:
    """``--secagg`` and its ``--secagg-*`` options."""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        defaults = SecAggPlus()
        group = parser.add_argument_group("secure aggregation (SecAgg+)")
        group.add_argument(
            "--secagg",
            action="store_true",
            help="sum the updates with SecAgg+: the server sees only masked vectors and their sum",
        )
        group.add_argument(
            "--secagg-k",
            type=_positive_int,
            metavar="K",
            help="graph degree (even; with --secagg-t); default: chosen per round for the cohort",
        )
        group.add_argument(
            "--secagg-t",
            type=_positive_int,
            metavar="T",
            help="Shamir threshold (with --secagg-k)",
        )
        group.add_argument(
            "--secagg-dropout-rate",
            type=_rate,
            default=None,
            help="expected fraction of dropouts, to choose k and t "
            f"(default {defaults.dropout_rate})",
        )
        group.add_argument(
            "--secagg-corrupted-fraction",
            type=_rate,
            default=None,
            help="fraction of nodes that may collude with the server, to choose k and t "
            f"(default {defaults.corrupted_fraction})",
        )
        group.add_argument(
            "--secagg-clipping-range",
            type=_positive_float,
            default=None,
            help="model values are clipped to +-this before quantization "
            f"(default {defaults.clipping_range:g})",
        )
        group.add_argument(
            "--secagg-max-weight",
            type=_positive_int,
            default=None,
            help=f"the largest num-examples a node may report (default {defaults.max_weight})",
        )

    def mods(self, args: argparse.Namespace, task: DigitsTask) -> FeatureMods:
        if not args.secagg:
            given = [
                flag for name, flag in _OPTIONS.items() if getattr(args, name, None) is not None
            ]
            if given:
                verb = "needs" if len(given) == 1 else "need"
                raise ParameterValueError(f"{', '.join(given)} {verb} --secagg")
            return FeatureMods()
        if getattr(args, "he", False):
            raise ParameterValueError(
                "--secagg and --he both replace the round's exchange (masked sums vs. encrypted "
                "sums): choose one"
            )
        if (args.secagg_k is None) != (args.secagg_t is None):
            raise ParameterValueError(
                "--secagg-k and --secagg-t go together (give both or neither)"
            )
        # Under local DP every node weighs 1 and sends no train-loss (the noise does not
        # cover it, so LocalDpMod drops it): SecAgg+ then sums no metric, and a weight
        # bound of 1 keeps the quantization's resolution for the update itself. Under
        # distributed DP the nodes send no metric either (DistributedDpMod drops them).
        dp_mode = getattr(args, "dp", None)
        local_dp = dp_mode == "local"
        no_metrics = dp_mode in ("local", "distributed")
        max_weight = args.secagg_max_weight
        if max_weight is None and local_dp:
            max_weight = 1
        # The library's defaults for what the command line leaves out.
        tuned: dict[str, Any] = {
            keyword: value
            for keyword, value in (
                ("dropout_rate", args.secagg_dropout_rate),
                ("corrupted_fraction", args.secagg_corrupted_fraction),
                ("clipping_range", args.secagg_clipping_range),
                ("max_weight", max_weight),
            )
            if value is not None
        }
        server = SecAggPlus(
            degree=args.secagg_k,
            threshold=args.secagg_t,
            secure_metrics=() if no_metrics else SECURE_METRICS,
            **tuned,
        )
        return FeatureMods(
            client=[secaggplus_mod], server=[server], summary=_summary(args, task, server)
        )


def _summary(args: argparse.Namespace, task: DigitsTask, server: SecAggPlus) -> str:
    cohort = getattr(args, "cohort_size", None) or task.num_nodes
    try:
        params = server.parameters(cohort)
        graph = f"k={params.degree}, t={params.threshold} for a cohort of {cohort}"
    except InfeasibleParametersError as exc:
        graph = f"no k and t for a cohort of {cohort}: {exc}"
    rates = (
        ""
        if args.secagg_k is not None
        else f", dropout rate {server.dropout_rate:g}, corrupted fraction "
        f"{server.corrupted_fraction:g}"
    )
    return f"SecAgg+ ({graph}{rates}; values clipped to +-{server.clipping_range:g})"
