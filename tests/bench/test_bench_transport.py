"""bench/transport.py runs end to end at a tiny size, and its self-check bites (no timings)."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np
import pytest

SMALL = ["--nodes", "2", "--params", "3000", "--repeats", "1", "--settle", "0", "--quiet"]


@pytest.fixture(scope="module")
def report(run_bench: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    return run_bench("transport", *SMALL, timeout=300)


def test_transport_json_has_the_documented_keys(report: dict[str, Any]) -> None:
    assert report["benchmark"] == "transport"
    assert report["config"] == {"nodes": 2, "params": 3000, "repeats": 1, "seed": 0, "tls": True}
    assert set(report["results"]) == {"simulation", "transport", "grpc_floor"}
    for name, result in report["results"].items():
        assert len(result["times_s"]) == 1 and result["median_s"] > 0, name
    assert report["results"]["simulation"]["ratio"] == pytest.approx(1.0)
    assert report["ratio"] == pytest.approx(report["results"]["transport"]["ratio"])
    floor = report["results"]["grpc_floor"]["median_s"]
    assert report["ratio_to_floor"] == pytest.approx(
        report["results"]["transport"]["median_s"] / floor
    )
    assert report["startup_s"] > 0
    for key in ("memory_metric", "environment"):
        assert key in report


def test_transport_round_equals_the_simulation(report: dict[str, Any]) -> None:
    verification = report["verification"]
    assert verification["ok"] is True
    assert verification["max_ulp_transport_vs_simulation"] <= 1
    assert verification["max_rel_diff_vs_numpy"] < 1e-6


def test_bytes_per_parameter_are_about_four_each_way(report: dict[str, Any]) -> None:
    frames = report["bytes_per_param"]["frames"]
    for direction in ("server_to_nodes", "nodes_to_server"):
        # float32 is 4 bytes; 3000 parameters leave room for a few hundred bytes of metadata.
        assert 4.0 < frames[direction] < 4.5, direction
    tcp = report["bytes_per_param"]["tcp"]
    if tcp is not None:  # ss is there: TLS and HTTP/2 add to the frames, not much
        for direction in ("server_to_nodes", "nodes_to_server"):
            assert frames[direction] < tcp[direction] < frames[direction] + 1.5, direction


@pytest.fixture
def bench(load_bench: Callable[[str], ModuleType]) -> ModuleType:
    return load_bench("transport")


def test_the_self_check_refuses_a_wrong_model(bench: ModuleType) -> None:
    expected = np.linspace(-1, 1, 1001)
    model = expected.astype(np.float32)
    assert bench.verify(model, model, expected)["ok"]
    off = model.copy()
    off[500] = np.nextafter(np.nextafter(off[500], np.float32(2)), np.float32(2))  # 2 ulp
    assert not bench.verify(off, model, expected)["ok"]
    assert not bench.verify(model * np.float32(1.001), model * np.float32(1.001), expected)["ok"]


def test_every_node_process_holds_its_own_update(bench: ModuleType) -> None:
    from flowerpets.core import Context

    context = Context(
        5, node_config={"partition-id": 1}, run_config={"bench-seed": 3, "bench-params": 10}
    )
    app = bench.client_app(context)
    assert np.array_equal(bench.make_update(3, 1, 10), bench.make_update(3, 1, 10))
    assert not np.array_equal(bench.make_update(3, 1, 10), bench.make_update(3, 2, 10))
    assert app.message_types == ("train",)
