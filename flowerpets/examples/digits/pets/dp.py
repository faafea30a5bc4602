"""``--dp central|distributed|local``: the digits demo with differential privacy.

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

``--dp distributed`` runs :class:`~flowerpets.dp.DistributedDp` on the server and
:class:`~flowerpets.dp.DistributedDpMod` on every client, over SecAgg+ (it turns
``--secagg`` on): each client noises its own quantized update with a share of
discrete noise, so the server only ever unmasks a noised sum. The noise is
``--noise-multiplier`` or calibrated by the mod to ``--target-epsilon`` over
``--rounds``; epsilon (against the server, without amplification by sampling)
is reported every round. ``--adaptive-clip`` sums each client's clipped bit
inside the secure sum. ``--dropouts survivors`` sizes the noise for the expected
cohort and counts each round's epsilon from the survivors (default
``worst-case``: for the fewest survivors SecAgg+ allows).

Every DP option needs ``--dp`` (the demo's recommended composition sets
``--dp central``); an option the chosen mode does not use is refused rather
than ignored. Flags that cannot work together (clipping on the server under
secure aggregation, a budget below one round's epsilon, adaptive clipping with
too much noise) are refused before the run with a one-line reason.
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
    DistributedDp,
    DistributedDpMod,
    LocalDpMod,
    adaptive_clipping_mod,
    fixed_clipping_mod,
)
from flowerpets.dp.accountant import (
    DropoutPolicy,
    PrivacyEvent,
    calibrate_noise_multiplier,
    default_accountant,
    event_for_round,
)
from flowerpets.examples.digits.apps import DigitsTask
from flowerpets.examples.digits.features import FeatureMods
from flowerpets.exceptions import ParameterValueError

__all__ = ["DpFeature"]


_positive = checked(number, lambda v: v > 0 and v != math.inf, "must be finite and > 0, got {text}")
_fraction = checked(_positive, lambda v: v < 1, "must be in (0, 1), got {text}")
_quantile = checked(number, lambda v: 0 <= v <= 1, "must be in [0, 1], got {text}")

# Defaults of the options that default to None, so that "given" can be told from "not given".
CLIP, DELTA, TARGET_QUANTILE = 1.0, 1e-5, 0.5
# The noise multiplier is calibrated to this precision: epsilon stays at or below the target,
# within a fraction of a percent of it, in far fewer accountant calls than the default.
CALIBRATION_TOL = 0.01

# Option attribute -> flag, by the modes that read them.
_CENTRAL_ONLY = {
    "noise_multiplier": "--noise-multiplier",
    "clip_on": "--clip-on",
    "adaptive_clip": "--adaptive-clip",
    "target_quantile": "--target-quantile",
}
_ANY_MODE = {
    "target_epsilon": "--target-epsilon",
    "clip": "--clip",
    "delta": "--delta",
    "max_epsilon": "--max-epsilon",
}


def _given(args: argparse.Namespace, options: dict[str, str]) -> list[str]:
    """The flags among ``options`` that the command line set."""
    return [
        flag for name, flag in options.items() if getattr(args, name, None) not in (None, False)
    ]


def _refuse_distributed_only(args: argparse.Namespace, mode: str) -> None:
    if getattr(args, "dropouts", None) is not None:
        raise ParameterValueError(
            f"--dropouts says how distributed DP counts dropouts: drop it with --dp {mode}"
        )


def _needs(given: list[str], what: str) -> ValueError:
    verb = "needs" if len(given) == 1 else "need"
    return ValueError(f"{', '.join(given)} {verb} {what}")


def _sampling(args: argparse.Namespace) -> CohortSampling:
    """The demo's own cohort sampling, as its --cohort-size and --sample-rate say."""
    if getattr(args, "cohort_size", None) is not None:
        return FixedSizeSampling(args.cohort_size)
    if getattr(args, "sample_rate", None) is not None:
        return PoissonSampling(args.sample_rate)
    return FullParticipation()


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


