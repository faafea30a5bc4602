"""bench/dp.py runs end to end at a tiny size and checks its own results (no timings)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

TINY = [
    "--params", "2000", "--nodes", "3", "--steps", "20", "--repeats", "1", "--settle", "0",
    "--sigmas", "30", "300", "--client-n", "12", "--quiet",
]  # fmt: skip


@pytest.fixture(scope="module")
def report(run_bench: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    return run_bench("dp", *TINY)


def test_the_report_has_every_part(report: dict[str, Any]) -> None:
    assert report["benchmark"] == "dp" and report["ok"] is True and report["failed"] == []
    assert set(report) >= {"round", "noise", "discrete", "distributed", "accountant", "environment"}
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


def test_discrete_rows_per_sigma_against_numpy(report: dict[str, Any]) -> None:
    sigmas = report["discrete"]["sigmas"]
    assert set(sigmas) == {"30", "300"}
    for sigma, row in sigmas.items():
        assert row["mu"] == int(sigma) ** 2 / 2
        assert set(row["results"]) == {
            "numpy_normal",
            "discrete_gaussian",
            "gaussian_table",
            "numpy_skellam",
            "skellam",
            "poisson_table",
        }
        assert row["results"]["numpy_normal"]["ratio"] == 1.0
        assert row["results"]["numpy_skellam"]["ratio"] == 1.0
        assert row["gaussian_vs_numpy"] > 0 and row["skellam_vs_numpy"] > 0
        # 2000 draws: the sampled variance is sigma^2 within 8 standard errors (0.032 each).
        assert abs(row["gaussian_variance_ratio"] - 1) < 0.25
        assert abs(row["skellam_variance_ratio"] - 1) < 0.25


def test_distributed_rows_against_secagg_masking_and_a_plain_aggregation(
    report: dict[str, Any],
) -> None:
    part = report["distributed"]
    assert set(part["results"]) == {
        "secagg_masking",
        "secagg_node",
        "distributed_dp",
        "distributed_dp_gaussian",
        "rotate",
        "conditional_round",
        "skellam_noise",
        "plain_aggregation",
        "decode",
    }
    results = part["results"]
    assert (
        results["secagg_masking"]["ratio"] == 1.0 and results["plain_aggregation"]["ratio"] == 1.0
    )
    assert part["padded"] == 2048 and part["clients"] == 12
    assert part["vs_secagg_masking"] > 0 and part["decode_vs_plain_aggregation"] > 0
    # The decoded update's noise is the calibrated one (the bench checks it within 6 sd).
    assert part["noise_ok"] is True
    assert abs(part["noise_error_ratio"] - 1) <= part["noise_tolerance"] < 0.25
