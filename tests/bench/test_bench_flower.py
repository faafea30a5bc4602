"""bench/flower.py without a SuperLink: its apps load as flwr would, and its imports part runs.

The round part needs a SuperLink and four SuperNodes (minutes): it is not run
here. What is: every case's app copy names components that exist and are flwr
apps, the shared expected mean is the weighted mean, and the imports part
reports every case asked for (no timings asserted).
"""

from __future__ import annotations

import importlib
import tomllib
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

pytest.importorskip("flwr")
pytest.importorskip("psutil")

APPS = Path(__file__).resolve().parents[2] / "bench" / "flower_apps"


@pytest.fixture
def flower_bench(load_bench: Callable[[str], ModuleType]) -> ModuleType:
    return load_bench("flower")


def test_each_case_names_a_server_and_a_client_that_flwr_can_load(
    flower_bench: ModuleType, tmp_path: Path
) -> None:
    import flwr.clientapp
    import flwr.serverapp

    assert set(flower_bench.CASES) == {"ours_secagg", "flwr_secagg", "ours_plain", "flwr_plain"}
    for case in flower_bench.CASES:
        app = flower_bench._app_for(case, tmp_path)
        components = tomllib.loads((app / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
        assert components["components"] == {
            "serverapp": f"fpbench.{case}:server",
            "clientapp": f"fpbench.{case}:client",
        }
        module = importlib.import_module(f"fpbench.{case}")
        assert isinstance(module.server, flwr.serverapp.ServerApp), case
        assert isinstance(module.client, flwr.clientapp.ClientApp), case


def test_every_case_is_checked_against_the_exact_weighted_mean(flower_bench: ModuleType) -> None:
    from fpbench.common import expected_mean, node_update, node_weight

    updates = np.stack([node_update(pid, 50).astype(np.float64) for pid in range(3)])
    weights = np.array([node_weight(pid) for pid in range(3)], np.float64)
    np.testing.assert_allclose(expected_mean(3, 50), weights @ updates / weights.sum(), rtol=1e-12)
    assert not np.array_equal(node_update(0, 50), node_update(1, 50))  # nodes differ


SMALL = ["--params", "1000", "--repeats", "1", "--settle", "0", "--import-repeats", "1", "--quiet"]


def test_the_parts_without_a_superlink_report_what_they_promise(
    run_bench: Callable[..., dict[str, Any]],
) -> None:
    cases = ["ours_plain", "flwr_plain"]
    report = run_bench("flower", "--parts", "inprocess", "imports", "--cases", *cases, *SMALL)
    assert report["benchmark"] == "flower" and report["ok"] is True and report["failed"] == []
    assert "round" not in report
    imports = report["imports"]["results"]
    assert set(imports) == set(cases)
    for case in cases:
        assert len(imports[case]["times_s"]) == 1 and imports[case]["median_s"] > 0, case
    assert report["imports"]["flwr_clientapp_start"]["median_s"] > 0
    inprocess = report["inprocess"]["results"]
    assert set(inprocess) == {"ours_secagg", "ours_plain"}
    for name, result in inprocess.items():
        assert result["max_abs_error"] <= 1e-6, name  # float32 of the exact weighted mean


def test_the_in_process_check_bites(
    flower_bench: ModuleType, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import fpbench.common

    real = fpbench.common.expected_mean
    monkeypatch.setattr(fpbench.common, "expected_mean", lambda n, p: real(n, p) + 1e-3)
    assert flower_bench.main(["--parts", "inprocess", "--json", *SMALL]) == 1
    assert "in-process ours_plain: the aggregate is off the exact mean" in capsys.readouterr().err
