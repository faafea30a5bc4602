"""bench/secagg.py runs end to end at a tiny size and checks its own results (no timings)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

TINY = [
    "--params", "3000", "--client-n", "12", "--server-n", "30", "--server-params", "2000",
    "--round-n", "6", "--malicious-n", "6", "--repeats", "1", "--settle", "0", "--quiet",
]  # fmt: skip


@pytest.fixture(scope="module")
def report(run_bench: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    return run_bench("secagg", *TINY)


def test_the_report_has_every_part_and_its_limit(report: dict[str, Any]) -> None:
    assert report["benchmark"] == "secagg" and report["ok"] is True and report["failed"] == []
    client = report["client"]
    assert client["n"] == 12 and client["k"] >= 2 and 2 <= client["t"] <= client["k"]
    assert set(client["results"]) == {client["limit"], "client"}
    assert client["limit"] == f"limit_{client['k'] + 1}_prg"
    assert set(client["stages_s"]) == {"advertise-keys", "share-keys", "masked-input"}
    assert client["ratio"] > 0


def test_server_unmasking_is_exact_and_counts_its_expansions(report: dict[str, Any]) -> None:
    server = report["server"]
    assert server["exact"] is True
    assert server["survivors"] + server["dropped"] == 30 and server["dropped"] == 2  # 5% of 30
    assert server["expansions"] >= server["survivors"]
    assert server["results"]["unmask"]["peak_mb"] is not None


def test_whole_rounds_stay_within_the_quantization_bound(report: dict[str, Any]) -> None:
    rounds = report["round"]
    assert set(rounds) == {"6"}
    r = rounds["6"]
    assert r["within_bound"] is True and r["max_abs_error"] <= r["error_bound"] + 1e-6
    assert {"advertise-keys", "share-keys", "collect-masked-input", "unmask"} <= set(r["stages_s"])
    assert set(r["results"]) == {"plain_n6", "secagg_n6"}


def test_the_malicious_mode_is_measured_against_the_semi_honest_one(report: dict[str, Any]) -> None:
    m = report["malicious"]
    assert m["client_n"] == 12 and m["round_n"] == 6
    assert set(m["results"]) == {
        "client_semi-honest",
        "client_malicious",
        "client_malicious_same_k",
        "round_semi-honest_n6",
        "round_malicious_n6",
        "round_malicious_same_k_n6",
    }
    assert m["client_ratio"] > 0 and m["round_ratio"] > 0
    assert m["client_ratio_same_k"] > 0 and m["round_ratio_same_k"] > 0
    assert m["results"]["client_malicious"]["ratio"] == m["client_ratio"]
    assert m["results"]["round_malicious_same_k_n6"]["ratio"] == m["round_ratio_same_k"]
    # Same k: the malicious mode at the semi-honest (k, t), for the node and the round.
    assert m["k_t"]["malicious_same_k"] == m["k_t"]["semi-honest"]
    assert m["round_k_t"]["malicious_same_k"] == m["round_k_t"]["semi-honest"]
    k, t = m["k_t"]["malicious_same_k"]
    assert m["verifications"] == k + max(t, m["quorum"]["malicious_same_k"])  # k + max(t, q)
    assert m["quorum"]["semi-honest"] == 0
    assert set(m["cpu_s"]) == {name for name in m["results"]} | {"verify"}
    assert all(seconds > 0 for seconds in m["cpu_s"].values())
    assert set(m["client_stages_s"]["malicious"]) == {
        "advertise-keys", "share-keys", "masked-input", "consistency-check", "unmask"
    }  # fmt: skip
    assert set(m["client_stages_s"]["semi-honest"]) == {
        "advertise-keys", "share-keys", "masked-input", "unmask"
    }  # fmt: skip
