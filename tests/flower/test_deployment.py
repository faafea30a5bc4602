"""LocalDeployment's parts that need no Flower process: config text, argument checks, and
stopping a process tree whose child detached itself (its own session) by PID."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

psutil = pytest.importorskip("psutil")
from flwr.common.config import parse_config_args  # noqa: E402

from flowerpets.exceptions import ParameterTypeError, ParameterValueError  # noqa: E402
from flowerpets.flower.deployment import (  # noqa: E402
    LocalDeployment,
    format_config,
    kill_tree,
    stop_tree,
)


def test_format_config_is_read_back_by_flwr_as_given() -> None:
    config = {
        "history-file": "/tmp/a b/history.json",
        "num-server-rounds": 3,
        "node-timeout": 0.5,
        "tiny": 1e-05,
        "stall-partition": -1,
        "flag": True,
        "empty": "",
    }
    assert parse_config_args([format_config(config)]) == config


@pytest.mark.parametrize(
    ("config", "error"),
    [
        ({"a b": 1}, ParameterValueError),
        ({"k=v": 1}, ParameterValueError),
        ({"": 1}, ParameterValueError),
        ({"path": "it's"}, ParameterValueError),
        ({"x": float("nan")}, ParameterValueError),
        ({"x": [1]}, ParameterTypeError),
    ],
)
def test_format_config_refuses_what_flwr_would_misread(config: dict, error: type) -> None:  # type: ignore[type-arg]
    with pytest.raises(error, match=repr(next(iter(config)))):
        format_config(config)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"n_nodes": 0}, ParameterValueError),
        ({"n_nodes": True}, ParameterTypeError),
        ({"hard_limit": 0}, ParameterValueError),
        ({"hard_limit": float("inf")}, ParameterValueError),
        ({"home": 3}, ParameterTypeError),
        ({"node_config": {"partition-id": 0}}, ParameterValueError),
    ],
)
def test_bad_arguments_are_refused_before_any_process_starts(
    kwargs: dict,  # type: ignore[type-arg]
    error: type,
    tmp_path: Path,
) -> None:
    args = {"n_nodes": 2, "home": tmp_path, **kwargs}
    with pytest.raises(error):
        LocalDeployment(args.pop("n_nodes"), **args)
    assert not list(tmp_path.iterdir())


# A parent that starts a child in a session of its own (as flower-supernode starts its
# flower-superexec), prints the child's PID, and sleeps; the child ignores SIGTERM.
CHILD = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
PARENT = f"""
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", {CHILD!r}], start_new_session=True)
print(child.pid, flush=True)
time.sleep(60)
"""


def _tree() -> tuple[subprocess.Popen[str], int]:
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    time.sleep(0.2)  # the child installs its SIGTERM handler
    return parent, child


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_stop_tree_ends_a_detached_child_that_ignores_sigterm() -> None:
    parent, child = _tree()
    try:
        assert psutil.Process(child).ppid() == parent.pid
        assert stop_tree([psutil.Process(parent.pid)], grace=1.0) == []
        parent.wait(timeout=5)
        assert _gone(child)  # its parent went first, yet it was known and killed
    finally:
        for pid in (parent.pid, child):
            if not _gone(pid):
                psutil.Process(pid).kill()


def test_kill_tree_sigkills_the_whole_tree_at_once() -> None:
    parent, child = _tree()
    try:
        assert kill_tree([psutil.Process(parent.pid)]) == sorted([parent.pid, child])
        assert parent.wait(timeout=5) == -9
        assert _gone(child)
    finally:
        for pid in (parent.pid, child):
            if not _gone(pid):
                psutil.Process(pid).kill()
