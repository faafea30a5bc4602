"""bench/he.py runs at a tiny size, reports what it promises, and its self-check bites.

No wall-clock assertions: the machines that run the tests are too noisy.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np
import pytest

SMALL = ["--nodes", "3", "--params", "5000", "--repeats", "1", "--settle", "0"]
CASES = {
    "client_mod",
    "tenseal_chunks",
    "tenseal_whole",
    "common_8192",
    "server_sum",
    "tenseal_sum",
    "plain_sum",
    "client_open",
    "tenseal_decrypt",
}


@pytest.fixture(scope="module")
def report(run_bench: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    return run_bench("he", *SMALL, "--quiet")


def test_json_has_the_documented_keys(report: dict[str, Any]) -> None:
    assert report["benchmark"] == "he"
    assert report["config"]["nodes"] == 3 and report["config"]["params"] == 5000
    assert set(report["results"]) == CASES
    for name, result in report["results"].items():
        assert len(result["times_s"]) == 1 and result["median_s"] > 0, name
        assert result["baseline"] in CASES, name
    assert report["raw_baseline"] in {"tenseal_chunks", "tenseal_whole"}
    assert set(report["ratios"]) == {
        "client_mod_vs_raw_tenseal",
        "common_8192_vs_raw_tenseal",
        "server_sum_vs_raw_tenseal",
        "server_sum_vs_plain_sum",
        "client_open_vs_raw_decrypt",
    }
    for mode in ("stream", "hold"):
        assert report["memory"]["children"][mode]["peak_mb"] > 0


def test_sizes_and_precision_are_the_documented_ones(report: dict[str, Any]) -> None:
    sizes = report["sizes"]
    # 5,000 values fill 3 ciphertexts of 2,048 slots; each is 2 x 4096 x 8 bytes (plus headers).
    assert sizes["ours_bytes_per_param"] == pytest.approx(3 * 65_536 / 5000, rel=0.01)
    assert sizes["ours_bytes_per_param"] == pytest.approx(
        sizes["tenseal_bytes_per_param"], rel=1e-2
    )
    assert sizes["common_8192_x_float32"] > sizes["ours_x_float32"]
    assert report["verification"]["ok"] is True
    assert report["precision"]["ckks_max_abs_error"] < 1e-10
    # The opened model is float32: its error is CKKS's plus float32 rounding.
    assert report["precision"]["max_abs_error"] < 1e-10 + float(np.finfo(np.float32).eps)


@pytest.fixture
def bench(load_bench: Callable[[str], ModuleType]) -> ModuleType:
    return load_bench("he")


def test_exits_non_zero_when_the_opened_mean_is_wrong(
    bench: ModuleType, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = bench.open_sealed

    def off(*args: Any) -> Any:
        opened = real(*args)
        return {name: bench.Array(a.numpy() * 1.001) for name, a in opened.items()}

    monkeypatch.setattr(bench, "open_sealed", off)
    assert bench.main([*SMALL, "--json", "--quiet", "--no-memory"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["verification"]["ok"] is False and out["memory"]["children"] is None


def test_prints_a_table_without_json(bench: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main([*SMALL, "--quiet", "--no-memory"]) == 0
    text = capsys.readouterr().out
    for name in CASES:
        assert f"\n{name} " in text, name
    assert "x float32" in text and "opened mean" in text
