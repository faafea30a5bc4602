"""``flowerpets demo --store`` and ``flowerpets resume``: a killed demo run continues where it was.

The server "dies" with an exception no layer catches (a BaseException, as a
SIGKILL would leave nothing of the process) right after a round committed, or
in the middle of a SecAgg+ round. The resumed run must end with the
uninterrupted run's model, bit for bit: a stored demo run is simulated on one
worker thread, so the seeds fix everything, the order replies are summed in too.
With central DP (the default composition) the epsilon per round is the
uninterrupted run's; the model is not, as its noise is drawn from a secure source.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("sklearn")

from flowerpets.cli import build_parser, main
from flowerpets.core import ArrayRecord, Context, Message
from flowerpets.examples.digits import demo
from flowerpets.examples.digits.apps import TrainSettings, make_client_app
from flowerpets.secagg import SecAggPlusClientMod, secaggplus_mod
from flowerpets.secagg.protocol import RECORD, Stage
from flowerpets.simulation import run_simulation
from flowerpets.simulation.grid import SimulationGrid
from flowerpets.store import RunStore
from tests.store.stored_runs import same_bits
from tests.test_cli import one_line_error

# Few rounds on few clients; a fixed-size cohort, so that the sampler's state matters.
PLAIN = ["--pets", "none", "--clients", "6", "--rounds", "4", "--cohort-size", "3", "--seed", "3"]


class ServerKilled(BaseException):
    """The server process dies: nothing catches it, nothing after it runs."""


def killed_after_round(monkeypatch: pytest.MonkeyPatch, rnd: int, *, simulation: int = 1) -> None:
    """The demo's ``simulation``-th run (1: with PETs, 2: without) dies once ``rnd`` committed."""
    real, calls = demo.run_simulation, []

    def dying(*args: Any, on_round: Callable[[Any], None] | None = None, **kwargs: Any) -> Any:
        calls.append(None)

        def hook(record: Any) -> None:  # the ServerApp calls it after the round committed
            if on_round is not None:
                on_round(record)
            if len(calls) == simulation and record.round == rnd:
                raise ServerKilled

        return real(*args, on_round=hook, **kwargs)

    monkeypatch.setattr(demo, "run_simulation", dying)


def cli_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    capsys.readouterr()
    assert main([*argv, "--json"]) == 0
    result: dict[str, Any] = json.loads(capsys.readouterr().out)
    return result


def comparable(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in history]


def final_arrays(path: Path, run_id: str) -> ArrayRecord:
    with RunStore(path) as store:
        arrays = store.load(run_id).arrays
    assert arrays is not None
    return arrays


def test_a_demo_run_killed_after_round_two_resumes_to_the_uninterrupted_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    whole_path, path = tmp_path / "whole.db", tmp_path / "run.db"
    whole = cli_json(capsys, "demo", *PLAIN, "--store", str(whole_path))
    with monkeypatch.context() as patch, pytest.raises(ServerKilled):
        killed_after_round(patch, 2)
        main(["demo", *PLAIN, "--store", str(path), "--json"])
    with RunStore(path) as store:
        assert [r.run_id for r in store.runs()] == ["demo-1"]  # --pets none: no comparison run
        assert store.run("demo-1").last_round == 2

    resumed = cli_json(capsys, "resume", "--store", str(path))

    assert resumed["stored"] == {"store": str(path), "run": "demo-1", "resumed_after": 2}
    assert comparable(resumed["history"]) == comparable(whole["history"])
    assert same_bits(final_arrays(path, "demo-1"), final_arrays(whole_path, "demo-1"))
    # A finished run resumed runs nothing again.
    again = cli_json(capsys, "resume", "--store", str(path), "--run", "demo-1")
    assert comparable(again["history"]) == comparable(whole["history"])
    assert again["stored"]["resumed_after"] == 4


