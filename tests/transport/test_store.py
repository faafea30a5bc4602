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

from flowerpets.exceptions import MissingRunError
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


def test_store_population_needs_a_store_and_must_be_the_stored_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--store-population`` names the ledger a new run spends from; a restart under another
    one is refused before the server serves (exit status 2), the stored run untouched."""
    from flowerpets.cli import build_parser
    from flowerpets.transport.cli import run_server

    monkeypatch.syspath_prepend(str(Path(__file__).parent))  # transport_test_apps
    path = tmp_path / "run.db"

    def serve(*extra: str) -> int:
        args = build_parser().parse_args(
            ["server", *server_apps("rounds=3"), "--seed", "1", "--address", "127.0.0.1:0", *extra]
        )
        return run_server(args)

    assert serve("--store-population", "hospital") == 2  # no --store
    assert not path.exists()
    with RunStore(path) as store:
        store.start_run("server", config={}, population_id="hospital").close()
    assert serve("--store", str(path), "--store-population", "another") == 2
    with RunStore(path) as store:
        stored = store.run("server")
        assert (stored.population_id, stored.last_round) == ("hospital", 0)
        with pytest.raises(MissingRunError):  # no ledger was made for it
            store.spends("another")
