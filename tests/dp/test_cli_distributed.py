"""``flowerpets accountant distributed-epsilon`` and ``distributed-noise``: the API's numbers.

Every value the commands print is checked against the same computation done
with :mod:`flowerpets.dp.accountant` directly (the events built by
``from_pipeline``, the accountant ``default_accountant`` picks,
``calibrate_distributed_noise``), and the worked example of ``docs/dp.md``.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import pytest

from flowerpets.core.sampling import FixedSizeSampling, PoissonSampling
from flowerpets.dp.accountant import (
    DistributedDiscreteGaussianEvent,
    DistributedEvent,
    DropoutPolicy,
    Neighbouring,
    RdpAccountant,
    SkellamEvent,
    calibrate_distributed_noise,
)
from flowerpets.dp.cli import main
from flowerpets.dp.distributed import Mechanism
from flowerpets.dp.distributed._plan import WRAP_LIMIT, Plan, plan
from tests.dp.conftest import refusal, run_json

DELTA = 1e-5
BETA = math.exp(-0.5)
# docs/dp.md's example: 100 rounds, 100 clients expected, SecAgg+'s threshold 70, 2^16 dimensions.
PIPELINE = {"clip": 1.0, "scale": 1e3, "dimension": 2**16, "beta": BETA}
RUN = (
    *("--clients-per-round", "100", "--min-clients", "70", "--clip", "1"),
    *("--dimension", str(2**16), "--beta", str(BETA), "--rounds", "100", "--delta", "1e-5"),
)


def calibrated(**changes: object) -> float:
    """``calibrate_distributed_noise`` for docs/dp.md's example, with ``changes``."""
    example: dict[str, object] = {
        "target_epsilon": 8.0,
        "delta": DELTA,
        "rounds": 100,
        "expected_clients": 100,
        "min_clients": 70,
        **PIPELINE,
    }
    return calibrate_distributed_noise(**{**example, **changes})  # type: ignore[arg-type]


def epsilon(event: DistributedEvent, rounds: int = 100) -> float:
    return (
        RdpAccountant(neighbouring=Neighbouring.ZERO_OUT).compose(event, rounds).get_epsilon(DELTA)
    )


def test_noise_is_the_calibration_of_the_docs_example(capsys: pytest.CaptureFixture[str]) -> None:
    result = run_json(capsys, "distributed-noise", "--target-epsilon", "8", "--scale", "1e3", *RUN)
    share = calibrated()
    assert result["local_variance"] == share
    assert share == pytest.approx(592007.2, abs=0.1)  # the figure docs/dp.md prints
    assert result["clients_counted"] == 70 and result["accountant"] == "rdp"
    # Worst case: the same epsilon with every client surviving as with only 70, below the target.
    reached = result["epsilon_by_survivors"]
    assert isinstance(reached, dict) and set(reached) == {"100", "70"}
    event = SkellamEvent.from_pipeline(**PIPELINE, local_variance=share, clients_in_sum=70)
    assert reached["100"] == reached["70"] == {"server": epsilon(event)}
    assert 7.99 < reached["70"]["server"] <= 8.0
    assert main(["distributed-noise", "--target-epsilon", "8", "--scale", "1e3", *RUN]) == 0
    text = capsys.readouterr().out
    assert "70 shares counted: 592007" in text and "survivors  epsilon against the server" in text


def test_epsilon_of_a_given_share_counts_the_policys_shares(
    capsys: pytest.CaptureFixture[str],
) -> None:
    share = "592007.2"
    base = ("distributed-epsilon", "--local-variance", share, "--scale", "1e3", *RUN)
    worst = run_json(capsys, *base, "--survivors", "93")
    event = SkellamEvent.from_pipeline(**PIPELINE, local_variance=592007.2, clients_in_sum=70)
    assert worst["epsilon"] == {"server": epsilon(event)}
    assert worst["epsilon"]["server"] == pytest.approx(7.9986, abs=1e-4)  # type: ignore[index]
    assert (worst["survivors"], worst["clients_counted"]) == (93, 70)
    assert worst["event"]["kind"] == "SkellamEvent"  # type: ignore[index]
    assert worst["event"]["l2_sensitivity"] == event.l2_sensitivity  # type: ignore[index]
    # Counting the survivors: 93 shares are more noise, so less epsilon; only 70 are as many.
    survivors = run_json(capsys, *base, "--survivors", "93", "--dropout", "survivors")
    counted = SkellamEvent.from_pipeline(**PIPELINE, local_variance=592007.2, clients_in_sum=93)
    assert survivors["epsilon"] == {"server": epsilon(counted)}
    assert survivors["epsilon"]["server"] < worst["epsilon"]["server"]  # type: ignore[index]
    fewest = run_json(capsys, *base, "--survivors", "70", "--dropout", "survivors")
    assert fewest["epsilon"] == worst["epsilon"]