def test_killed_in_the_comparison_run_the_resume_finishes_only_that(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = ["--secagg", *PLAIN[2:], "--store", str(tmp_path / "run.db"), "--run", "exp"]
    with monkeypatch.context() as patch, pytest.raises(ServerKilled):
        killed_after_round(patch, 2, simulation=2)
        main(["demo", *argv, "--json"])
    path = tmp_path / "run.db"
    with RunStore(path) as store:
        assert store.run("exp").last_round == 4
        assert store.run("exp/without-pets").last_round == 2
        with_pets = store.load("exp")
    whole = cli_json(capsys, "demo", *PLAIN, "--store", str(tmp_path / "plain.db"))

    resumed = cli_json(capsys, "resume", "--store", str(path), "--run", "exp")

    assert resumed["stored"]["resumed_after"] == 4  # the run with SecAgg+ was over
    assert comparable(resumed["history"]) == comparable(with_pets.history.to_dicts())
    assert comparable(resumed["baseline"]["history"]) == comparable(whole["history"])
    assert same_bits(
        final_arrays(path, "exp/without-pets"), final_arrays(tmp_path / "plain.db", "demo-1")
    )


# The recommended composition (SecAgg+ with central DP), on fewer clients and rounds.
DEFAULT = ["--clients", "8", "--rounds", "4", "--seed", "3"]


def epsilons(history: list[dict[str, Any]]) -> list[float]:
    return [record["train_metrics"]["epsilon"] for record in history]


def test_the_default_demo_killed_after_round_two_resumes_with_the_same_epsilon_per_round(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Central DP's budget is in the store: the resumed run spends on from the stored ledger.

    Its model is not the uninterrupted run's bit for bit: the noise comes from a secure
    source whose state is never stored. The cohorts (the stored sampler's) and every
    epsilon are the same.
    """
    whole = cli_json(capsys, "demo", *DEFAULT, "--store", str(tmp_path / "whole.db"))
    path = tmp_path / "run.db"
    with monkeypatch.context() as patch, pytest.raises(ServerKilled):
        killed_after_round(patch, 2)
        main(["demo", *DEFAULT, "--store", str(path), "--json"])
    with RunStore(path) as store:
        assert store.run("demo-1").last_round == 2
        assert [s.round for s in store.spends("run:demo-1")] == [1, 2]

    resumed = cli_json(capsys, "resume", "--store", str(path))

    assert resumed["stored"]["resumed_after"] == 2
    assert len(resumed["history"]) == len(whole["history"]) == 4
    assert all(r["error"] is None for r in resumed["history"])
    assert epsilons(resumed["history"]) == epsilons(whole["history"])
    assert epsilons(whole["history"]) == sorted(set(epsilons(whole["history"])))  # it grows
    cohorts = [[r["cohort_size"], r["participants"]] for r in resumed["history"]]
    assert cohorts == [[r["cohort_size"], r["participants"]] for r in whole["history"]]
    with RunStore(path) as store:  # one spend per round: rounds 1 and 2 were not spent again
        assert [s.round for s in store.spends("run:demo-1")] == [1, 2, 3, 4]
        assert store.run("demo-1/without-pets").last_round == 4


# -- refusals: one line on stderr, exit status 2 ---------------------------------------------------
@pytest.fixture
def stored_demo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    path = tmp_path / "run.db"
    assert main(["demo", *PLAIN, "--rounds", "1", "--store", str(path), "--json"]) == 0
    capsys.readouterr()
    return path


def test_resume_refuses_a_missing_store_or_run_in_one_line(
    stored_demo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = stored_demo.with_name("nothing.db")
    line = one_line_error(capsys, "resume", "--store", str(missing))
    assert line == f"flowerpets resume: error: there is no run store at {missing}"
    assert not missing.exists()  # resuming never creates a store
    line = one_line_error(capsys, "resume", "--store", str(stored_demo), "--run", "nope")
    assert line == "flowerpets resume: error: the store holds no run 'nope'"
    with RunStore(stored_demo) as store, store.start_run("api", config={"lr": 0.1}):
        pass
    line = one_line_error(capsys, "resume", "--store", str(stored_demo), "--run", "api")
    assert "run 'api' was not stored by flowerpets demo" in line


def test_resume_refuses_a_run_a_live_server_holds(
    stored_demo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with RunStore(stored_demo) as store, store.resume_run("demo-1"):  # a live holder: us
        line = one_line_error(capsys, "resume", "--store", str(stored_demo))
    assert "run 'demo-1' is held by another server" in line
    assert main(["resume", "--store", str(stored_demo), "--json"]) == 0  # released: it resumes


def test_resume_refuses_a_damaged_store(
    stored_demo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = bytearray(stored_demo.read_bytes())
    stored_demo.write_bytes(bytes(data[: len(data) // 2]))  # cut off in the middle
    line = one_line_error(capsys, "resume", "--store", str(stored_demo))
    assert line.startswith("flowerpets resume: error: ")
    assert "Traceback" not in line


def test_the_demo_refuses_what_it_cannot_store_in_one_line(
    stored_demo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = str(stored_demo)
    line = one_line_error(capsys, "demo", *PLAIN, "--store", store, "--run", "demo-1")
    assert f"continue it with flowerpets resume --store {store} --run demo-1" in line
    local = one_line_error(
        capsys, "demo", "--dp", "local", "--target-epsilon", "2", "--store", store
    )
    assert "each node keeps its budget in its own context" in local
    assert "would count every node's epsilon from 0 again" in local
    he = one_line_error(capsys, "demo", "--he", "--store", store)
    assert "lives only in the simulated nodes' contexts" in he
    assert "could not decrypt its model" in he
    assert "--run names a run in a store: it needs --store" in one_line_error(
        capsys, "demo", *PLAIN, "--run", "x"
    )
    # A second run goes next to the first.
    assert main(["demo", *PLAIN, "--rounds", "1", "--store", store, "--json"]) == 0
    with RunStore(stored_demo) as opened:
        assert [r.run_id for r in opened.runs()] == ["demo-1", "demo-2"]


# -- SecAgg+: the interrupted round is abandoned, the resumed run starts a new session -------------
SECAGG = ["--secagg", "--clients", "6", "--rounds", "4", "--cohort-size", "5", "--seed", "5"]


class SeededPerStage:
    """Seeds each node's SecAgg+ draws by (node, round, stage), as the client mod outside it.

    SecAgg+'s own source, ``os.urandom``, cannot be replayed, and its stochastic
    rounding decides the sum's last bits. Seeded like this, a round run again
    quantizes exactly what the uninterrupted run did; its keys, masks and
    session are new all the same (the server's session id is ``os.urandom``).
    """

    def __init__(self) -> None:
        self._local = threading.local()

    def __call__(
        self, msg: Message, context: Context, call_next: Callable[[Message, Context], Message]
    ) -> Message:
        stage = list(Stage.ALL).index(msg.metadata.stage) if msg.metadata.stage else 9
        self._local.rng = np.random.default_rng([5, context.node_id, msg.round, stage])
        return call_next(msg, context)

    def randomness(self, n: int) -> bytes:
        return bytes(self._local.rng.bytes(n))


def secagg_run(store: Any = None) -> Any:
    args = demo.resolve(build_parser().parse_args(["demo", *SECAGG]))
    apps = demo.build_apps(args, store=store)
    assert apps.pets.client == [secaggplus_mod]  # the demo's SecAgg+ client, seeded below
    seeded = SeededPerStage()
    client = make_client_app(
        apps.task,
        TrainSettings(epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr),
        mods=[seeded, SecAggPlusClientMod(randomness=seeded.randomness)],
    )
    return run_simulation(apps.server_app, client, args.clients, seed=args.seed, max_workers=1)


def test_a_secagg_run_killed_mid_round_resumes_with_a_new_session_to_the_same_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole = secagg_run()
    assert all(r.ok and len(r.participants) == 5 for r in whole.history)
    sessions: list[tuple[int, bytes]] = []
    real = SimulationGrid.send_and_receive

    def send_and_receive(
        grid: SimulationGrid, messages: Sequence[Message], *, timeout: float | None = None
    ) -> Iterator[Message]:
        replies = real(grid, messages, timeout=timeout)
        first = messages[0] if messages else None
        if first is None or first.metadata.stage not in Stage.ALL:
            return replies
        if first.metadata.stage == Stage.ADVERTISE_KEYS:
            session = first.require_content()[RECORD]["session"]
            assert isinstance(session, bytes)
            sessions.append((first.round, session))
        if first.round == 3 and first.metadata.stage == Stage.COLLECT_MASKED_INPUT and dying:

            def collected_one_then_died() -> Iterator[Message]:
                yield next(replies)
                raise ServerKilled

            return collected_one_then_died()
        return replies

    monkeypatch.setattr(SimulationGrid, "send_and_receive", send_and_receive)
    path = tmp_path / "run.db"
    dying = True
    with RunStore(path) as store:
        with store.start_run("s", config={"argv": SECAGG}) as writer, pytest.raises(ServerKilled):
            secagg_run(writer)
        assert store.run("s").last_round == 2  # round 3 never committed
        abandoned = dict(sessions)[3]
        dying, sessions[:] = False, []
        with store.resume_run("s", config={"argv": SECAGG}) as writer:
            resumed = secagg_run(writer)

    assert [rnd for rnd, _ in sessions] == [3, 4]  # rounds 1 and 2 were not run again
    assert dict(sessions)[3] != abandoned  # a new session for the abandoned round
    assert same_bits(resumed.arrays, whole.arrays)
    assert timeless(resumed.history.rounds) == timeless(whole.history.rounds)


def timeless(records: Sequence[Any]) -> list[dict[str, Any]]:
    """The records without their timings; participants in node order (SecAgg+'s ring is random)."""
    out = []
    for record in records:
        data = record.to_json_dict()
        data["seconds"] = 0
        data["participants"] = sorted(data["participants"])
        data["train_metrics"] = {
            k: v for k, v in data["train_metrics"].items() if not k.startswith("secagg-seconds")
        }
        out.append(data)
    return out
