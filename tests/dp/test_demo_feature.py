"""The digits demo's ``--dp`` switch: flags to mods by dict dispatch, calibration, clear errors."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import pytest

pytest.importorskip("sklearn")

from flowerpets.dp import CentralDp, ClipOn, LocalDpMod, adaptive_clipping_mod, fixed_clipping_mod
from flowerpets.dp.accountant import PldAccountant, PoissonSampledGaussian
from flowerpets.examples.digits.pets import dp as dp_feature


class Task:
    num_nodes = 20


def parse(*argv: str) -> argparse.Namespace:
    # Only the demo options the feature reads, plus the feature's own.
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--cohort-size", type=int, default=None)
    parser.add_argument("--sample-rate", type=float, default=None)
    dp_feature.DpFeature().add_arguments(parser)
    return parser.parse_args(argv)


def mods(*argv: str) -> dp_feature.FeatureMods:
    return dp_feature.DpFeature().mods(parse(*argv), Task())  # type: ignore[arg-type]


def test_off_by_default() -> None:
    off = mods()
    assert list(off.client) == [] and list(off.server) == [] and off.summary == ""


def test_central_with_a_noise_multiplier() -> None:
    on = mods("--dp", "central", "--noise-multiplier", "1.5", "--clip", "0.5", "--max-epsilon", "9")
    (server,) = on.server
    assert isinstance(server, CentralDp)
    assert (server.noise_multiplier, server.clipping_norm, server.max_epsilon) == (1.5, 0.5, 9.0)
    assert list(on.client) == [fixed_clipping_mod]
    assert "central DP" in on.summary and "clip 0.5" in on.summary


def test_central_calibrates_to_the_target_for_the_demo_sampling() -> None:
    on = mods("--dp", "central", "--target-epsilon", "4", "--rounds", "5", "--sample-rate", "0.5")
    (server,) = on.server
    assert isinstance(server, CentralDp)
    spent = PldAccountant().compose(PoissonSampledGaussian(server.noise_multiplier, 0.5), 5)
    assert 3.9 <= spent.get_epsilon(1e-5) <= 4.0


def test_central_variants_pick_their_mods() -> None:
    adaptive = mods("--dp", "central", "--noise-multiplier", "1", "--adaptive-clip")
    assert list(adaptive.client) == [adaptive_clipping_mod]
    (server,) = adaptive.server
    assert isinstance(server, CentralDp) and server.adaptive is not None
    on_server = mods("--dp", "central", "--noise-multiplier", "1", "--clip-on", "server")
    assert list(on_server.client) == []
    assert on_server.server[0].clip_on is ClipOn.SERVER  # type: ignore[attr-defined]


def test_local() -> None:
    on = mods("--dp", "local", "--target-epsilon", "4", "--clip", "0.3", "--delta", "1e-6")
    (client,) = on.client
    assert isinstance(client, LocalDpMod) and list(on.server) == []
    assert (client.epsilon, client.delta, client.clipping_norm) == (4.0, 1e-6, 0.3)
    assert "local DP" in on.summary


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--dp", "central"], "exactly one of"),
        (["--dp", "central", "--noise-multiplier", "1", "--target-epsilon", "3"], "exactly one of"),
        (["--dp", "local"], "--target-epsilon"),
        (["--dp", "local", "--target-epsilon", "3", "--adaptive-clip"], "drop"),
    ],
)
def test_inconsistent_flags_are_refused(argv: list[str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        mods(*argv)


@pytest.mark.parametrize(
    "argv",
    [["--dp", "global"], ["--delta", "2"], ["--clip", "0"], ["--target-quantile", "1.5"]],
)
def test_bad_values_are_argparse_errors(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        parse(*argv)


def test_a_short_demo_run_reports_epsilon(run_demo: Callable[..., dict[str, Any]]) -> None:
    argv = ["--dp", "central", "--noise-multiplier", "2", "--rounds", "2", "--clients", "5"]
    history = run_demo(*argv, features=[dp_feature.DpFeature()])["history"]
    epsilons = [r["train_metrics"]["epsilon"] for r in history]
    assert len(epsilons) == 2 and 0 < epsilons[0] < epsilons[1]


def test_local_dp_under_secagg_trains(run_demo: Callable[..., dict[str, Any]]) -> None:
    # Issue 9, item 10: every round failed (LocalDpMod drops the loss SecAgg+ was told to sum).
    from flowerpets.examples.digits.pets.secagg import SecAggFeature

    argv = ["--dp", "local", "--target-epsilon", "32", "--secagg", "--rounds", "2"]
    history = run_demo(*argv, "--clients", "6", features=[dp_feature.DpFeature(), SecAggFeature()])[
        "history"
    ]
    assert len(history) == 2
    for record in history:
        assert record["error"] is None and record["participants"] == 6


def parse_secagg(*argv: str) -> argparse.Namespace:
    args = parse(*argv)
    args.secagg = True  # the demo's resolve() turns it on for --dp distributed
    return args


def test_distributed_builds_both_mods() -> None:
    from flowerpets.dp import DistributedDp, DistributedDpMod
    from flowerpets.dp.accountant import DropoutPolicy

    args = parse_secagg("--dp", "distributed", "--target-epsilon", "8", "--clip", "2")
    on = dp_feature.DpFeature().mods(args, Task())  # type: ignore[arg-type]
    (server,) = on.server
    (client,) = on.client
    assert isinstance(server, DistributedDp) and isinstance(client, DistributedDpMod)
    assert (server.target_epsilon, server.rounds, server.clipping_norm) == (8.0, 10, 2.0)
    assert "distributed DP" in on.summary and server.dropouts is DropoutPolicy.WORST_CASE
    args = parse_secagg("--dp", "distributed", "--noise-multiplier", "1", "--dropouts", "survivors")
    (server,) = dp_feature.DpFeature().mods(args, Task()).server  # type: ignore[arg-type]
    assert server.dropouts is DropoutPolicy.SURVIVORS  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("argv", "secagg", "match"),
    [
        (["--dp", "distributed"], True, "exactly one of"),
        (["--dp", "distributed", "--noise-multiplier", "1"], False, "SecAgg"),
        (["--dp", "distributed", "--noise-multiplier", "1", "--clip-on", "server"], True, "drop"),
        (
            ["--dp", "distributed", "--noise-multiplier", "1", "--target-quantile", "0.3"],
            True,
            "--adaptive-clip",
        ),
        (["--dp", "central", "--noise-multiplier", "1", "--dropouts", "survivors"], True, "drop"),
        (["--dp", "local", "--target-epsilon", "3", "--dropouts", "survivors"], False, "drop"),
        (["--dropouts", "survivors"], False, "--dp distributed"),
    ],
)
def test_distributed_refuses_what_it_cannot_run(argv: list[str], secagg: bool, match: str) -> None:
    args = parse(*argv)
    args.secagg = secagg
    with pytest.raises(ValueError, match=match):
        dp_feature.DpFeature().mods(args, Task())  # type: ignore[arg-type]


def test_distributed_dp_under_secagg_trains_and_reports_epsilon(
    run_demo: Callable[..., dict[str, Any]],
) -> None:
    from flowerpets.examples.digits.pets.secagg import SecAggFeature

    argv = ["--dp", "distributed", "--noise-multiplier", "1", "--secagg", "--rounds", "2"]
    history = run_demo(*argv, "--clients", "6", features=[dp_feature.DpFeature(), SecAggFeature()])[
        "history"
    ]
    assert len(history) == 2
    epsilons = [r["train_metrics"]["epsilon"] for r in history]
    assert 0 < epsilons[0] < epsilons[1]
    for record in history:
        assert record["error"] is None and record["participants"] == 6
