"""The main job: ``flowerpets demo``, its default composition, its table and its exit codes.

With no flag the demo runs what a careful deployment would (SecAgg+ with central
DP at a target epsilon on Poisson-sampled clients) and compares it with a plain
run; ``--pets none`` is plain FedAvg, which reaches 90% test accuracy in 10
rounds on 20 clients.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest

pytest.importorskip("sklearn")

from flowerpets.cli import main as flowerpets_main
from flowerpets.core import ClientMod, Context, Failure, FailureKind, Message, RoundRecord
from flowerpets.core.message import Error, ErrorCode
from flowerpets.examples.digits import demo
from flowerpets.examples.digits.apps import DigitsTask
from flowerpets.examples.digits.features import FeatureMods
from flowerpets.exceptions import RequestRefusedError

PLAIN = ("--pets", "none")


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``flowerpets demo *argv``, in this process: exit code, stdout, stderr."""
    capsys.readouterr()
    code = flowerpets_main(["demo", *argv])
    out, err = capsys.readouterr()
    return code, out, err


# -- plain FedAvg (--pets none) --------------------------------------------------------------------
@pytest.mark.parametrize("partition", ["iid", "dirichlet"])
def test_plain_fedavg_reaches_ninety_percent(
    partition: str, run_demo: Callable[..., dict[str, Any]]
) -> None:
    result = run_demo("--pets", "none", "--partition", partition)
    history = result["history"]
    assert isinstance(history, list) and len(history) == 10
    assert all(r["participants"] == 20 and not r["failures"] for r in history)
    accuracy = history[-1]["server_metrics"]["accuracy"]
    assert accuracy >= 0.90, f"{partition}: final accuracy {accuracy:.3f}"
    losses = [r["server_metrics"]["loss"] for r in history]
    assert losses[-1] < losses[0]
    assert result["baseline"] is None and result["server_view"] is None


def test_demo_samples_cohorts(run_demo: Callable[..., dict[str, Any]]) -> None:
    history = run_demo("--pets", "none", "--cohort-size", "5", "--rounds", "3")["history"]
    assert isinstance(history, list)
    assert [r["cohort_size"] for r in history] == [5, 5, 5]


