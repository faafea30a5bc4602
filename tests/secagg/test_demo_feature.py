"""``--secagg`` in the digits demo: same accuracy as the plain run, through SecAgg+."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import pytest

pytest.importorskip("sklearn")

from flowerpets.examples.digits.pets.secagg import SecAggFeature
from flowerpets.secagg import SecAggPlus, secaggplus_mod


def test_secure_run_matches_the_plain_run(run_demo: Callable[..., dict[str, Any]]) -> None:
    common = ("--rounds", "5", "--clients", "10")
    plain = run_demo(*common, features=[SecAggFeature()])["history"]
    secure = run_demo(*common, "--secagg", features=[SecAggFeature()])["history"]
    for p, s in zip(plain, secure, strict=True):
        assert s["participants"] == 10 and not s["failures"]
        # Same data and seeds: only the quantization error separates the two runs.
        assert abs(s["server_metrics"]["accuracy"] - p["server_metrics"]["accuracy"]) <= 0.01
        assert s["train_metrics"]["train-loss"] == pytest.approx(
            p["train_metrics"]["train-loss"], abs=1e-4
        )
        assert s["train_metrics"]["secagg-clipped-nodes"] == 0
    assert secure[-1]["server_metrics"]["accuracy"] >= 0.88


def test_flags_become_mods_and_a_summary(monkeypatch: pytest.MonkeyPatch) -> None:
    feature = SecAggFeature()
    parser = argparse.ArgumentParser()
    feature.add_arguments(parser)
    task = argparse.Namespace(num_nodes=20)
    off = feature.mods(parser.parse_args([]), task)  # type: ignore[arg-type]
    assert not off.client and not off.server
    on = feature.mods(parser.parse_args(["--secagg", "--secagg-k", "4", "--secagg-t", "3"]), task)  # type: ignore[arg-type]
    assert on.client == [secaggplus_mod]
    (server,) = on.server
    assert isinstance(server, SecAggPlus) and (server.degree, server.threshold) == (4, 3)
    assert "k=4, t=3 for a cohort of 20" in on.summary
    found = feature.mods(parser.parse_args(["--secagg", "--secagg-dropout-rate", "0.2"]), task)  # type: ignore[arg-type]
    assert "dropout rate 0.2" in found.summary and "k=" in found.summary
    with pytest.raises(ValueError, match="go together"):
        feature.mods(parser.parse_args(["--secagg", "--secagg-k", "4"]), task)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="choose one"):
        feature.mods(argparse.Namespace(**vars(parser.parse_args(["--secagg"])), he=True), task)  # type: ignore[arg-type]
    with pytest.raises(SystemExit):
        parser.parse_args(["--secagg-dropout-rate", "1.5"])
