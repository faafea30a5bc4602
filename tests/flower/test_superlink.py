"""Our apps through Flower's deployment runtime: a real SuperLink and 3 SuperNodes on loopback.

The ``superlink`` fixture starts ``flower-superlink --insecure`` and 3
``flower-supernode`` processes on 127.0.0.1 with free ports, each in its own
session, and stops every one of them and every child they spawned (the detached
``flower-superexec`` and ``flwr-clientapp`` processes) by PID, children collected
before their parent goes, within a hard time limit.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

psutil = pytest.importorskip("psutil")

from flowerpets.core import (  # noqa: E402
    ArrayRecord,
    ClientApp,
    FedAvg,
    History,
    MetricRecord,
    RecordDict,
    ServerApp,
)
from flowerpets.simulation import run_simulation  # noqa: E402

pytestmark = pytest.mark.slow
APP = Path(__file__).parent / "superlink_app"
BIN = Path(sys.executable).parent
N = 3
HARD_LIMIT = 240.0  # seconds for the whole fixture: start, run, stop


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, deadline: float, proc: subprocess.Popen[bytes], log: Path) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the SuperLink exited: {log.read_text()[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """Stop every process and all its descendants, by PID; SIGKILL what outlives 5 s."""
    known: dict[int, psutil.Process] = {}
    for proc in procs:
        try:
            parent = psutil.Process(proc.pid)
            known[parent.pid] = parent
            for child in parent.children(recursive=True):
                known[child.pid] = child
        except psutil.NoSuchProcess:
            pass
    for p in known.values():
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(list(known.values()), timeout=5)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=5)
    for proc in procs:
        if proc.poll() is None:
            proc.wait(timeout=5)


@pytest.fixture
def superlink(tmp_path: Path) -> Iterator[SimpleNamespace]:
    deadline = time.monotonic() + HARD_LIMIT
    home = tmp_path / "flwr-home"
    home.mkdir()
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "PYTHONPATH": os.pathsep.join(sys.path),
        "PATH": os.pathsep.join([str(BIN), os.environ.get("PATH", "")]),  # flower-superexec
    }
    port = _free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{port}"\n'
        "insecure = true\n"
    )
    logs = tmp_path / "logs"
    logs.mkdir()
    procs: list[subprocess.Popen[bytes]] = []

    def start(name: str, *args: str) -> None:
        out = (logs / f"{name}.log").open("wb")
        procs.append(
            subprocess.Popen(
                [str(BIN / args[0]), *args[1:]], env=env, cwd=tmp_path, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
            )
        )  # fmt: skip

    try:
        start("superlink", "flower-superlink", "--insecure", "--host", "127.0.0.1", "--port",
              str(port), "--disable-runtime-dependency-installation")  # fmt: skip
        _wait_port(port, min(deadline, time.monotonic() + 60), procs[0], logs / "superlink.log")
        for i in range(N):
            start(f"supernode-{i}", "flower-supernode", "--insecure", "--superlink",
                  f"127.0.0.1:{port}", "--port", str(_free_port()),
                  "--node-config", f"partition-id={i} num-partitions={N}")  # fmt: skip
        yield SimpleNamespace(env=env, deadline=deadline, logs=logs, tmp=tmp_path, procs=procs)
    finally:
        _stop(procs)
        leftovers = [p.pid for p in procs if p.poll() is None]
        assert not leftovers, f"processes still running: {leftovers}"


def _values(round: int, arrays: ArrayRecord) -> dict[str, float]:  # as fpapp/apps.py
    return {f"{n}[{i}]": float(v) for n, a in arrays.items() for i, v in enumerate(a.numpy())}


def _ours() -> History:
    app = ClientApp()

    @app.train()
    def train(msg, context):  # type: ignore[no-untyped-def]  # as superlink_app/fpapp/apps.py
        pid = int(context.node_config["partition-id"])
        arrays = msg.require_content().get_typed("arrays", ArrayRecord)
        rng = np.random.default_rng([7, pid, msg.round])
        out = {n: (a.numpy() + rng.normal(size=a.shape)).astype(a.dtype) for n, a in arrays.items()}
        return RecordDict(
            {
                "arrays": ArrayRecord.from_numpy(out),
                "metrics": MetricRecord({"num-examples": pid + 1}),
            }
        )

    initial = ArrayRecord.from_numpy(
        {"w": np.zeros(10, np.float32), "b": np.arange(3, dtype=np.float32)}
    )
    server = ServerApp(
        strategy=FedAvg(evaluate_fn=_values), num_rounds=2, initial_arrays=initial, seed=1
    )
    return run_simulation(server, app, N, seed=1).history


def test_plain_fedavg_through_a_superlink(superlink: SimpleNamespace) -> None:
    app = superlink.tmp / "app"
    shutil.copytree(APP, app)
    history = superlink.tmp / "history.json"
    remaining = superlink.deadline - time.monotonic()
    run = subprocess.run(
        [str(BIN / "flwr"), "run", str(app), "local", "--stream",
         "--run-config", f"history-file='{history}'"],
        env=superlink.env, cwd=superlink.tmp, capture_output=True, timeout=max(remaining - 20, 10),
    )  # fmt: skip
    assert history.exists(), (run.stdout.decode()[-3000:], run.stderr.decode()[-3000:])
    rounds = json.loads(history.read_text())
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["participants"] == N and r["error"] is None for r in rounds)
    want = _ours()
    assert [r["train_metrics"] for r in rounds] == [r.train_metrics for r in want.rounds]
    # The model after each round, as our own simulation computes it with the same seeds
    # (reply order differs: float64 sums, float32 model, a few ulps at most).
    for got, ref in zip(rounds, want.rounds, strict=True):
        assert got["server_metrics"].keys() == ref.server_metrics.keys()
        np.testing.assert_allclose(
            list(got["server_metrics"].values()), list(ref.server_metrics.values()), atol=1e-6
        )
