"""Two servers for one run: the second is refused while the first lives."""

from __future__ import annotations

import socket
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from flowerpets.exceptions import StoreLockedError
from flowerpets.store import RunStore
from tests.store.processes import let_it_die_mid_commit, server_holding_lease
from tests.store.stored_runs import StoredRun, model, record


def test_a_second_writer_in_this_process_is_refused(stored_run: StoredRun) -> None:
    with RunStore(stored_run.path) as first, RunStore(stored_run.path) as second:
        with first.resume_run(stored_run.run_id):
            with pytest.raises(StoreLockedError, match=f"pid {__import__('os').getpid()}"):
                second.resume_run(stored_run.run_id)
            assert second.load(stored_run.run_id).round == 3  # reading needs no lease
        with second.resume_run(stored_run.run_id) as writer:  # released on close
            assert writer.last_round == 3


def test_a_live_server_process_keeps_its_run_and_a_dead_one_loses_it(tmp_path: Path) -> None:
    path = tmp_path / "runs.db"
    with server_holding_lease(path) as child:
        refused = pytest.raises(StoreLockedError, match=f"pid {child.pid}")
        with RunStore(path) as store, refused:
            store.resume_run("run-a")
        let_it_die_mid_commit(child)
    with RunStore(path) as store, store.resume_run("run-a") as writer:
        assert writer.last_round == 3  # the round being committed when it died is not there
        writer.commit_round(record(4), arrays=model(4), sampler=np.random.default_rng(0))
        assert writer.last_round == 4


def test_a_holder_on_another_host_is_refused_until_the_lease_is_broken(
    stored_run: StoredRun,
) -> None:
    with sqlite3.connect(stored_run.path) as connection:
        connection.execute(
            "INSERT INTO leases VALUES ('run-a', ?, 1, '', 'their-token', 0)",
            (socket.gethostname() + "-elsewhere",),
        )
    connection.close()
    with RunStore(stored_run.path) as store:
        with pytest.raises(StoreLockedError, match="elsewhere"):
            store.resume_run(stored_run.run_id)
        store.break_lease(stored_run.run_id)
        with store.resume_run(stored_run.run_id) as writer:
            assert writer.last_round == 3


def test_a_writer_whose_lease_was_broken_cannot_commit(stored_run: StoredRun) -> None:
    with RunStore(stored_run.path) as store, RunStore(stored_run.path) as operator:
        writer = store.resume_run(stored_run.run_id)
        operator.break_lease(stored_run.run_id)
        with operator.resume_run(stored_run.run_id) as successor:
            with pytest.raises(StoreLockedError, match="no longer holds"):
                writer.commit_round(record(4), arrays=model(4), sampler=np.random.default_rng(0))
            with pytest.raises(StoreLockedError):
                writer.record_spend({"kind": "gaussian"}, round=4)
            assert successor.last_round == 3
        writer.close()
