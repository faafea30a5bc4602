"""bench/dp.py runs end to end at a tiny size and checks its own results (no timings)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

TINY = [
    "--params", "2000", "--nodes", "3", "--steps", "20", "--repeats", "1", "--settle", "0",
    "--quiet",
]  # fmt: skip


@pytest.fixture(scope="module")
def report(run_bench: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    return run_bench("dp", *TINY)


def test_the_report_has_every_part(report: dict[str, Any]) -> None:
    assert report["benchmark"] == "dp" and report["ok"] is True and report["failed"] == []
    assert set(report) >= {"round", "noise", "accountant", "environment"}
    assert report["config"]["params"] == 2000


def test_the_dp_round_matches_the_formula_and_has_a_baseline(report: dict[str, Any]) -> None:
    part = report["round"]
    assert part["exact"] is True and part["max_abs_error"] <= 1e-6
    assert set(part["results"]) == {"plain", "central_dp"}
    assert part["results"]["plain"]["ratio"] == 1.0 and part["overhead"] > 0


def test_noise_and_accountant_rows(report: dict[str, Any]) -> None:
    assert set(report["noise"]["results"]) == {
        "numpy_normal",
        "secure_noise",
        "secure_noise_1",
        "aes_ctr_keystream",
        "clip_update",
    }
    accountant = report["accountant"]
    assert set(accountant["results"]) == {"pld_cold", "rdp_cold", "pld_per_round", "rdp_per_round"}
    assert 0 < accountant["epsilon"]["pld"] <= accountant["epsilon"]["rdp"]
