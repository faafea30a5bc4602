"""The benchmarks run, report what they promise, and check their own results.

No wall-clock assertions: the machines that run the tests are too noisy for
that. These tests only make sure a benchmark still works end to end (so a
change to the core cannot silently break it) and that its self-check bites.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np
import pytest

SMALL = ["--nodes", "4", "--params", "1000", "--repeats", "1", "--settle", "0"]
CASES = {
    "numpy_loop",
    "numpy_loop_f64",
    "numpy_average",
    "numpy_tensordot",
    "numpy_tensordot_f32",
    "weighted_sum",
    "grid_only",
    "round",
    "round_copy",
}
EPS32 = float(np.finfo(np.float32).eps)


@pytest.fixture(scope="module")
def report(run_bench: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    return run_bench("core_round", *SMALL)


def test_core_round_json_has_the_documented_keys(report: dict[str, Any]) -> None:
    for key in (
        "benchmark",
        "config",
        "limit",
        "limit_candidates",
        "memory_metric",
        "results",
        "ratios",
        "ratios_same_arithmetic",
        "verification",
        "environment",
    ):
        assert key in report, key
    assert report["benchmark"] == "core_round"
    assert report["config"]["nodes"] == 4
    assert report["config"]["params"] == 1000
    assert report["config"]["repeats"] == 1
    assert set(report["results"]) == CASES
    for name, result in report["results"].items():
        assert set(result) >= {"median_s", "times_s", "ratio", "peak_mb"}, name
        assert len(result["times_s"]) == 1, name
        assert result["median_s"] > 0, name
        assert result["peak_mb"] >= 0, name
    assert set(report["ratios"]) == {"round", "round_copy", "weighted_sum"}
    assert set(report["ratios_same_arithmetic"]) == {"round", "round_copy", "weighted_sum"}


def test_core_round_limit_is_the_fastest_float64_numpy_way(report: dict[str, Any]) -> None:
    candidates = report["limit_candidates"]
    assert "numpy_tensordot_f32" not in candidates  # float32 accumulation
    medians = {name: report["results"][name]["median_s"] for name in candidates}
    assert report["limit"] == min(medians, key=lambda name: medians[name])
    assert report["results"][report["limit"]]["ratio"] == pytest.approx(1.0)


def test_core_round_aggregate_equals_the_numpy_limit(report: dict[str, Any]) -> None:
    verification = report["verification"]
    assert verification["ok"] is True
    assert verification["failed"] == []
    assert verification["reference"] == report["limit"]
    for name in ("round", "round_copy", "weighted_sum"):
        check = verification["checks"][name]
        assert check["ok"] is True, name
        # The round's model is float32: it may differ from the float64 mean by rounding only.
        assert check["max_rel_diff"] <= 2 * EPS32, name
    sums = verification["checksums"]
    for name in ("round", "round_copy"):
        assert sums[name]["sum"] == pytest.approx(sums["limit"]["sum"], rel=1e-5, abs=1e-6)
        assert sums[name]["sum_sq"] == pytest.approx(sums["limit"]["sum_sq"], rel=1e-5)


def test_core_round_prints_a_table_without_json(
    bench_process: Callable[..., subprocess.CompletedProcess[str]],
) -> None:
    done = bench_process("core_round", *SMALL, "--quiet")
    header = done.stdout.splitlines()[2].split()
    assert header == ["name", "median", "s", "x", "limit", "peak", "MB"]
    for name in CASES:
        assert f"\n{name} " in done.stdout, name


# -- in-process: the self-check, and the shared helpers -------------------------------------------
@pytest.fixture
def core_round(load_bench: Callable[[str], ModuleType]) -> ModuleType:
    return load_bench("core_round")


def test_core_round_exits_non_zero_when_the_round_is_wrong(
    core_round: ModuleType, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real_run_round = core_round.run_round

    def off_by_a_little(*args: Any) -> Any:
        return real_run_round(*args) * np.float32(1.001)

    monkeypatch.setattr(core_round, "run_round", off_by_a_little)
    assert core_round.main([*SMALL, "--json", "--quiet"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["verification"]["ok"] is False
    assert out["verification"]["failed"] == ["round", "round_copy"]


def test_compare_uses_float32_tolerance(core_round: ModuleType) -> None:
    ref = np.linspace(-1.0, 1.0, 101)
    assert core_round.compare(ref.astype(np.float32), ref).ok
    assert not core_round.compare(ref * (1 + 1e-5), ref).ok
    assert not core_round.compare(ref[:-1], ref).ok


def test_common_helpers(core_round: ModuleType) -> None:
    import _common

    def allocate() -> int:
        return int(np.ones(1_000_000).sum())  # an 8 MB temporary

    results = _common.run_cases(
        [_common.Case("alloc", allocate), _common.Case("none", lambda: None)], 3, settle=0
    )
    assert [len(m.times) for m in results.values()] == [3, 3]
    assert results["alloc"].result == 1_000_000
    assert results["alloc"].peak_bytes is not None and results["alloc"].peak_bytes >= 8_000_000
    table = _common.measurement_table(results.values(), baseline="alloc", label="limit")
    assert table.splitlines()[0].split() == ["name", "median", "s", "x", "limit", "peak", "MB"]
    assert "1.00x" in table.splitlines()[2]
    with pytest.raises(ValueError, match="repeats"):
        _common.run_cases([_common.Case("x", lambda: None)], 0)