def _central(args: argparse.Namespace, task: DigitsTask) -> FeatureMods:
    _refuse_distributed_only(args, "central")
    if (args.noise_multiplier is None) == (args.target_epsilon is None):
        raise ParameterValueError(
            "--dp central needs exactly one of --noise-multiplier and --target-epsilon"
        )
    if args.target_quantile is not None and not args.adaptive_clip:
        raise _needs(["--target-quantile"], "--adaptive-clip")
    clip_on = ClipOn(args.clip_on or ClipOn.CLIENTS.value)
    secure = [flag for flag in ("secagg", "he") if getattr(args, flag, False)]
    if clip_on is ClipOn.SERVER and secure:
        raise ParameterValueError(
            f"--clip-on server needs every update one by one, but --{secure[0]} sums them "
            "without showing any: clip on the clients (the default)"
        )
    clip, delta = _or(args.clip, CLIP), _or(args.delta, DELTA)
    sampling, population = _sampling(args), task.num_nodes
    z = args.noise_multiplier
    if z is None:
        z = calibrate_noise_multiplier(
            target_epsilon=args.target_epsilon,
            delta=delta,
            make_event=lambda z: event_for_round(sampling, population, z),
            count=args.rounds,
            tol=CALIBRATION_TOL,
        )
    adaptive = (
        AdaptiveClipping(target_quantile=_or(args.target_quantile, TARGET_QUANTILE))
        if args.adaptive_clip
        else None
    )
    if adaptive is not None:
        _check_adaptive(adaptive, z, sampling.expected_size(population))
    if args.max_epsilon is not None:
        _check_budget(args.max_epsilon, event_for_round(sampling, population, z), delta)
    server = CentralDp(
        noise_multiplier=z,
        clipping_norm=clip,
        clip_on=clip_on,
        adaptive=adaptive,
        delta=delta,
        max_epsilon=args.max_epsilon,
    )
    client = (
        []
        if clip_on is ClipOn.SERVER
        else [adaptive_clipping_mod if adaptive else fixed_clipping_mod]
    )
    target = "" if args.target_epsilon is None else f" for epsilon {args.target_epsilon:g}"
    how = (
        f"adaptive from {clip:g} to quantile {adaptive.target_quantile:g}"
        if adaptive
        else f"{clip:g}"
    )
    return FeatureMods(
        client=client,
        server=[server],
        summary=(
            f"central DP (noise multiplier {z:.3g}{target} over {args.rounds} rounds, "
            f"clip {how} on the {clip_on.value}, delta {delta:g})"
        ),
    )


def _check_adaptive(adaptive: AdaptiveClipping, z: float, expected_cohort: float) -> None:
    """Adaptive clipping spends part of the noise on the count: refuse a split that cannot work."""
    count_noise = adaptive.count_noise(expected_cohort)
    if not 2 * count_noise > z:
        raise ParameterValueError(
            f"--adaptive-clip cannot keep a noise multiplier of {z:.3g}: with about "
            f"{expected_cohort:g} nodes per round the noise on the clipping count is "
            f"{count_noise:g}, and it must exceed half the noise multiplier; use a noise "
            f"multiplier below {2 * count_noise:g} (--noise-multiplier, or a larger "
            "--target-epsilon) or more nodes per round (--clients, --sample-rate)"
        )


def _check_budget(max_epsilon: float, event: PrivacyEvent, delta: float) -> None:
    """Refuse a budget that even the first round would exceed: nothing would train."""
    first = default_accountant(event).compose(event).get_epsilon(delta)
    if first > max_epsilon:
        raise ParameterValueError(
            f"--max-epsilon {max_epsilon:g} is below the epsilon of a single round "
            f"({first:.4g} at delta {delta:g}): no round could run; raise --max-epsilon, "
            "or add noise (--noise-multiplier, --target-epsilon)"
        )


def _local(args: argparse.Namespace, task: DigitsTask) -> FeatureMods:
    _refuse_distributed_only(args, "local")
    if args.target_epsilon is None:
        raise ParameterValueError("--dp local needs --target-epsilon (each round's epsilon)")
    central = _given(args, _CENTRAL_ONLY)
    if central:
        raise ParameterValueError(
            "--dp local calibrates its noise from --target-epsilon and clips on each client: "
            f"drop {' and '.join(central)}"
        )
    clip, delta = _or(args.clip, CLIP), _or(args.delta, DELTA)
    if args.max_epsilon is not None and args.max_epsilon < args.target_epsilon:
        raise ParameterValueError(
            f"--max-epsilon {args.max_epsilon:g} is below one round's epsilon "
            f"(--target-epsilon {args.target_epsilon:g}): no node could train a single round"
        )
    mod = LocalDpMod(
        clipping_norm=clip,
        epsilon=args.target_epsilon,
        delta=delta,
        max_epsilon=args.max_epsilon,
    )
    return FeatureMods(
        client=[mod],
        summary=(
            f"local DP (epsilon {args.target_epsilon:g} per round at delta {delta:g}, "
            f"clip {clip:g}, noise sigma {mod.sigma:.3g} per coordinate)"
        ),
    )


