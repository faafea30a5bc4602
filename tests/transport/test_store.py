"""``flowerpets server --store``: a server SIGKILLed between rounds, started again, continues.

The restarted server (same --app, --run-config and --seed) takes over the dead
server's lease, reads round 1 from the store and runs rounds 2 and 3 only, with
the nodes that connect to it.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from flowerpets.store import RunStore

from .conftest import Processes
from .test_processes import CLIENT_APP, FAST, server_apps


@pytest.mark.slow
def test_a_server_killed_after_round_one_restarted_with_its_store_runs_only_the_rest(
    processes: Processes, tmp_path: Path
) -> None:
    gate, path = tmp_path / "gate", tmp_path / "run.db"
    app = server_apps("rounds=3", "integer=true", f"gate-file={gate}", "gate-round=2")
    args = [*app, "--store", str(path), "--min-nodes", "2", "--seed", "1", *FAST]

    def nodes(port: int, name: str) -> None:
        for i in range(2):
            processes.client(f"{name}-{i}", port, *CLIENT_APP, "--node-config", f"partition-id={i}")

    first, port = processes.server(*args, name="first")
    nodes(port, "first")
    first.wait_for_log(r"round 1: 2 participant\(s\)")  # committed; round 2 waits at its gate
    first.signal(signal.SIGKILL)
    assert first.wait() == -signal.SIGKILL
    with RunStore(path) as store:
        assert store.run("server").last_round == 1
    gate.touch()

    second, port = processes.server(*args, "--history", "history.json", name="second")
    nodes(port, "second")
    assert second.wait() == 0, second.log()

    assert "round 1:" not in second.log()  # round 1 came from the store
    history = json.loads((tmp_path / "history.json").read_text())["history"]
    assert [(r["round"], r["participants"], r["error"]) for r in history] == [
        (1, 2, None),
        (2, 2, None),
        (3, 2, None),
    ]
    with RunStore(path) as store:
        assert store.run("server").last_round == 3
    refused = processes.start("refused", "server", *app, "--store", str(path), "--seed", "2")
    assert refused.wait() == 2  # another --seed: the stored run's configuration differs
    assert "was stored with configuration digest" in refused.log()
