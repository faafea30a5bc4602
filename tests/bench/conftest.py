"""Running the benchmarks in ``bench/`` from their tests: as a process, or imported."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"


def _bench_process(name: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    done = subprocess.run(
        [sys.executable, str(BENCH / f"{name}.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done


def _run_bench(name: str, *args: str, timeout: float = 600) -> dict[str, Any]:
    done = _bench_process(name, *args, "--json", timeout=timeout)
    parsed: dict[str, Any] = json.loads(done.stdout)  # stdout is one JSON object, nothing else
    return parsed


@pytest.fixture(scope="session")
def bench_process() -> Callable[..., subprocess.CompletedProcess[str]]:
    """``bench_process(name, *args)``: ``python bench/<name>.py *args`` with src on
    PYTHONPATH, from the repository root; it must exit with status 0."""
    return _bench_process


@pytest.fixture(scope="session")
def run_bench() -> Callable[..., dict[str, Any]]:
    """``run_bench(name, *args)``: :func:`bench_process` with ``--json``; the JSON object."""
    return _run_bench


@pytest.fixture
def load_bench(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], ModuleType]:
    """``load_bench(name)``: ``bench/<name>.py`` imported in this process, as ``bench_<name>``."""
    monkeypatch.syspath_prepend(str(BENCH))  # for `from _common import ...`

    def load(name: str) -> ModuleType:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up
        spec.loader.exec_module(module)
        return module

    return load