@pytest.mark.parametrize(
    ("name", "kind"),
    [("skellam", SkellamEvent), ("discrete-gaussian", DistributedDiscreteGaussianEvent)],
)
def test_a_noise_multiplier_sets_the_share_for_the_counted_clients(
    capsys: pytest.CaptureFixture[str],
    name: str,
    kind: type[SkellamEvent] | type[DistributedDiscreteGaussianEvent],
) -> None:
    result = run_json(
        capsys,
        "distributed-epsilon",
        *("--noise-multiplier", "6", "--scale", "1e3", "--mechanism", name),
        *RUN,
    )
    probe = kind.from_pipeline(**PIPELINE, local_variance=0.0, clients_in_sum=70)
    event = probe.with_noise_multiplier(6.0)
    assert result["local_variance"] == event.local_variance
    assert result["noise_multiplier"] == pytest.approx(6.0)
    assert result["event"]["kind"] == kind.__name__  # type: ignore[index]
    assert result["epsilon"] == {"server": epsilon(event)}


def planned(z: float, *, bits: int = 24, planned: int = 70) -> Plan:
    """DistributedDp's plan for the example's cohort (100 clients, 2^16 parameters)."""
    return plan(
        noise_multiplier=z,
        dimension=2**16,
        beta=BETA,
        cohort=100,
        planned=planned,
        modulus_bits=bits,
        mechanism=Mechanism.SKELLAM,
        max_wrap=WRAP_LIMIT,
    )


def test_bits_take_distributed_dps_scale_and_sampling_amplifies_only_against_others(
    capsys: pytest.CaptureFixture[str],
) -> None:
    sampled = ("--sampling", "fixed", "--population", "1000")
    result = run_json(
        capsys, "distributed-epsilon", "--noise-multiplier", "6", "--bits", "24", *RUN, *sampled
    )
    chosen = planned(6.0)
    assert result["scale"] == chosen.units and result["bits"] == 24
    assert result["local_variance"] == chosen.share
    event = SkellamEvent.from_pipeline(
        **{**PIPELINE, "scale": chosen.units},
        local_variance=chosen.share,
        clients_in_sum=70,
        sampling=FixedSizeSampling(100),
        population=1000,
    )
    assert result["noise_multiplier"] == pytest.approx(6.0)
    found = result["epsilon"]
    assert isinstance(found, dict) and set(found) == {"server", "others"}
    assert found["server"] == epsilon(event.unamplified())
    assert found["others"] == epsilon(event)
    assert found["others"] < found["server"]


def test_noise_for_bits_is_distributed_dps_plan_within_the_target(
    capsys: pytest.CaptureFixture[str],
) -> None:
    result = run_json(
        capsys,
        "distributed-noise",
        *("--target-epsilon", "8", "--bits", "24", "--dropout", "survivors"),
        *RUN,
        *("--sampling", "poisson", "--population", "2000"),
    )
    scale, share, z = result["scale"], result["local_variance"], result["noise_multiplier"]
    assert isinstance(scale, float) and isinstance(share, float) and isinstance(z, float)
    # The plan DistributedDp makes for that noise multiplier: its scale, its share...
    chosen = planned(z, planned=100)
    assert scale == pytest.approx(chosen.units, rel=1e-6)
    assert share == pytest.approx(chosen.share, rel=1e-6)
    # ...with no more noise than the target needs at that scale (within the search's tolerance).
    needed = calibrated(
        scale=scale,
        dropout=DropoutPolicy.SURVIVORS,
        sampling=PoissonSampling(0.05),
        population=2000,
    )
    assert needed <= share <= needed * 1.01
    # Counting survivors: fewer of them (70) overspend the target, against others too.
    reached = result["epsilon_by_survivors"]
    assert 7.9 < reached["100"]["others"] <= 8.0 < reached["70"]["others"]  # type: ignore[index]
    assert reached["100"]["server"] > reached["100"]["others"]  # type: ignore[index]


