"""A run store: one SQLite file (and its arrays' files) holding runs, rounds and privacy ledgers.

Open it with :class:`RunStore` (the file is created if missing, and checked
with SQLite's ``quick_check`` if not). Start a run with :meth:`RunStore.start_run`
or continue one with :meth:`RunStore.resume_run`: both return the run's
:class:`~flowerpets.store.run_writer.RunWriter`, which holds the run's lease
until it is closed. Reading (:meth:`RunStore.load`, :meth:`RunStore.spends`)
needs no lease: WAL mode lets readers see the last committed round while a
writer works.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flowerpets import _validation as validate
from flowerpets.core.records import ArrayRecord
from flowerpets.exceptions import (
    MissingRunError,
    ParameterValueError,
    RunConfigMismatchError,
    RunExistsError,
)
from flowerpets.store.array_files import ArrayFiles
from flowerpets.store.closing import Closing
from flowerpets.store.database import (
    IntegrityCheck,
    LeaseOwner,
    consistent_read,
    ensure_schema,
    open_connection,
    translate,
    write_transaction,
)
from flowerpets.store.database.connection import PAGE_SIZE
from flowerpets.store.database.lease import acquire
from flowerpets.store.encoding import canonical_json, json_digest
from flowerpets.store.ledger import SpendRecord, ensure_population, read_spends
from flowerpets.store.rows import read_arrays, read_info, run_digest
from flowerpets.store.run_writer import RunWriter, load_snapshot, write_arrays_row
from flowerpets.store.snapshot import RunInfo, RunSnapshot

__all__ = ["RunStore"]

_ONLY_THE_LAST = 0  # keep_arrays_every=None, as stored


class RunStore(Closing):
    """The run store at ``path``.

    ``check`` is the integrity check on open: ``"quick"`` (default,
    ``PRAGMA quick_check``), ``"full"`` (``PRAGMA integrity_check``) or
    ``"none"``. The global arrays are files in ``<path>.arrays/``, named by
    their SHA-256 (:mod:`flowerpets.store.array_files`). ``max_bytes`` caps the
    store's size (the file, its log and the arrays' files): a commit that would
    grow it further fails with :class:`~flowerpets.exceptions.StoreWriteError`
    like a full disk, leaving the previous round intact. The write-ahead log is
    copied into the main file (checkpointed) once it holds ``checkpoint_bytes``
    (0: after every commit), and when the store is closed: a round is durable
    in the log already. The log takes up to about that much disk on top of the
    file.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        check: IntegrityCheck = "quick",
        max_bytes: int | None = None,
        checkpoint_bytes: int = 256 << 20,
    ) -> None:
        validate.instance("path", path, (str, os.PathLike))
        self._checkpoint_bytes = validate.integer("checkpoint_bytes", checkpoint_bytes, at_least=0)
        self.path = Path(path)
        validate.one_of("check", check, ("quick", "full", "none"))
        limit = (
            None
            if max_bytes is None
            else validate.integer("max_bytes", max_bytes, at_least=PAGE_SIZE)
        )
        self._connection = open_connection(self.path, check=check)
        self._files = ArrayFiles(self.path, max_bytes=limit)
        try:
            ensure_schema(self._connection)
            if limit is not None:
                # In the file's own pages (a store made by another build may have others).
                page = self._connection.execute("PRAGMA page_size").fetchone()[0]
                self._connection.execute(f"PRAGMA max_page_count = {max(1, limit // page)}")
            # A crash between an arrays file's fsync and its round's COMMIT left a file no
            # row names: it goes now.
            with write_transaction(self._connection, "collecting unnamed array files") as db:
                self._files.collect(db)
        except BaseException:
            self._connection.close()
            raise

    # -- runs ----------------------------------------------------------------------------------
    def start_run(
        self,
        run_id: str,
        *,
        config: Mapping[str, Any],
        population_id: str | None = None,
        keep_arrays_every: int | None = 1,
        initial_arrays: ArrayRecord | None = None,
    ) -> RunWriter:
        """Store a new run and take its lease.

        ``config`` (JSON values) is stored with its SHA-256; ``population_id``
        names the privacy ledger it spends from (default ``"run:<run_id>"``);
        the arrays of every ``keep_arrays_every``-th round are kept (None: none but
        the initial ones), and always
        the last round's; ``initial_arrays`` are stored as round 0. Refused with
        :class:`RunExistsError` if the id is taken.
        """
        run_id = _run_id(run_id)
        config_json = canonical_json(
            dict(validate.instance("config", config, Mapping)), name="config"
        )
        population = f"run:{run_id}" if population_id is None else _population(population_id)
        every = (
            _ONLY_THE_LAST
            if keep_arrays_every is None
            else validate.integer("keep_arrays_every", keep_arrays_every, at_least=1)
        )
        frame = (
            None
            if initial_arrays is None
            else self._files.encode(
                validate.instance("initial_arrays", initial_arrays, ArrayRecord)
            )
        )
        owner = LeaseOwner.this_process()
        created_at = time.time()
        digest = json_digest(config_json)
        with write_transaction(self._connection, f"starting run {run_id!r}") as db:
            if db.execute("SELECT 1 FROM runs WHERE run_id = ?", (run_id,)).fetchone():
                raise RunExistsError(f"the store already holds run {run_id!r}: resume it")
            db.execute(
                "INSERT INTO runs (run_id, config_json, config_digest, population_id, "
                "keep_arrays_every, last_round, created_at, row_digest) "
                "VALUES (?, ?, ?, ?, ?, 0, ?, ?)",
                (
                    run_id,
                    config_json,
                    digest,
                    population,
                    every,
                    created_at,
                    run_digest(run_id, config_json, digest, population, every, 0, created_at),
                ),
            )
            ensure_population(db, population)
            if frame is not None:
                content, _ = self._files.write(frame)
                write_arrays_row(db, run_id, 0, frame.nbytes, content)
            acquire(db, run_id, owner)
        return RunWriter(
            self._connection, self._files, run_id, owner, checkpoint_bytes=self._checkpoint_bytes
        )

    def resume_run(self, run_id: str, *, config: Mapping[str, Any] | None = None) -> RunWriter:
        """Take the lease of a stored run to continue it from its last committed round.

        With ``config``, its digest must equal the stored one
        (:class:`RunConfigMismatchError` otherwise). The run and its privacy
        ledger are read and checked first: a damaged one is refused, never
        taken for a fresh start. Refused with :class:`StoreLockedError` while
        another live server holds the run.
        """
        run_id = _run_id(run_id)
        expected = None
        if config is not None:
            expected = json_digest(
                canonical_json(dict(validate.instance("config", config, Mapping)), name="config")
            )
        owner = LeaseOwner.this_process()
        with write_transaction(self._connection, f"resuming run {run_id!r}") as db:
            info = read_info(db, run_id)
            if expected is not None and expected != info.config_digest:
                raise RunConfigMismatchError(
                    f"run {run_id!r} was stored with configuration digest "
                    f"{info.config_digest[:16]}..., the one given has {expected[:16]}..."
                )
            read_spends(db, info.population_id)  # a damaged ledger refuses the resume
            acquire(db, run_id, owner)
        return RunWriter(
            self._connection, self._files, run_id, owner, checkpoint_bytes=self._checkpoint_bytes
        )

    def break_lease(self, run_id: str) -> None:
        """Drop a run's lease whoever holds it: for an operator who knows its holder is dead.

        Needed only for a holder on another host (one on this host is checked);
        the old holder's next commit is then refused.
        """
        run_id = _run_id(run_id)
        with write_transaction(self._connection, f"breaking the lease of {run_id!r}") as db:
            db.execute("DELETE FROM leases WHERE run_id = ?", (run_id,))

    # -- reading -------------------------------------------------------------------------------
    def runs(self) -> list[RunInfo]:
        """Every stored run, oldest first (each row checked)."""

        def read() -> list[RunInfo]:
            try:
                ids = [
                    r[0]
                    for r in self._connection.execute(
                        "SELECT run_id FROM runs ORDER BY created_at, run_id"
                    )
                ]
            except sqlite3.Error as exc:
                raise translate(exc, "cannot list the runs") from exc
            return [read_info(self._connection, run_id) for run_id in ids]

        return consistent_read(self._connection, "the runs", read)

    def run(self, run_id: str) -> RunInfo:
        """The stored run ``run_id`` (:class:`MissingRunError` if there is none)."""
        run_id = _run_id(run_id)
        return consistent_read(
            self._connection, f"run {run_id!r}", lambda: read_info(self._connection, run_id)
        )

    def load(self, run_id: str) -> RunSnapshot:
        """Run ``run_id`` as of its last committed round, every row checked.

        Read on one snapshot of the store, so it is one committed state even
        while a server commits to it (:func:`~flowerpets.store.run_writer.load_snapshot`).
        """
        return load_snapshot(self._connection, self._files, _run_id(run_id))

    def arrays_at(self, run_id: str, round: int) -> ArrayRecord:
        """The global arrays kept for round ``round`` (:class:`MissingRunError` if not kept)."""
        run_id = _run_id(run_id)
        rnd = validate.integer("round", round, at_least=0)

        def read() -> ArrayRecord | None:
            read_info(self._connection, run_id)
            return read_arrays(self._connection, self._files, run_id, rnd)

        arrays = consistent_read(self._connection, f"the arrays of run {run_id!r}", read)
        if arrays is None:
            raise MissingRunError(f"run {run_id!r} keeps no arrays of round {rnd}")
        return arrays

    def populations(self) -> list[str]:
        """Every population with a privacy ledger in this store."""
        try:
            return [
                r[0]
                for r in self._connection.execute(
                    "SELECT population_id FROM populations ORDER BY population_id"
                )
            ]
        except sqlite3.Error as exc:
            raise translate(exc, "cannot list the populations") from exc

    def spends(self, population_id: str) -> list[SpendRecord]:
        """Every privacy event spent on ``population_id``, in order, across all runs.

        The ledger's hash chain is checked: a damaged or truncated ledger raises
        :class:`~flowerpets.exceptions.CorruptStoreError`.
        """
        population = _population(population_id)

        def read() -> list[SpendRecord]:
            try:
                named = self._connection.execute(
                    "SELECT 1 FROM runs WHERE population_id = ? UNION "
                    "SELECT 1 FROM populations WHERE population_id = ?",
                    (population, population),
                ).fetchone()
            except sqlite3.Error as exc:
                raise translate(exc, "cannot read the ledger") from exc
            if named is None:
                raise MissingRunError(f"the store holds no ledger for population {population!r}")
            # A population a run names but with no ledger is damage: read_spends refuses it.
            return read_spends(self._connection, population)

        return consistent_read(self._connection, f"the ledger of {population!r}", read)

    # -- lifetime ------------------------------------------------------------------------------
    def close(self) -> None:
        """Close the file (a clean close checkpoints the log into it)."""
        self._files.close()
        self._connection.close()


def _run_id(run_id: object) -> str:
    return _name("run_id", run_id)


def _population(population_id: object) -> str:
    return _name("population_id", population_id)


def _name(name: str, value: object) -> str:
    text = validate.instance(name, value, str)
    if not text:
        raise ParameterValueError(f"{name} must be a non-empty str")
    return text