def _distributed(args: argparse.Namespace, task: DigitsTask) -> FeatureMods:
    if (args.noise_multiplier is None) == (args.target_epsilon is None):
        raise ParameterValueError(
            "--dp distributed needs exactly one of --noise-multiplier and --target-epsilon"
        )
    if args.clip_on is not None:
        raise ParameterValueError(
            "--dp distributed clips on the clients (the server sees only the noised sum): "
            "drop --clip-on"
        )
    if args.target_quantile is not None and not args.adaptive_clip:
        raise _needs(["--target-quantile"], "--adaptive-clip")
    if not getattr(args, "secagg", False):
        raise ParameterValueError("--dp distributed needs SecAgg+ (--secagg)")
    clip, delta = _or(args.clip, CLIP), _or(args.delta, DELTA)
    adaptive = (
        AdaptiveClipping(target_quantile=_or(args.target_quantile, TARGET_QUANTILE))
        if args.adaptive_clip
        else None
    )
    calibrated = args.noise_multiplier is None
    server = DistributedDp(
        noise_multiplier=args.noise_multiplier,
        target_epsilon=args.target_epsilon,
        rounds=args.rounds if calibrated else None,
        clipping_norm=clip,
        delta=delta,
        max_epsilon=args.max_epsilon,
        adaptive=adaptive,
        dropouts=DropoutPolicy(args.dropouts or DropoutPolicy.WORST_CASE.value),
    )
    noise = (
        f"calibrated for epsilon {args.target_epsilon:g} over {args.rounds} rounds"
        if calibrated
        else f"noise multiplier {args.noise_multiplier:.3g}"
    )
    how = f"adaptive from {clip:g}" if adaptive else f"{clip:g}"
    return FeatureMods(
        client=[DistributedDpMod()],
        server=[server],
        summary=(
            f"distributed DP (Skellam shares, {noise}, clip {how}, delta {delta:g}, "
            f"dropouts counted {server.dropouts.value}; the server sees only the noised sum)"
        ),
    )


MODES: dict[str, Callable[[argparse.Namespace, DigitsTask], FeatureMods]] = {
    "central": _central,
    "distributed": _distributed,
    "local": _local,
}


class DpFeature:
    """``--dp central|distributed|local`` and its options."""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("differential privacy")
        group.add_argument(
            "--dp",
            choices=sorted(MODES),
            default=None,
            help="central: noise the sum on the server (user-level DP-FedAvg); "
            "distributed: each client adds a share of discrete noise before SecAgg+ masks it, "
            "so the server sees only the noised sum; local: each client noises its own update",
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
            "--clip",
            type=_positive,
            default=None,
            help=f"L2 clipping norm of an update (default {CLIP:g})",
        )
        group.add_argument(
            "--clip-on",
            choices=[c.value for c in ClipOn],
            default=None,
            help=f"central DP: who clips the updates (default {ClipOn.CLIENTS.value})",
        )
        group.add_argument(
            "--adaptive-clip",
            action="store_true",
            help="central DP: adapt the clip to a quantile of the update norms (Andrew et al.)",
        )
        group.add_argument(
            "--target-quantile",
            type=_quantile,
            default=None,
            help="adaptive clipping: fraction of updates left unclipped "
            f"(default {TARGET_QUANTILE:g})",
        )
        group.add_argument(
            "--delta",
            type=_fraction,
            default=None,
            help=f"the delta of (epsilon, delta)-DP (default {DELTA:g})",
        )
        group.add_argument(
            "--dropouts",
            choices=[p.value for p in DropoutPolicy],
            default=None,
            help="distributed DP: size each client's noise for the fewest survivors SecAgg+ "
            f"allows (default {DropoutPolicy.WORST_CASE.value}), or for the expected cohort with "
            "epsilon counted from the survivors",
        )
        group.add_argument(
            "--max-epsilon",
            type=_positive,
            default=None,
            help="stop before a round would exceed this epsilon (local DP: per node)",
        )

    def mods(self, args: argparse.Namespace, task: DigitsTask) -> FeatureMods:
        if args.dp is None:
            if getattr(args, "dropouts", None) is not None:
                raise _needs(["--dropouts"], "--dp distributed")
            central, common = _given(args, _CENTRAL_ONLY), _given(args, _ANY_MODE)
            if central:
                raise _needs(central + common, "--dp central")
            if common:
                raise _needs(common, "--dp central, --dp distributed or --dp local")
            return FeatureMods()
        return MODES[args.dp](args, task)
