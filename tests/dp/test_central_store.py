"""CentralDp in a run store: the budget survives a restart, is spent before it is released,
follows the population across runs, and a stored ledger that cannot be continued is refused."""

from __future__ import annotations

import json
import signal
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from flowerpets.core import ArrayRecord, FedAvg, RoundRecord, ServerApp
from flowerpets.dp import AdaptiveClipping, CentralDp, adaptive_clipping_mod, fixed_clipping_mod
from flowerpets.dp.accountant import FullParticipationGaussian, PldAccountant
from flowerpets.dp.central import _mod
from flowerpets.exceptions import (
    ConfigurationError,
    MissingPrivacyLedgerError,
    ParameterValueError,
    PrivacyLedgerError,
    PrivacyLedgerMismatchError,
    StoreLockedError,
    TruncatedPrivacyLedgerError,
)
from flowerpets.store import RunStore, RunWriter
from flowerpets.store.rows import pet_state_digest
from tests.dp.test_central import DELTAS, MODEL
from tests.store.processes import run_python

pytestmark = pytest.mark.filterwarnings("ignore::flowerpets.exceptions.InsecureRandomnessWarning")

ROUNDS, Z, DELTA = 4, 2.0, 1e-5


class CrashError(BaseException):
    """The server process dies (not an Exception: no round catches it)."""


def dp(**options: Any) -> CentralDp:
    settings: dict[str, Any] = {"noise_multiplier": Z, "clipping_norm": 1.0, "delta": DELTA}
    settings.update(options)
    return CentralDp(rng=np.random.default_rng(5), **settings)


def app(mod: CentralDp, store: RunWriter | None, rounds: int = ROUNDS) -> ServerApp:
    return ServerApp(
        strategy=FedAvg(),
        num_rounds=rounds,
        initial_arrays=ArrayRecord(MODEL),
        mods=[mod],
        seed=3,
        store=store,
    )


@pytest.fixture
def grid(scripted_grid: Any, update_app: Any) -> Any:
    def make(adaptive: bool = False) -> Any:
        mod = adaptive_clipping_mod if adaptive else fixed_clipping_mod
        return scripted_grid(update_app(lambda pid, rnd: DELTAS[pid], mods=[mod]).build(), 5)

    return make


def epsilons(result: Any) -> list[float]:
    return [value for _, value in result.history.metric("epsilon", source="train_metrics")]


def crash_after(rnd: int) -> Any:
    def on_round(record: RoundRecord) -> None:
        if record.round == rnd:
            raise CrashError

    return on_round


def two_rounds_then_crash(path: Path, grid: Any, run_id: str = "r", **options: Any) -> None:
    with (
        RunStore(path) as store,
        store.start_run(run_id, config={}, **options) as writer,
        pytest.raises(CrashError),
    ):
        app(dp(), writer).run(grid(), on_round=crash_after(2))


# -- the budget carries across a restart ----------------------------------------------------------
def test_a_resumed_run_continues_its_epsilon_and_its_adaptive_clip_exactly(
    tmp_path: Path, grid: Any
) -> None:
    adaptive = AdaptiveClipping(count_stddev=5.0)
    whole = app(dp(adaptive=adaptive), None).run(grid(adaptive=True))
    with RunStore(tmp_path / "runs.db") as store:
        with store.start_run("r", config={}) as writer, pytest.raises(CrashError):
            app(dp(adaptive=adaptive), writer).run(grid(adaptive=True), on_round=crash_after(2))
        with store.resume_run("r") as writer:
            resumed = app(dp(adaptive=adaptive), writer).run(grid(adaptive=True))
        spends = store.spends(store.run("r").population_id)

    assert epsilons(resumed) == epsilons(whole)
    assert epsilons(whole)[-1] == PldAccountant().compose(
        FullParticipationGaussian(Z), ROUNDS
    ).get_epsilon(DELTA)
    clips = [value for _, value in whole.history.metric("dp-clip", source="train_metrics")]
    resumed_clips = resumed.history.metric("dp-clip", source="train_metrics")
    assert resumed_clips[2] == (3, clips[2])  # the clip round 2 learnt, restored exactly
    assert clips[2] != 1.0  # it moved: the restore mattered
    assert [(s.run_id, s.round) for s in spends] == [("r", r) for r in range(1, ROUNDS + 1)]