def test_cli_prints_a_table_and_refuses_bad_arguments() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "flowerpets", "demo", *PLAIN, "--rounds", "2", "--clients", "5"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "round  nodes" in done.stdout and "final test accuracy" in done.stdout
    assert "train loss" in done.stdout  # the nodes report it when no DP withholds it
    assert "round 2/2" in done.stderr  # the progress bar
    bad = subprocess.run(
        [sys.executable, "-m", "flowerpets", "demo", "--clients", "0"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 2 and "must be >= 1" in bad.stderr
    clash = subprocess.run(
        [sys.executable, "-m", "flowerpets", "demo", "--secagg", "--he"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert clash.returncode == 2
    assert clash.stderr.strip().startswith("flowerpets demo: error: --secagg and --he")


# -- item 15: the default is the recommended composition ----------------------------------------
def test_the_command_runs_the_recommended_composition_by_default(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The defaults but a fixed noise multiplier (no calibration), 8 clients and 2 rounds.
    code, out, _ = run_cli(
        capsys, "--rounds", "2", "--clients", "8", "--noise-multiplier", "1", "--json"
    )
    assert code == 0
    result = json.loads(out)
    history = result["history"]
    epsilons = [r["train_metrics"]["epsilon"] for r in history]
    assert len(epsilons) == 2 and 0 < epsilons[0] < epsilons[1]  # central DP, every round
    assert all("train-loss" not in r["train_metrics"] for r in history)  # DP withholds it
    view = result["server_view"]  # SecAgg+ ran: a node sent masked words
    assert view is not None and view["round"] == 1
    assert all(isinstance(w, int) and 0 <= w < 2**32 for w in view["masked"])
    assert view["released"] != view["mean"]  # central DP noised the unmasked mean
    plain = result["baseline"]["history"]
    assert [r["cohort_size"] for r in plain] == [r["cohort_size"] for r in history]  # same seed
    assert all("epsilon" not in r["train_metrics"] for r in plain)
    assert plain[-1]["server_metrics"]["accuracy"] >= 0.85


def test_recommended_text_shows_the_server_view_the_budget_and_both_accuracies(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = run_cli(capsys, "--rounds", "2", "--clients", "8", "--noise-multiplier", "1")
    assert code == 0, out
    assert "the recommended composition (--pets none: plain FedAvg only)" in out
    assert "Poisson-sampled at rate 0.5" in out
    assert "what the server sees in round 1" in out
    assert re.search(r"what node \d+ sends the server +\[ *\d+ +\d+", out)
    assert "the mean of all" in out and "central DP noise (std" in out
    assert re.search(r"^ +2 .* \d+\.\d{3}$", out, re.M)  # round 2's epsilon, last column
    final = re.search(
        r"final test accuracy: (\S+) with SecAgg\+ and central DP, epsilon (\S+) at delta "
        r"1e-05; (\S+) without PETs",
        out,
    )
    assert final, out
    assert "nan" not in out and "train loss" not in out


@pytest.mark.slow
def test_the_default_demo_end_to_end() -> None:
    # Exactly what `python3 tasks.py demo` runs after set-up.
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "flowerpets", "demo"], capture_output=True, text=True, check=False
    )
    seconds = time.perf_counter() - started
    assert done.returncode == 0, done.stderr
    final = re.search(
        r"epsilon (\S+) at delta 1e-05; (\S+) without PETs", done.stdout.splitlines()[-1]
    )
    assert final, done.stdout
    epsilon, plain = float(final.group(1)), float(final.group(2))
    assert 7 < epsilon <= demo.RECOMMENDED_EPSILON  # calibrated to the target, within it
    assert plain >= 0.9
    assert "what the server sees in round 1" in done.stdout
    print(f"the default demo took {seconds:.1f} s")  # measured, not asserted


def test_pets_resolution() -> None:
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser, default_pets=demo.RECOMMENDED)
    default = demo.resolve(parser.parse_args([]))
    assert (default.composition, default.secagg, default.dp) == ("recommended", True, "central")
    assert default.target_epsilon == demo.RECOMMENDED_EPSILON
    assert default.sample_rate == demo.RECOMMENDED_SAMPLE_RATE
    tuned = demo.resolve(parser.parse_args(["--target-epsilon", "3", "--cohort-size", "5"]))
    assert (tuned.target_epsilon, tuned.sample_rate, tuned.cohort_size) == (3, None, 5)
    custom = demo.resolve(parser.parse_args(["--secagg"]))
    assert (custom.composition, custom.secagg, custom.dp) == ("custom", True, None)
    distributed = demo.resolve(parser.parse_args(["--dp", "distributed"]))
    assert (distributed.composition, distributed.secagg) == ("custom", True)  # SecAgg+ sums it
    assert demo.resolve(parser.parse_args(["--pets", "none"])).composition == "none"
    assert demo.resolve(default) is default  # resolving twice changes nothing
    library = argparse.ArgumentParser()
    demo.add_arguments(library)  # a library caller's default stays plain
    assert demo.resolve(library.parse_args([])).composition == "none"


# -- item 14: the table says what was measured, and only that ----------------------------------
def test_the_table_drops_what_was_not_measured() -> None:
    central = [
        RoundRecord(round=1, train_metrics={"epsilon": 1.5}, server_metrics={"accuracy": 0.5}),
        RoundRecord(round=2, error="stopped"),
    ]
    table = demo.format_table(central)
    header, first, second = table.splitlines()
    assert "train loss" not in header and header.split()[-1] == "epsilon"
    assert first.split()[-1] == "1.500" and "nan" not in table
    assert second.split()[3:5] == ["-", "-"]  # test loss and accuracy were not measured
    local = [RoundRecord(round=1, train_metrics={"dp-local-epsilon": 32.0, "train-loss": 0.3})]
    header, row = demo.format_table(local).splitlines()
    assert "train loss" in header and header.split()[-1] == "epsilon/node"
    assert row.split()[-1] == "32.000"


def test_local_dp_shows_its_composed_epsilon(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(
        capsys, "--dp", "local", "--target-epsilon", "32", "--rounds", "2", "--clients", "5"
    )
    assert code == 0
    table = out[out.index("round  nodes") :].splitlines()
    assert table[0].split()[-1] == "epsilon/node"
    assert float(table[1].split()[-1]) == pytest.approx(32.0, abs=1e-3)
    assert float(table[2].split()[-1]) > 32.0  # composed over the rounds
    assert "epsilon 52.5 per node at delta 1e-05" in out
    assert "nan" not in out


def test_a_budget_stop_reports_the_last_measured_accuracy(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # z = 1 with everyone: round 1 spends 4.38, round 2 would exceed 5.
    argv = ["--dp", "central", "--noise-multiplier", "1", "--max-epsilon", "5"]
    code, out, _ = run_cli(capsys, *argv, "--rounds", "3", "--clients", "5")
    assert code == 0
    assert "nan" not in out
    assert re.search(r"final test accuracy: 0\.\d{4} \(round 1, the last evaluated\)", out)
    assert re.search(r"^round 2: not run, the run stopped: privacy budget", out, re.M)


def test_he_needs_no_api_advice(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "--he", "--rounds", "1", "--clients", "3")
    assert code == 0
    assert "evaluate_sampling" not in out + err  # an API argument a CLI user cannot set
    assert "the nodes measure its accuracy on their test slices" in out
    row = out[out.index("round  nodes") :].splitlines()[1]
    assert 0 < float(row.split()[5]) <= 1  # the nodes' federated accuracy


# -- item 10: failed rounds are shown, and a run where every round failed exits 1 ---------------
class _Refusing:
    """A test-only PET switch: a client mod that refuses the train messages of some nodes."""

    def __init__(self, nodes: set[int] | None) -> None:
        self.nodes = nodes  # partition ids that refuse; None: every node

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        pass

    def mods(self, args: argparse.Namespace, task: DigitsTask) -> FeatureMods:
        def refuse(msg: Message, context: Context, call_next: Any) -> Message:
            pid = context.node_config["partition-id"]
            if msg.message_type == "train" and (self.nodes is None or pid in self.nodes):
                raise RequestRefusedError(f"partition {pid} refuses on purpose")
            return call_next(msg, context)

        mod: ClientMod = refuse
        return FeatureMods(client=[mod])


def _run_with(
    feature: _Refusing, monkeypatch: pytest.MonkeyPatch, *argv: str
) -> tuple[int, str, str]:
    monkeypatch.setattr(demo, "FEATURES", [feature])
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    code = demo.run(parser.parse_args([*argv, "--rounds", "2", "--clients", "4"]), out=out)
    return code, out.getvalue(), err.getvalue()


def test_a_run_where_every_round_failed_exits_1(monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, err = _run_with(_Refusing(None), monkeypatch)
    assert code == 1
    assert "every round failed, the model was never trained (round 1: " in err
    assert re.search(r"^round 1: failed, the model is unchanged: ", out, re.M)
    assert re.search(r"^round 2: failed", out, re.M)
    assert "the initial model's: every round failed" in out


def test_failed_nodes_are_counted_and_the_first_reason_shown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    code, out, _ = _run_with(_Refusing({1}), monkeypatch)
    assert code == 0
    rows = out[out.index("round  nodes") :].splitlines()[1:3]
    assert [row.split()[1:3] for row in rows] == [["3", "1"], ["3", "1"]]  # nodes, failed
    assert re.search(
        r"^round 1: 1 node\(s\) failed, the first: node 1 at .*partition 1 refuses on purpose",
        out,
        re.M,
    )


def test_failure_notes_name_the_count_and_the_first_reason() -> None:
    failure = Failure("train", Error(ErrorCode.REFUSED, "no"), FailureKind.ERROR_REPLY)
    records = [
        RoundRecord(round=1, failures={7: failure, 8: failure}, error="too few replies"),
        *(RoundRecord(round=r, failures={7: failure}) for r in range(2, 10)),
    ]
    notes = demo.failure_notes(records, {7: 0, 8: 1}.__getitem__)
    assert notes[0] == (
        "round 1: failed, the model is unchanged: too few replies; 2 node(s) failed, "
        "the first: node 0 at train: REFUSED: no"
    )
    assert len(notes) == demo.MAX_NOTES + 1 and notes[-1].startswith("... and 4 more")


def test_the_deploy_run_config_takes_no_abbreviations_and_stays_plain_by_default() -> None:
    from flowerpets.examples.digits import deploy

    with pytest.raises(ValueError, match="unrecognized arguments: --round 2"):
        deploy.demo_arguments({"demo-flags": "--round 2"})
    assert demo.resolve(deploy.demo_arguments({})).composition == demo.NONE
    recommended = demo.resolve(deploy.demo_arguments({"demo-flags": "--pets recommended"}))
    assert (recommended.secagg, recommended.dp) == (True, "central")
