"""``--dp central|local``: the digits demo with differential privacy (:mod:`flowerpets.dp`).

``--dp central`` runs :class:`~flowerpets.dp.CentralDp` on the server (user-level
DP-FedAvg; epsilon is reported in every round's ``train_metrics``) and a clipping
mod on every client, or clips on the server with ``--clip-on server``. The noise
is ``--noise-multiplier``, or the smallest one that keeps the whole run within
``--target-epsilon`` for the demo's sampling (``--cohort-size``, ``--sample-rate``
or everyone) and ``--rounds``. ``--adaptive-clip`` moves the clip towards the
``--target-quantile`` of the update norms. ``--max-epsilon`` stops the run
before a round would exceed it.

``--dp local`` runs :class:`~flowerpets.dp.LocalDpMod` on every client: each round
is ``--target-epsilon``-DP (at ``--delta``) for the client's data, whatever the
server does.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

from flowerpets._argtypes import checked, number
from flowerpets.core import CohortSampling, FixedSizeSampling, FullParticipation, PoissonSampling
from flowerpets.dp import (
    AdaptiveClipping,
    CentralDp,
    ClipOn,
    LocalDpMod,
    adaptive_clipping_mod,
    fixed_clipping_mod,
)
from flowerpets.dp.accountant import calibrate_noise_multiplier, event_for_round
from flowerpets.examples.digits.apps import DigitsTask
from flowerpets.examples.digits.features import FeatureMods

__all__ = ["DpFeature"]


_positive = checked(number, lambda v: v > 0 and v != math.inf, "must be finite and > 0, got {text}")
_fraction = checked(_positive, lambda v: v < 1, "must be in (0, 1), got {text}")
_quantile = checked(number, lambda v: 0 <= v <= 1, "must be in [0, 1], got {text}")


def _sampling(args: argparse.Namespace) -> CohortSampling:
    """The demo's own cohort sampling, as its --cohort-size and --sample-rate say."""
    if getattr(args, "cohort_size", None) is not None:
        return FixedSizeSampling(args.cohort_size)
    if getattr(args, "sample_rate", None) is not None:
        return PoissonSampling(args.sample_rate)
    return FullParticipation()


def _central(args: argparse.Namespace, task: DigitsTask) -> FeatureMods:
    if (args.noise_multiplier is None) == (args.target_epsilon is None):
        raise ValueError(
            "--dp central needs exactly one of --noise-multiplier and --target-epsilon"
        )
    sampling, population = _sampling(args), task.num_nodes
    z = args.noise_multiplier
    if z is None:
        z = calibrate_noise_multiplier(
            target_epsilon=args.target_epsilon,
            delta=args.delta,
            make_event=lambda z: event_for_round(sampling, population, z),
            count=args.rounds,
        )
    adaptive = (
        AdaptiveClipping(target_quantile=args.target_quantile) if args.adaptive_clip else None
    )
    clip_on = ClipOn(args.clip_on)
    server = CentralDp(
        noise_multiplier=z,
        clipping_norm=args.clip,
        clip_on=clip_on,
        adaptive=adaptive,
        delta=args.delta,
        max_epsilon=args.max_epsilon,
    )
    client = (
        []
        if clip_on is ClipOn.SERVER
        else [adaptive_clipping_mod if adaptive else fixed_clipping_mod]
    )
    target = "" if args.target_epsilon is None else f" for epsilon {args.target_epsilon:g}"
    how = (
        f"adaptive from {args.clip:g} to quantile {args.target_quantile:g}"
        if adaptive
        else f"{args.clip:g}"
    )
    return FeatureMods(
        client=client,
        server=[server],
        summary=(
            f"central DP (noise multiplier {z:.3g}{target} over {args.rounds} rounds, "
            f"clip {how} on the {clip_on.value}, delta {args.delta:g})"
        ),
    )


def _local(args: argparse.Namespace, task: DigitsTask) -> FeatureMods:
    if args.target_epsilon is None:
        raise ValueError("--dp local needs --target-epsilon (each round's epsilon)")
    if args.noise_multiplier is not None or args.adaptive_clip:
        raise ValueError(
            "--dp local calibrates its noise from --target-epsilon: drop --noise-multiplier "
            "and --adaptive-clip"
        )
    mod = LocalDpMod(
        clipping_norm=args.clip,
        epsilon=args.target_epsilon,
        delta=args.delta,
        max_epsilon=args.max_epsilon,
    )
    return FeatureMods(
        client=[mod],
        summary=(
            f"local DP (epsilon {args.target_epsilon:g} per round at delta {args.delta:g}, "
            f"clip {args.clip:g}, noise sigma {mod.sigma:.3g} per coordinate)"
        ),
    )


MODES: dict[str, Callable[[argparse.Namespace, DigitsTask], FeatureMods]] = {
    "central": _central,
    "local": _local,
}


class DpFeature:
    """``--dp central|local`` and its options."""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("differential privacy")
        group.add_argument(
            "--dp",
            choices=sorted(MODES),
            default=None,
            help="central: noise the sum on the server (user-level DP-FedAvg); "
            "local: each client noises its own update",
        )
        group.add_argument(
            "--noise-multiplier",
            type=_positive,
            default=None,
            help="central DP: noise std over the clip (or use --target-epsilon)",
        )
        group.add_argument(
            "--target-epsilon",
            type=_positive,
            default=None,
            help="central DP: the run's epsilon, the noise is calibrated to it; "
            "local DP: each round's epsilon",
        )
        group.add_argument(
            "--clip", type=_positive, default=1.0, help="L2 clipping norm of an update (default 1)"
        )
        group.add_argument(
            "--clip-on",
            choices=[c.value for c in ClipOn],
            default=ClipOn.CLIENTS.value,
            help="central DP: who clips the updates (default clients)",
        )
        group.add_argument(
            "--adaptive-clip",
            action="store_true",
            help="central DP: adapt the clip to a quantile of the update norms (Andrew et al.)",
        )
        group.add_argument(
            "--target-quantile",
            type=_quantile,
            default=0.5,
            help="adaptive clipping: fraction of updates left unclipped (default 0.5)",
        )
        group.add_argument(
            "--delta", type=_fraction, default=1e-5, help="the delta of (epsilon, delta)-DP"
        )
        group.add_argument(
            "--max-epsilon",
            type=_positive,
            default=None,
            help="stop before a round would exceed this epsilon (local DP: per node)",
        )

    def mods(self, args: argparse.Namespace, task: DigitsTask) -> FeatureMods:
        if args.dp is None:
            return FeatureMods()
        return MODES[args.dp](args, task)
