"""``flowerpets accountant``: numbers that match the accountants, one-line errors, exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from flowerpets.dp.accountant import (
    FixedSizeSampledGaussian,
    Neighbouring,
    PldAccountant,
    PoissonSampledGaussian,
    RdpAccountant,
)
from flowerpets.dp.cli import main
from tests.dp.conftest import refusal, run_json

PLAN = ("plan", "--population", "50", "--clients-per-round", "5")
SMALL_PLAN = ("--rounds", "2", "--noise-multiplier", "1", "--delta", "1e-5")


def test_epsilon_matches_the_accountants(capsys: pytest.CaptureFixture[str]) -> None:
    args = ("epsilon", "--noise-multiplier", "1.1", "--sample-rate", "0.05", "--steps", "200")
    result = run_json(capsys, *args, "--delta", "1e-5", "--accountant", "all")
    results = result["results"]
    assert isinstance(results, dict) and set(results) == {"pld", "rdp"}
    event = PoissonSampledGaussian(1.1, 0.05)
    assert results["pld"]["epsilon"] == PldAccountant().compose(event, 200).get_epsilon(1e-5)
    assert results["rdp"]["epsilon"] == RdpAccountant().compose(event, 200).get_epsilon(1e-5)
    assert results["pld"]["seconds"] >= 0
    assert main([*args, "--delta", "1e-5"]) == 0
    table = capsys.readouterr().out
    assert "accountant  epsilon" in table and "pld" in table and "rdp" not in table


def test_noise_reaches_the_target(capsys: pytest.CaptureFixture[str]) -> None:
    result = run_json(
        capsys,
        "noise",
        "--target-epsilon",
        "2",
        "--sample-rate",
        "0.02",
        "--steps",
        "300",
        "--delta",
        "1e-5",
        "--accountant",
        "rdp",
    )
    found = result["results"]["rdp"]  # type: ignore[index]
    z = found["noise_multiplier"]
    assert RdpAccountant().compose(PoissonSampledGaussian(z, 0.02), 300).get_epsilon(1e-5) <= 2.0
    assert found["epsilon"] <= 2.0


def test_plan_prints_epsilon_per_round_and_plots(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    plot = tmp_path / "eps.png"
    base = ("plan", "--population", "100", "--clients-per-round", "10", "--noise-multiplier", "1.5")
    result = run_json(
        capsys,
        *base,
        "--rounds",
        "8",
        "--delta",
        "1e-5",
        "--accountant",
        "rdp",
        "--plot",
        str(plot),
    )
    assert result["rounds"] == list(range(1, 9))
    series = result["epsilon"]["rdp"]  # type: ignore[index]
    event = PoissonSampledGaussian(1.5, 0.1)
    for rnd, value in zip(result["rounds"], series, strict=True):  # type: ignore[arg-type]
        assert value == pytest.approx(RdpAccountant().compose(event, rnd).get_epsilon(1e-5))
    assert series == sorted(series)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fixed = run_json(
        capsys,
        *base,
        "--rounds",
        "300",
        "--delta",
        "1e-5",
        "--sampling",
        "fixed",
        "--accountant",
        "rdp",
    )
    assert len(fixed["rounds"]) == 50 and fixed["rounds"][-1] == 300  # type: ignore[arg-type,index]
    expected = RdpAccountant(neighbouring=Neighbouring.REPLACE_ONE).compose(
        FixedSizeSampledGaussian(1.5, 10, 100), 300
    )
    assert fixed["epsilon"]["rdp"][-1] == pytest.approx(expected.get_epsilon(1e-5))  # type: ignore[index]
    # By default a fixed-size plan is accounted with PLD too (under replace-one).
    fixed = run_json(
        capsys, *base, "--rounds", "20", "--points", "2", "--delta", "1e-5", "--sampling", "fixed"
    )
    (name,) = fixed["epsilon"]  # type: ignore[misc]
    assert name == "pld"
    tight = PldAccountant(neighbouring=Neighbouring.REPLACE_ONE).compose(
        FixedSizeSampledGaussian(1.5, 10, 100), 20
    )
    assert fixed["epsilon"]["pld"][-1] == pytest.approx(tight.get_epsilon(1e-5))  # type: ignore[index]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            [
                "epsilon",
                "--noise-multiplier",
                "1",
                "--sample-rate",
                "0.1",
                "--steps",
                "10",
                "--delta",
                "2",
            ],
            "--delta: must be in (0, 1)",
        ),
        (
            [
                "epsilon",
                "--noise-multiplier",
                "-1",
                "--sample-rate",
                "0.1",
                "--steps",
                "10",
                "--delta",
                "1e-5",
            ],
            "must be > 0",
        ),
        (
            [
                "epsilon",
                "--noise-multiplier",
                "1",
                "--sample-rate",
                "1.5",
                "--steps",
                "10",
                "--delta",
                "1e-5",
            ],
            "must be in (0, 1]",
        ),
        (
            [
                "epsilon",
                "--noise-multiplier",
                "1",
                "--sample-rate",
                "0.1",
                "--steps",
                "0",
                "--delta",
                "1e-5",
            ],
            "integer >= 1",
        ),
        (
            [
                "epsilon",
                "--noise-multiplier",
                "x",
                "--sample-rate",
                "0.1",
                "--steps",
                "1",
                "--delta",
                "1e-5",
            ],
            "expected a number",
        ),
        (["epsilon", "--sample-rate", "0.1", "--steps", "1", "--delta", "1e-5"], "required"),
        (
            [
                "epsilon",
                "--noise-multiplier",
                "1",
                "--sample-rate",
                "0.1",
                "--steps",
                "1",
                "--delta",
                "1e-5",
                "--accountant",
                "gdp",
            ],
            "invalid choice",
        ),
        ([], "required"),
        (["bogus"], "invalid choice"),
        (  # an abbreviation of --accountant is not taken for it
            [*PLAN, *SMALL_PLAN, "--acc", "rdp"],
            "unrecognized arguments: --acc rdp",
        ),
        (  # matplotlib cannot write .txt: refused before any accounting
            [*PLAN, *SMALL_PLAN, "--plot", "eps.txt"],
            "--plot eps.txt: the file name must end in one of .",
        ),
        (
            [
                "plan",
                "--population",
                "5",
                "--clients-per-round",
                "6",
                "--rounds",
                "2",
                "--noise-multiplier",
                "1",
                "--delta",
                "1e-5",
            ],
            "exceeds --population",
        ),
    ],
)
def test_bad_arguments_give_one_line_and_status_two(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    err = refusal(main, argv, capsys)
    assert message in err, err


def test_plan_says_where_it_wrote_the_plot(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    plot = tmp_path / "eps.pdf"
    argv = [*PLAN, "--rounds", "3", "--noise-multiplier", "1", "--delta", "1e-5"]
    assert main([*argv, "--accountant", "rdp", "--plot", str(plot)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"plot written to {plot}"
    assert plot.read_bytes()[:5] == b"%PDF-"


def test_the_command_runs_as_a_program() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "flowerpets.dp.cli",
            "epsilon",
            "--noise-multiplier",
            "1",
            "--sample-rate",
            "1",
            "--steps",
            "4",
            "--delta",
            "1e-5",
            "--json",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["event"]["kind"] == "FullParticipationGaussian"
    bad = subprocess.run(
        [sys.executable, "-m", "flowerpets.dp.cli", "epsilon", "--delta", "0"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1


# -- ledger: what each population of a run store has spent ---------------------------------------
def _store_with_two_populations(path: Path) -> None:
    from flowerpets.dp.accountant import FullParticipationGaussian
    from flowerpets.dp.central._durable import spend_entry
    from flowerpets.store import RunStore

    full, poisson = FullParticipationGaussian(2.0), PoissonSampledGaussian(1.1, 0.1)
    with RunStore(path) as store:
        for run_id, event, rounds in (("a", full, 2), ("b", poisson, 3)):
            with store.start_run(run_id, config={}, population_id="hospital") as writer:
                for rnd in range(1, rounds + 1):
                    writer.record_spend(spend_entry(event, delta=1e-5, accountant="pld"), round=rnd)
        with store.start_run("c", config={}, population_id="clinic"):
            pass


def test_ledger_composes_every_run_of_each_population(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from flowerpets.dp.accountant import FullParticipationGaussian

    path = tmp_path / "runs.db"
    _store_with_two_populations(path)
    result = run_json(capsys, "ledger", "--store", str(path))
    populations = result["populations"]
    assert isinstance(populations, dict) and set(populations) == {"hospital", "clinic"}
    hospital = populations["hospital"]
    both = PldAccountant().compose(FullParticipationGaussian(2.0), 2)
    both.compose(PoissonSampledGaussian(1.1, 0.1), 3)
    assert hospital["epsilon"] == both.get_epsilon(1e-5)
    assert (hospital["runs"], hospital["events"], hospital["delta"]) == (["a", "b"], 5, 1e-5)
    assert [e["count"] for e in hospital["distinct_events"]] == [2, 3]
    assert populations["clinic"]["events"] == 0 and populations["clinic"]["epsilon"] == 0.0
    looser = run_json(capsys, "ledger", "--store", str(path), "--delta", "1e-3")
    assert looser["populations"]["hospital"]["epsilon"] == both.get_epsilon(1e-3)  # type: ignore[index]
    assert main(["ledger", "--store", str(path)]) == 0
    table = capsys.readouterr().out
    row = next(line for line in table.splitlines() if line.startswith("hospital"))
    assert row.split() == [
        "hospital",
        "a,",
        "b",
        "5",
        "pld",
        "1e-05",
        f"{both.get_epsilon(1e-5):.6g}",
    ]


def test_ledger_refuses_a_missing_or_damaged_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import sqlite3

    assert main(["ledger", "--store", str(tmp_path / "none.db")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert not (tmp_path / "none.db").exists()  # never created by a reader
    path = tmp_path / "runs.db"
    _store_with_two_populations(path)
    with sqlite3.connect(path) as db:  # an entry cut out of the hash chain
        db.execute("DELETE FROM privacy_ledger WHERE population_id = 'hospital' AND seq = 2")
    assert main(["ledger", "--store", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "hospital" in err
