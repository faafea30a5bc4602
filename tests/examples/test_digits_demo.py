"""The main job: the digits federation reaches 90% test accuracy in 10 rounds on 20 clients."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest

pytest.importorskip("sklearn")


@pytest.mark.parametrize("partition", ["iid", "dirichlet"])
def test_demo_defaults_reach_ninety_percent(
    partition: str, run_demo: Callable[..., dict[str, Any]]
) -> None:
    history = run_demo("--partition", partition)["history"]
    assert isinstance(history, list) and len(history) == 10
    assert all(r["participants"] == 20 and not r["failures"] for r in history)
    accuracy = history[-1]["server_metrics"]["accuracy"]
    assert accuracy >= 0.90, f"{partition}: final accuracy {accuracy:.3f}"
    losses = [r["server_metrics"]["loss"] for r in history]
    assert losses[-1] < losses[0]


def test_demo_samples_cohorts(run_demo: Callable[..., dict[str, Any]]) -> None:
    history = run_demo("--cohort-size", "5", "--rounds", "3")["history"]
    assert isinstance(history, list)
    assert [r["cohort_size"] for r in history] == [5, 5, 5]


def test_cli_prints_a_table_and_refuses_bad_arguments() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "flowerpets", "demo", "--rounds", "2", "--clients", "5"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "round  nodes" in done.stdout and "final test accuracy" in done.stdout
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
