"""bench/dp.py runs end to end at a tiny size and checks its own results (no timings)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "--params", "2000", "--nodes", "3", "--steps", "20", "--repeats", "1", "--settle", "0",
    "--quiet", "--json",
]  # fmt: skip


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), *filter(None, [env.get("PYTHONPATH")])])
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "dp.py"), *TINY],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    parsed: dict[str, Any] = json.loads(done.stdout)
    return parsed


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
