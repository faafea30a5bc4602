"""bench/store.py runs, reports what its docstring promises, and checks what it stored."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

PARTS = {"encode", "digest", "write", "commit", "collect", "checkpoint"}


def test_store_bench_reports_each_size_against_the_limit(
    run_bench: Callable[..., dict[str, Any]],
) -> None:
    report = run_bench("store", "--params", "1000", "5000", "--repeats", "2", "--settle", "0")
    assert report["benchmark"] == "store" and report["ok"] and report["failed"] == []
    assert set(report["sizes"]) == {"1000", "5000"}
    for params, size in report["sizes"].items():
        assert size["params"] == int(params) and size["bytes"] == 4 * int(params)
        assert size["exact"] is True
        assert set(size["results"]) == {"limit", "limit_in_place", "commit_round"}
        for result in size["results"].values():
            assert len(result["times_s"]) == 2
        assert size["results"]["limit"]["ratio"] == 1.0
        assert set(size["parts_s"]) == PARTS == set(size["parts_in_limits"])
        assert size["ratio"] > 0 and size["ratio_before_checkpoint"] > 0 and size["ratio_mean"] > 0
        assert size["ratio_in_place"] > 0
