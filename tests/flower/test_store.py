"""The bridge's ``store`` run-config key: the flwr ServerApp commits each round and resumes.

A ServerApp process that dies before round 3 and is started again with the
same run config continues after round 2, over nodes it never saw, and ends with
the uninterrupted run's model bit for bit (``LocalFlwrGrid`` answers in the
order messages were pushed, so the seeds fix the order of the sum too).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from flwr import app as fl

from flowerpets.core import RoundRecord
from flowerpets.dp import CentralDp, fixed_clipping_mod
from flowerpets.exceptions import RunConfigMismatchError
from flowerpets.flower import client_app
from flowerpets.flower import server as server_module
from flowerpets.store import RunStore
from tests.store.stored_runs import same_bits

N, ROUNDS = 4, 4


class ServerKilled(BaseException):
    """The ServerApp process dies: nothing catches it."""


def _grid_of(kit: SimpleNamespace, app: object, *, die_at: int | None = None) -> object:
    class DyingGrid(kit.LocalFlwrGrid):  # type: ignore[name-defined,misc]
        def push_messages(self, messages: Iterable[fl.Message]) -> Iterable[str]:
            messages = list(messages)
            if die_at is not None and any(m.metadata.group_id == str(die_at) for m in messages):
                raise ServerKilled
            return super().push_messages(messages)

    return DyingGrid(app, N)


def _grid(kit: SimpleNamespace, *, die_at: int | None = None) -> object:
    return _grid_of(kit, client_app(kit.numpy_client()), die_at=die_at)


def _run(kit: SimpleNamespace, grid: object, path: Path, **config: object) -> object:
    run_config = {"store": str(path), "num-server-rounds": ROUNDS, **config}
    return kit.run_bridge(kit.numpy_server(rounds=ROUNDS), grid, run_config)


def test_a_bridged_run_killed_before_round_three_resumes_to_the_same_model(
    kit: SimpleNamespace, tmp_path: Path
) -> None:
    whole = _run(kit, _grid(kit), tmp_path / "whole.db")
    path = tmp_path / "run.db"
    with pytest.raises(ServerKilled):
        _run(kit, _grid(kit, die_at=3), path)
    with RunStore(path) as store:
        assert store.run("flower").last_round == 2
    resumed_grid = _grid(kit)

    resumed = _run(kit, resumed_grid, path, **{"node-timeout": 9})  # how to run: not identity

    pushed_rounds = {int(m.metadata.group_id) for m in resumed_grid.pushed}  # type: ignore[attr-defined]
    assert pushed_rounds == {3, 4}  # rounds 1 and 2 came from the store
    ours, want = resumed.last_result, whole.last_result  # type: ignore[attr-defined]
    assert same_bits(ours.arrays, want.arrays)
    assert [r.to_json_dict() | {"seconds": 0} for r in ours.history] == [
        r.to_json_dict() | {"seconds": 0} for r in want.history
    ]
    assert not np.array_equal(ours.arrays["w"].numpy(), kit.initial()["w"].numpy())
    with RunStore(path) as store:
        assert store.run("flower").last_round == ROUNDS
        stored = store.load("flower").arrays
    assert stored is not None and same_bits(stored, want.arrays)


def test_the_store_commit_every_key_commits_every_n_rounds_and_a_resume_reruns_the_rest(
    kit: SimpleNamespace, tmp_path: Path
) -> None:
    whole = _run(kit, _grid(kit), tmp_path / "whole.db")
    path = tmp_path / "run.db"
    with pytest.raises(ServerKilled):  # round 3 ran, round 4 is being sent: 3 never committed
        _run(kit, _grid(kit, die_at=4), path, **{"store-commit-every": 2})
    with RunStore(path) as store:
        assert store.run("flower").last_round == 2
    resumed_grid = _grid(kit)
    resumed = _run(kit, resumed_grid, path, **{"store-commit-every": 3})  # not identity
    pushed_rounds = {int(m.metadata.group_id) for m in resumed_grid.pushed}  # type: ignore[attr-defined]
    assert pushed_rounds == {3, 4}  # round 3 again, from round 2's model
    ours, want = resumed.last_result, whole.last_result  # type: ignore[attr-defined]
    assert same_bits(ours.arrays, want.arrays)
    with RunStore(path) as store:
        assert store.run("flower").last_round == ROUNDS
    with pytest.raises(ValueError, match="store-commit-every"):
        server_module.Settings.from_run_config({"store-commit-every": 0})


def test_a_stored_run_resumed_with_another_configuration_is_refused(
    kit: SimpleNamespace, tmp_path: Path
) -> None:
    path = tmp_path / "run.db"
    with pytest.raises(ServerKilled):
        _run(kit, _grid(kit, die_at=2), path, lr=0.1)
    with pytest.raises(RunConfigMismatchError):
        _run(kit, _grid(kit), path, lr=0.2)
    _run(kit, _grid(kit), path, **{"store-run": "another", "lr": 0.2})  # its own run
    with RunStore(path) as store:
        assert [r.run_id for r in store.runs()] == ["flower", "another"]
        assert store.run("flower").last_round == 1


def _epsilons(app: object) -> list[float]:
    history = app.last_result.history  # type: ignore[attr-defined]
    return [value for _, value in history.metric("epsilon", source="train_metrics")]


@pytest.mark.parametrize("killed", ["after-round-2", "sending-round-3"])
def test_central_dp_keeps_its_budget_through_the_store_key_and_resumes_with_it(
    kit: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, killed: str
) -> None:
    """The ``store`` run-config key takes CentralDp: a killed ServerApp spends on from its ledger.

    Killed after round 2 committed, the resumed run reports the uninterrupted run's
    epsilon in every round. Killed sending round 3 (its spend committed, as it is before
    any node sees the round), that spend stays counted: round 3 run again counts four
    events, never fewer. The noise is CentralDp's secure source, whose state is never
    stored: the model is not the uninterrupted run's bit for bit.
    """
    client = client_app(kit.numpy_client([fixed_clipping_mod]))

    def run(path: Path, **grid: object) -> object:
        server = kit.numpy_server([CentralDp(noise_multiplier=1.0, clipping_norm=1.0)], rounds=4)
        return kit.run_bridge(
            server,
            grid.get("grid") or kit.LocalFlwrGrid(client, N),
            {
                "store": str(path),
                "num-server-rounds": ROUNDS,
            },
        )

    whole = _epsilons(run(tmp_path / "whole.db"))
    assert len(whole) == ROUNDS and whole == sorted(set(whole))  # it grows every round
    path = tmp_path / "run.db"
    with monkeypatch.context() as patch, pytest.raises(ServerKilled):
        if killed == "after-round-2":  # the bridge logs a round once it committed
            logged = server_module._log_round

            def log_then_die(record: RoundRecord) -> None:
                logged(record)
                if record.round == 2:
                    raise ServerKilled

            patch.setattr(server_module, "_log_round", log_then_die)
            run(path)
        else:
            run(path, grid=_grid_of(kit, client, die_at=3))
    spent = [1, 2] if killed == "after-round-2" else [1, 2, 3]
    with RunStore(path) as store:
        assert store.run("flower").last_round == 2
        assert [s.round for s in store.spends("run:flower")] == spent
    grid = kit.LocalFlwrGrid(client, N)

    resumed = _epsilons(run(path, grid=grid))

    assert {int(m.metadata.group_id) for m in grid.pushed} == {3, 4}
    if killed == "after-round-2":
        assert resumed == whole
    else:
        assert resumed[:2] == whole[:2]
        assert resumed[2] == whole[3]  # round 3 again: four events, as whole's round 4
        assert resumed[3] > whole[3]
    with RunStore(path) as store:
        assert [s.round for s in store.spends("run:flower")] == [*spent, 3, 4]


def test_runs_given_one_store_population_compose_in_its_ledger(
    kit: SimpleNamespace, tmp_path: Path
) -> None:
    """``store-population`` keys the budget: a second run over it starts where the first stopped.

    Two runs of two rounds over one population report, between them, the epsilons of
    one run of four; a run resumed under another population is refused before any round.
    """
    client = client_app(kit.numpy_client([fixed_clipping_mod]))

    def run(path: Path, rounds: int, **config: object) -> object:
        server = kit.numpy_server([CentralDp(noise_multiplier=1.0, clipping_norm=1.0)], rounds=4)
        settings = {"store": str(path), "num-server-rounds": rounds, **config}
        return kit.run_bridge(server, kit.LocalFlwrGrid(client, N), settings)

    four = _epsilons(run(tmp_path / "four.db", 4))
    path = tmp_path / "run.db"
    first = _epsilons(run(path, 2, **{"store-run": "a", "store-population": "hospital"}))
    second = _epsilons(run(path, 2, **{"store-run": "b", "store-population": "hospital"}))
    assert [*first, *second] == four
    with RunStore(path) as store:
        assert [(s.run_id, s.round) for s in store.spends("hospital")] == [
            ("a", 1),
            ("a", 2),
            ("b", 1),
            ("b", 2),
        ]
        assert store.run("b").population_id == "hospital"
    with pytest.raises(RunConfigMismatchError, match="population"):
        run(path, 2, **{"store-run": "b", "store-population": "another"})
    with pytest.raises(ValueError, match="store-population"):
        server_module.Settings.from_run_config({"store-population": 3})


def test_nodes_that_kept_their_state_refuse_the_abandoned_secagg_round_and_the_run_goes_on(
    kit: SimpleNamespace, tmp_path: Path
) -> None:
    """Flower's nodes outlive a ServerApp: SecAgg+ state is theirs, never resumed by the server.

    The server dies in round 3 before collecting the masked inputs; the resumed
    server starts round 3 again with a new session, which every node that began
    round 3 refuses (a node never runs one round twice). The round fails with the
    model unchanged, and round 4 runs as usual.
    """
    from flowerpets.secagg import SecAggPlus, Stage, secaggplus_mod

    class DyingGrid(kit.LocalFlwrGrid):  # type: ignore[name-defined,misc]
        die = True

        def push_messages(self, messages: Iterable[fl.Message]) -> Iterable[str]:
            messages = list(messages)
            stage = f"3:{Stage.COLLECT_MASKED_INPUT}"
            if self.die and any(m.metadata.group_id == stage for m in messages):
                raise ServerKilled
            return super().push_messages(messages)

    grid = DyingGrid(client_app(kit.numpy_client([secaggplus_mod])), 5)
    path = tmp_path / "run.db"
    config = {"store": str(path), "num-server-rounds": ROUNDS}

    def server() -> object:
        return kit.numpy_server([SecAggPlus(degree=4, threshold=3)], rounds=ROUNDS)

    with pytest.raises(ServerKilled):
        kit.run_bridge(server(), grid, config)
    grid.die = False  # the same nodes, their contexts kept: a new ServerApp process
    resumed = kit.run_bridge(server(), grid, config).last_result  # type: ignore[attr-defined]

    rounds = resumed.history.rounds
    assert [r.ok for r in rounds] == [True, True, False, True]
    refusals = rounds[2].failures.values()
    assert len(refusals) == 5 and all("a stale or repeated round" in str(f) for f in refusals)
    with RunStore(path) as store:
        assert same_bits(store.arrays_at("flower", 3), store.arrays_at("flower", 2))
        assert not same_bits(store.arrays_at("flower", 4), store.arrays_at("flower", 3))


def test_an_he_run_is_refused_with_a_store_before_any_node_hears_of_it(
    kit: SimpleNamespace, tmp_path: Path
) -> None:
    """A resumed Flower run is a new flwr run, whose nodes start new contexts: no CKKS key."""
    from flowerpets.exceptions import ParameterValueError
    from flowerpets.he import HomomorphicAggregation

    grid = _grid(kit)
    app = kit.numpy_server([HomomorphicAggregation()], rounds=ROUNDS)
    path = tmp_path / "run.db"
    with pytest.raises(ParameterValueError, match="a SuperNode keeps one per run") as refused:
        kit.run_bridge(app, grid, {"store": str(path), "num-server-rounds": ROUNDS})
    assert "CKKS key lives only in the nodes' contexts" in str(refused.value)
    assert not path.exists()
    assert not grid.pushed  # type: ignore[attr-defined]