def test_the_spend_is_committed_before_the_noised_sum_is_released(
    tmp_path: Path, grid: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    released: list[int] = []

    def dies_releasing(result: Any, *args: Any) -> Any:
        raise CrashError

    path = tmp_path / "runs.db"
    with RunStore(path) as store:
        with store.start_run("r", config={}) as writer, monkeypatch.context() as patch:
            patch.setattr(_mod, "noised", dies_releasing)
            with pytest.raises(CrashError):
                app(dp(), writer).run(grid())
        assert store.run("r").last_round == 0  # the round never committed...
        spends = store.spends("run:r")  # ...but its spend did
        assert [(s.run_id, s.round, s.event["event"]) for s in spends] == [
            ("r", 1, {"type": "FullParticipationGaussian", "noise_multiplier": Z})
        ]
        assert spends[0].event["delta"] == DELTA and spends[0].event["accountant"] == "pld"
        with store.resume_run("r") as writer:
            resumed = app(dp(), writer).run(grid(), on_round=lambda r: released.append(r.round))
        assert len(store.spends("run:r")) == ROUNDS + 1
    # The interrupted round stays counted: a crash over-counts, never under-counts.
    once_more = PldAccountant().compose(FullParticipationGaussian(Z), ROUNDS + 1)
    assert epsilons(resumed)[-1] == once_more.get_epsilon(DELTA)
    assert released == list(range(1, ROUNDS + 1))


# -- a stored ledger that cannot be continued is refused, never read as epsilon 0 -----------------
def _forge_state(path: Path, change: Any) -> None:
    """Replace the run's stored CentralDp state by ``change(state)``, its digest recomputed."""
    with sqlite3.connect(path) as db:
        rnd, value = db.execute(
            "SELECT round, value FROM pet_states WHERE run_id = 'r' AND name = 'dp.central'"
        ).fetchone()
        forged = change(json.loads(value))
        data = forged if isinstance(forged, bytes) else json.dumps(forged).encode()
        digest = pet_state_digest("r", "dp.central", rnd, "bytes", data)
        db.execute("UPDATE pet_states SET value = ?, sha256 = ? WHERE run_id = 'r'", (data, digest))


def _drop_state(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.execute("DELETE FROM pet_states WHERE run_id = 'r'")


def _count_one_event(state: dict[str, Any]) -> dict[str, Any]:
    entry = json.loads(state["ledger"][0])
    state["ledger"] = [json.dumps({**entry, "count": 1}, sort_keys=True)]
    state["spend_seq"] = 1
    return state


def _claim_a_later_spend(state: dict[str, Any]) -> dict[str, Any]:
    entry = json.loads(state["ledger"][0])
    state["ledger"] = [json.dumps({**entry, "count": 3}, sort_keys=True)]
    state["spend_seq"] = 3
    return state


def _other_events(state: dict[str, Any]) -> dict[str, Any]:
    entry = json.loads(state["ledger"][0])
    entry["event"]["noise_multiplier"] = 9.0
    state["ledger"] = [json.dumps(entry, sort_keys=True)]
    return state


@pytest.mark.parametrize(
    ("damage", "options", "error"),
    [
        (_drop_state, {}, MissingPrivacyLedgerError),
        (lambda p: _forge_state(p, _count_one_event), {}, TruncatedPrivacyLedgerError),
        (lambda p: _forge_state(p, _claim_a_later_spend), {}, TruncatedPrivacyLedgerError),
        (lambda p: _forge_state(p, _other_events), {}, PrivacyLedgerMismatchError),
        (lambda p: _forge_state(p, lambda s: b"{not json"), {}, PrivacyLedgerError),
        (lambda p: None, {"noise_multiplier": 1.5}, PrivacyLedgerMismatchError),
        (lambda p: None, {"delta": 1e-6}, PrivacyLedgerMismatchError),
        (lambda p: None, {"max_epsilon": 50.0}, PrivacyLedgerMismatchError),
        (lambda p: None, {"population": "another"}, PrivacyLedgerMismatchError),
    ],
    ids=[
        "missing",
        "state-truncated",
        "ledger-truncated",
        "other-events",
        "malformed",
        "other-noise",
        "other-delta",
        "other-budget",
        "other-population",
    ],
)
def test_a_ledger_that_cannot_be_continued_refuses_the_resume(
    tmp_path: Path, grid: Any, damage: Any, options: dict[str, Any], error: type[Exception]
) -> None:
    path = tmp_path / "runs.db"
    two_rounds_then_crash(path, grid)
    damage(path)
    with RunStore(path) as store:
        with store.resume_run("r") as writer, pytest.raises(error) as refused:
            app(dp(**options), writer).run(grid())
        assert store.run("r").last_round == 2  # no round ran: nothing was spent from 0
        assert len(store.spends("run:r")) == 2
    assert "9.0" not in str(refused.value) and "clip" not in str(refused.value)


def test_the_undamaged_run_resumes(tmp_path: Path, grid: Any) -> None:
    path = tmp_path / "runs.db"
    two_rounds_then_crash(path, grid)
    with RunStore(path) as store, store.resume_run("r") as writer:
        result = app(dp(), writer).run(grid())
    assert epsilons(result) == epsilons(app(dp(), None).run(grid()))


# -- the budget follows the population ------------------------------------------------------------
def test_two_runs_over_one_population_compose_in_one_ledger(tmp_path: Path, grid: Any) -> None:
    first, second = FullParticipationGaussian(Z), FullParticipationGaussian(1.5)
    with RunStore(tmp_path / "runs.db") as store:
        with store.start_run("a", config={}, population_id="hospital") as writer:
            app(dp(population="hospital"), writer, rounds=2).run(grid())
        with store.start_run("b", config={}, population_id="hospital") as writer:
            later = app(dp(noise_multiplier=1.5), writer, rounds=3).run(grid())
        with store.start_run("c", config={}) as writer:
            alone = app(dp(), writer, rounds=1).run(grid())
        entries = [(s.run_id, s.round) for s in store.spends("hospital")]
    expected = [
        PldAccountant().compose(first, 2).compose(second, k).get_epsilon(DELTA) for k in (1, 2, 3)
    ]
    assert epsilons(later) == expected  # run b counts run a's events
    assert epsilons(alone) == [PldAccountant().compose(first).get_epsilon(DELTA)]
    assert entries == [("a", 1), ("a", 2), ("b", 1), ("b", 2), ("b", 3)]


def test_a_population_budget_spent_by_one_run_stops_the_next(tmp_path: Path, grid: Any) -> None:
    budget = PldAccountant().compose(FullParticipationGaussian(Z), 3).get_epsilon(DELTA)
    with RunStore(tmp_path / "runs.db") as store:
        with store.start_run("a", config={}, population_id="p") as writer:
            assert len(app(dp(max_epsilon=budget), writer, rounds=2).run(grid()).history) == 2
        with store.start_run("b", config={}, population_id="p") as writer:
            result = app(dp(max_epsilon=budget), writer, rounds=5).run(grid())
        assert len(store.spends("p")) == 3
    assert result.stopped is not None and "privacy budget: round 2" in result.stopped
    assert epsilons(result) == [budget]


def test_a_population_needs_a_store_and_one_state_name_per_app(grid: Any) -> None:
    with pytest.raises(ConfigurationError, match="run store"):
        app(dp(population="p"), None).run(grid())
    with pytest.raises(ParameterValueError, match="one name"):
        ServerApp(
            strategy=FedAvg(), num_rounds=1, initial_arrays=ArrayRecord(MODEL), mods=[dp(), dp()]
        )


# -- a real server process killed -----------------------------------------------------------------
_KILLED_SERVER = """
import os, signal, sys

from flowerpets.dp.central import _mod
from flowerpets.store import RunStore
from tests.conftest import ScriptedGrid
from tests.dp.conftest import UpdateApp
from tests.dp.test_central_store import DELTAS, app, dp
from flowerpets.dp import fixed_clipping_mod


def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)


phase = sys.argv[2]
if phase == "releasing-round-3":
    released = _mod.noised
    def noised(result, *args):
        if result.round == 3:
            die()
        return released(result, *args)
    _mod.noised = noised
store = RunStore(sys.argv[1])
writer = store.start_run("r", config={})
grid = ScriptedGrid(UpdateApp(lambda pid, rnd: DELTAS[pid], mods=[fixed_clipping_mod]).build(), 5)
app(dp(), writer).run(grid, on_round=lambda r: die() if phase == f"after-round-{r.round}" else None)
"""


@pytest.mark.parametrize(("phase", "extra"), [("after-round-2", 0), ("releasing-round-3", 1)])
def test_a_killed_server_resumes_with_the_budget_it_spent(
    tmp_path: Path, grid: Any, phase: str, extra: int
) -> None:
    path = tmp_path / "runs.db"
    killed = run_python("-W", "ignore", "-c", _KILLED_SERVER, str(path), phase)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    with RunStore(path) as store:
        assert store.run("r").last_round == 2
        assert len(store.spends("run:r")) == 2 + extra  # round 3's spend, if it was made
        with store.resume_run("r") as writer:
            resumed = app(dp(), writer).run(grid())
    whole = PldAccountant().compose(FullParticipationGaussian(Z), ROUNDS + extra)
    assert epsilons(resumed)[-1] == whole.get_epsilon(DELTA)
    if not extra:
        assert epsilons(resumed) == epsilons(app(dp(), None).run(grid()))


def test_a_spend_the_store_refuses_ends_the_run_before_the_release(
    tmp_path: Path, grid: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    releases: list[int] = []
    release = _mod.noised

    def counted(result: Any, *args: Any) -> Any:
        releases.append(result.round)
        return release(result, *args)

    monkeypatch.setattr(_mod, "noised", counted)
    with RunStore(tmp_path / "runs.db") as store, store.start_run("r", config={}) as writer:
        with pytest.raises(StoreLockedError):  # the lease is gone: round 2 cannot spend
            app(dp(), writer).run(grid(), on_round=lambda record: store.break_lease("r"))
        assert len(store.spends("run:r")) == 1 and store.run("r").last_round == 1
    assert releases == [1]