def test_bits_predict_the_scale_and_epsilon_of_a_distributed_dp_run(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from flowerpets.examples.digits.demo import add_arguments, build_apps
    from flowerpets.simulation import run_simulation

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    flags = ["--secagg", "--dp", "distributed", "--noise-multiplier", "1.3", "--rounds", "2"]
    args = parser.parse_args(flags)
    apps = build_apps(args)
    run = run_simulation(apps.server_app, apps.client_app, args.clients, seed=0)
    metrics = run.history.rounds[-1].train_metrics
    dimension = sum(a.size for a in apps.task.model.init_params(np.random.default_rng(0)).values())
    predicted = run_json(
        capsys,
        "distributed-epsilon",
        *("--noise-multiplier", "1.3", "--bits", "32", "--clip", "1", "--rounds", "2"),
        *("--clients-per-round", str(args.clients), "--delta", "1e-5"),
        *("--min-clients", str(int(metrics["dp-counted-clients"])), "--dimension", str(dimension)),
    )
    assert predicted["scale"] == metrics["dp-scale"]
    assert predicted["epsilon"] == {"server": metrics["epsilon"]}


REFUSED = [
    (["distributed-epsilon", "--local-variance", "5", "--bits", "20", *RUN], "give --scale"),
    (
        ["distributed-epsilon", "--noise-multiplier", "1", "--scale", "1", "--bits", "2", *RUN],
        "not allowed with argument",
    ),
    (["distributed-epsilon", "--scale", "10", *RUN], "one of the arguments"),
    (
        [
            "distributed-epsilon",
            "--noise-multiplier",
            "1",
            "--scale",
            "10",
            *RUN,
            "--survivors",
            "50",
        ],
        "--survivors 50 must be between --min-clients 70",
    ),
    (
        [
            "distributed-noise",
            "--target-epsilon",
            "1",
            "--scale",
            "10",
            *RUN,
            "--min-clients",
            "101",
        ],
        "--min-clients 101 exceeds --clients-per-round 100",
    ),
    (
        [
            "distributed-noise",
            "--target-epsilon",
            "1",
            "--scale",
            "10",
            *RUN,
            "--population",
            "9",
        ],
        "--population goes with --sampling",
    ),
    (
        [
            "distributed-noise",
            "--target-epsilon",
            "1",
            "--scale",
            "10",
            *RUN,
            "--sampling",
            "fixed",
        ],
        "--population goes with --sampling",
    ),
    (
        ["distributed-noise", "--target-epsilon", "1", "--bits", "4", *RUN],
        "no scale keeps a sum of 100 inputs",
    ),
    (
        ["distributed-noise", "--target-epsilon", "1", "--scale", "10", *RUN, "--beta", "1"],
        "--beta: must be in [0, 1)",
    ),
    (
        [
            "distributed-noise",
            "--target-epsilon",
            "1",
            "--scale",
            "10",
            *RUN,
            "--mechanism",
            "gauss",
        ],
        "invalid choice",
    ),
]


def test_bad_distributed_arguments_give_one_line_and_status_two(
    capsys: pytest.CaptureFixture[str],
) -> None:
    for argv, message in REFUSED:
        err = refusal(main, argv, capsys)
        assert message in err, (argv, err)


def test_ledger_shows_a_distributed_run_and_composes_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from flowerpets.dp.central._durable import spend_entry
    from flowerpets.dp.distributed._mod import DistributedDp
    from flowerpets.store import RunStore

    event = SkellamEvent.from_pipeline(**PIPELINE, local_variance=592007.2, clients_in_sum=70)
    entry = spend_entry(
        event, delta=DELTA, accountant="rdp", mechanism=DistributedDp.mechanism_name
    )
    with (
        RunStore(tmp_path / "runs.db") as store,
        store.start_run("d", config={}, population_id="clinics") as writer,
    ):
        for rnd in (1, 2, 3):
            writer.record_spend(entry, round=rnd)
    result = run_json(capsys, "ledger", "--store", str(tmp_path / "runs.db"))
    clinics = result["populations"]["clinics"]  # type: ignore[index]
    assert clinics["epsilon"] == epsilon(event, rounds=3)
    (shown,) = clinics["distinct_events"]
    assert shown["kind"] == "SkellamEvent" and shown["count"] == 3
    assert shown["l2_sensitivity"] == event.l2_sensitivity
    assert shown["clients_in_sum"] == 70 and shown["neighbouring"] == "zero-out"
