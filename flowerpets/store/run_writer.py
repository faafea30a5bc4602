"""Writing one run: a round commits whole or not at all, and spent budget commits first.

A :class:`RunWriter` holds the run's lease (see
:mod:`flowerpets.store.database.lease`), so it is the only live writer of the
run. :meth:`RunWriter.commit_round` writes everything a round produced in one
``BEGIN IMMEDIATE`` transaction under ``synchronous=FULL``: the round's record
(the history grows by it, and by the rounds since the last commit if the app
commits every N rounds), the cohort generator's state, the global arrays
(thinned to every ``keep_arrays_every``-th round plus the last), the PETs'
server states and the round counter. If anything fails, nothing of the round
is stored and the previous round is intact. :meth:`RunWriter.record_spend`
commits a privacy event in a transaction of its own, to call *before* the
noised result it pays for is released.

The arrays are encoded before the transaction opens; inside it, their frame
is written to its own file (:mod:`flowerpets.store.array_files`, hashed on a
helper thread while it is written) and made durable before the small rows
naming it are written and committed. The files the previous commit stopped
naming are dropped at the start of the next commit's transaction (and when
the writer closes), so the dropped file is the spare the next frame
overwrites; the log is checkpointed into the main file once it holds
``checkpoint_bytes``.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flowerpets import _validation as check
from flowerpets.core.history import RoundRecord
from flowerpets.core.journal import Resumption
from flowerpets.core.records import ArrayRecord
from flowerpets.exceptions import (
    CorruptStoreError,
    ParameterValueError,
    RoundSequenceError,
)
from flowerpets.store.array_files import ArrayFiles, Frame
from flowerpets.store.closing import Closing
from flowerpets.store.database import LeaseOwner, consistent_read, translate, write_transaction
from flowerpets.store.database.lease import check_held, release
from flowerpets.store.encoding import (
    canonical_json,
    generator_from_state,
    generator_state,
)
from flowerpets.store.ledger import SpendRecord, append_spend, read_spends
from flowerpets.store.rows import (
    arrays_digest,
    pet_state_digest,
    read_arrays,
    read_history,
    read_info,
    read_pet_states,
    read_sampler_state,
    round_digest,
    run_digest,
)
from flowerpets.store.snapshot import PetState, RunInfo, RunSnapshot

__all__ = ["RunWriter"]

log = logging.getLogger(__name__)

# The sampler state of a round committed with a later one: only a commit's own is kept.
_NO_SAMPLER = "null"


class RunWriter(Closing):
    """The lease-holding writer of one run of a :class:`~flowerpets.store.RunStore`.

    Made by ``RunStore.start_run`` or ``RunStore.resume_run``; use it as a
    context manager (or call :meth:`close`) to give the lease back.
    ``last_commit_seconds`` holds how long the parts of the last commit took
    (``encode``, ``write``: the arrays' file, ``digest``: the wait for their
    SHA-256 once the file is on disk, ``commit``: the rows and ``COMMIT``,
    ``collect``: dropping the files the commit before stopped naming, ``checkpoint``).
    """

    def __init__(
        self,
        connection: sqlite3.Connection,
        files: ArrayFiles,
        run_id: str,
        owner: LeaseOwner,
        *,
        checkpoint_bytes: int = 0,
    ) -> None:
        self._connection = connection
        self._files = files
        self._wal = Path(f"{files.store_path}-wal")
        self._checkpoint_bytes = checkpoint_bytes
        self.run_id = run_id
        self._owner = owner
        self._closed = False
        self.last_commit_seconds: dict[str, float] = {}

    # -- reading ---------------------------------------------------------------------------------
    @property
    def info(self) -> RunInfo:
        """The run's stored row (its configuration, population and round counter)."""
        return consistent_read(
            self._connection,
            f"run {self.run_id!r}",
            lambda: read_info(self._connection, self.run_id),
        )

    @property
    def last_round(self) -> int:
        return self.info.last_round

    @property
    def population_id(self) -> str:
        """The population whose privacy ledger this run spends from."""
        return self.info.population_id

    def spends(self) -> list[SpendRecord]:
        """Every entry of the run's population ledger, every run's, in order, the chain checked."""
        return consistent_read(
            self._connection,
            f"the ledger of run {self.run_id!r}",
            lambda: read_spends(self._connection, self.info.population_id),
        )

    def pet_state(self, name: str) -> bytes | None:
        """The state PET ``name`` committed with the last round, as bytes (None if none).

        A JSON state comes back as its canonical JSON text. This and
        :meth:`commit_round`'s ``pet_states`` are how a
        :class:`~flowerpets.core.journal.DurableState` mod keeps its state here.
        """
        check.instance("name", name, str)
        state = read_pet_states(self._connection, self.run_id).get(name)
        if state is None or isinstance(state, bytes):
            return state
        return canonical_json(state, name=f"pet_states[{name!r}]").encode("ascii")

    def snapshot(self) -> RunSnapshot:
        """The run as of its last committed round (see :class:`RunSnapshot`)."""
        return load_snapshot(self._connection, self._files, self.run_id)

    def resumption(self) -> Resumption | None:
        """Where a ServerApp continues this run (None before the first committed round).

        This makes the writer a :class:`~flowerpets.core.journal.RunJournal`:
        ``ServerApp(..., store=writer)`` commits every round here and resumes
        after the last one.
        """
        snapshot = self.snapshot()
        if snapshot.round == 0:
            return None
        if snapshot.arrays is None or snapshot.sampler_state is None:
            raise CorruptStoreError(f"run {self.run_id!r} lacks the state of its last round")
        return Resumption(
            round=snapshot.round,
            arrays=snapshot.arrays,
            history=snapshot.history,
            rng=generator_from_state(snapshot.sampler_state),
        )

    # -- writing ---------------------------------------------------------------------------------
    def commit_round(
        self,
        record: RoundRecord,
        *,
        arrays: ArrayRecord,
        sampler: np.random.Generator | Mapping[str, Any],
        pet_states: Mapping[str, PetState] | None = None,
        since: Sequence[RoundRecord] = (),
    ) -> None:
        """Commit round ``record.round``: it must be the round after the last one committed.

        ``arrays`` are the global arrays after the round, ``sampler`` the cohort
        generator (or its :func:`~flowerpets.store.encoding.generator_state`)
        after it, ``pet_states`` the PETs' server states to replace (by name;
        bytes or a JSON value). ``since`` are the records of the rounds run
        after the last commit and before ``record`` (``ServerApp(commit_every=N)``):
        they commit in the same transaction, without arrays or a sampler state
        of their own (a resume continues after ``record``).
        Raises :class:`RoundSequenceError` out of order,
        :class:`StoreLockedError` if the lease was lost and
        :class:`StoreWriteError` if the disk refused; in every case nothing of
        the round was stored.
        """
        self._require_open()
        check.instance("record", record, RoundRecord)
        check.instance("arrays", arrays, ArrayRecord)
        rnd = check.integer("record.round", record.round, at_least=1)
        earlier = [check.instance("since", r, RoundRecord) for r in since]
        if [r.round for r in earlier] != list(range(rnd - len(earlier), rnd)):
            raise RoundSequenceError(
                f"the rounds committed with round {rnd} must be the ones just before it, "
                f"got {[r.round for r in earlier]}"
            )
        timings: dict[str, float] = {}
        started = time.perf_counter()
        state = (
            sampler
            if isinstance(sampler, Mapping)
            else generator_state(check.instance("sampler", sampler, np.random.Generator))
        )
        pets = [_encode_pet_state(name, value) for name, value in (pet_states or {}).items()]
        prepared = _PreparedRound(
            round=rnd,
            earlier=[canonical_json(r.to_json_dict(), name="since") for r in earlier],
            record_json=canonical_json(record.to_json_dict(), name="record"),
            sampler_json=canonical_json(dict(state), name="sampler"),
            frame=self._files.encode(arrays),
            pets=[
                (name, encoding, value, pet_state_digest(self.run_id, name, rnd, encoding, value))
                for name, encoding, value in pets
            ],
            committed_at=time.time(),
        )
        timings["encode"] = time.perf_counter() - started
        with write_transaction(self._connection, f"the commit of round {rnd}") as db:
            started = time.perf_counter()
            info = self._check_next(db, rnd - len(earlier))
            # The files the last commit stopped naming (a thinned round's) are dropped here,
            # under the lock, not in a transaction of their own after it: the dropped file
            # becomes the spare this round's frame overwrites.
            self._collect(db)
            timings["collect"] = time.perf_counter() - started
            started = time.perf_counter()
            # The arrays' file is durable before the rows that name it can commit.
            content, timings["digest"] = self._files.write(prepared.frame)
            timings["write"] = time.perf_counter() - started - timings["digest"]
            started = time.perf_counter()
            self._write_round(db, info, prepared, content, prepared.frame.nbytes)
        timings["commit"] = time.perf_counter() - started  # rows + COMMIT: the log's fsync
        started = time.perf_counter()
        if self._log_bytes() >= self._checkpoint_bytes:
            self._checkpoint()
        timings["checkpoint"] = time.perf_counter() - started
        self.last_commit_seconds = timings

    def _check_next(self, db: sqlite3.Connection, rnd: int) -> RunInfo:
        check_held(db, self.run_id, self._owner)
        info = read_info(db, self.run_id)
        if rnd != info.last_round + 1:
            raise RoundSequenceError(
                f"run {self.run_id!r} committed round {info.last_round} last; "
                f"round {rnd} cannot follow it"
            )
        return info

    def _write_round(
        self,
        db: sqlite3.Connection,
        info: RunInfo,
        prepared: _PreparedRound,
        content: bytes,
        nbytes: int,
    ) -> None:
        """Every row of the round, inside the caller's transaction, once its arrays' file
        (SHA-256 ``content``, ``nbytes`` long) is on disk."""
        rnd = prepared.round
        first = rnd - len(prepared.earlier)
        rows = [(first + i, text, _NO_SAMPLER) for i, text in enumerate(prepared.earlier)]
        rows.append((rnd, prepared.record_json, prepared.sampler_json))
        db.executemany(
            "INSERT INTO rounds (run_id, round, record_json, sampler_json, committed_at, "
            "row_digest) VALUES (?, ?, ?, ?, ?, ?)",
            [
                (
                    self.run_id,
                    number,
                    record_json,
                    sampler_json,
                    prepared.committed_at,
                    round_digest(
                        self.run_id, number, record_json, sampler_json, prepared.committed_at
                    ),
                )
                for number, record_json, sampler_json in rows
            ],
        )
        _thin_arrays(db, self.run_id, rnd, info.keep_arrays_every)
        write_arrays_row(db, self.run_id, rnd, nbytes, content)
        for name, encoding, value, digest in prepared.pets:
            db.execute(
                "INSERT INTO pet_states (run_id, name, round, encoding, value, sha256) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (run_id, name) DO UPDATE SET "
                "round = excluded.round, encoding = excluded.encoding, "
                "value = excluded.value, sha256 = excluded.sha256",
                (self.run_id, name, rnd, encoding, value, digest),
            )
        _set_last_round(db, info, rnd)

    def record_spend(self, event: Mapping[str, Any], *, round: int) -> SpendRecord:
        """Commit one privacy event to the run's population ledger, in its own transaction.

        Call it before the noised result the event pays for is released: once it
        returns the spend is on disk, so a crash after it over-counts and a
        restart can never spend the same budget again.
        """
        self._require_open()
        rnd = check.integer("round", round, at_least=0)
        check.instance("event", event, Mapping)
        with write_transaction(self._connection, f"recording a spend of round {rnd}") as db:
            check_held(db, self.run_id, self._owner)
            info = read_info(db, self.run_id)
            return append_spend(db, info.population_id, run_id=self.run_id, round=rnd, event=event)

    def close(self) -> None:
        """Give the lease back (the store stays open)."""
        if self._closed:
            return
        self._closed = True
        try:
            with write_transaction(
                self._connection, f"releasing the lease of {self.run_id!r}"
            ) as db:
                release(db, self.run_id, self._owner)
                self._collect(db)  # the last commit's thinned round's file
        except sqlite3.Error as exc:  # pragma: no cover - translated by write_transaction
            raise translate(exc, "cannot release the lease") from exc

    def _require_open(self) -> None:
        if self._closed:
            raise ParameterValueError(f"the writer of run {self.run_id!r} is closed")

    def _collect(self, db: sqlite3.Connection) -> None:
        # Inside a write transaction: the files no committed row names any more go. A
        # collection that fails only leaves them for the next one.
        try:
            self._files.collect(db)
        except (sqlite3.Error, OSError) as exc:
            log.warning("collecting the arrays' files no row names failed: %s", exc)

    def _log_bytes(self) -> int:
        try:
            return self._wal.stat().st_size
        except FileNotFoundError:
            return 0

    def _checkpoint(self) -> None:
        # The round is durable in the log already; a checkpoint that fails (another reader,
        # a full disk) only leaves the log longer, and the next one copies it.
        try:
            self._connection.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        except sqlite3.Error as exc:
            log.warning("checkpoint after a commit failed, the round is committed: %s", exc)


@dataclass(frozen=True, slots=True)
class _PreparedRound:
    """A round encoded before its transaction opens: the lock is held only for the writes."""

    round: int
    earlier: list[str]  # the records of the rounds committed with it, in order
    record_json: str
    sampler_json: str
    frame: Frame  # the codec frame's parts (the arrays' data as views), being hashed
    pets: list[tuple[str, str, bytes, bytes]]  # name, encoding, value, SHA-256
    committed_at: float


def load_snapshot(connection: sqlite3.Connection, files: ArrayFiles, run_id: str) -> RunSnapshot:
    """Everything stored about ``run_id`` as of its last committed round, every row checked.

    Read on one snapshot (:func:`~flowerpets.store.database.consistent_read`):
    the rows are one committed state, and a file a commit after the snapshot
    dropped (a thinned round's) makes the read start again on the new state,
    never a :class:`CorruptStoreError`.
    """
    return consistent_read(
        connection, f"run {run_id!r}", lambda: _read_snapshot(connection, files, run_id)
    )


def _read_snapshot(connection: sqlite3.Connection, files: ArrayFiles, run_id: str) -> RunSnapshot:
    info = read_info(connection, run_id)
    history = read_history(connection, run_id, info.last_round)
    arrays = read_arrays(connection, files, run_id, info.last_round)
    if arrays is None and info.last_round > 0:
        raise CorruptStoreError(f"run {run_id!r} lacks the arrays of its last round")
    sampler = None
    if info.last_round > 0:
        sampler = read_sampler_state(connection, run_id, info.last_round)
    return RunSnapshot(
        info=info,
        round=info.last_round,
        arrays=arrays,
        history=history,
        sampler_state=sampler,
        pet_states=read_pet_states(connection, run_id),
    )


def _encode_pet_state(name: object, value: PetState) -> tuple[str, str, bytes]:
    if not isinstance(name, str) or not name:
        raise ParameterValueError("every PET state needs a non-empty str name")
    if isinstance(value, bytes | bytearray | memoryview):
        return name, "bytes", bytes(value)
    return name, "json", canonical_json(value, name=f"pet_states[{name!r}]").encode("ascii")


def write_arrays_row(
    db: sqlite3.Connection, run_id: str, rnd: int, nbytes: int, content: bytes
) -> None:
    """The arrays row of round ``rnd``: the size and SHA-256 of the file written for it."""
    db.execute(
        "INSERT INTO arrays (run_id, round, content, nbytes, sha256) VALUES (?, ?, ?, ?, ?) "
        "ON CONFLICT (run_id, round) DO UPDATE SET content = excluded.content, "
        "nbytes = excluded.nbytes, sha256 = excluded.sha256",
        (run_id, rnd, content, nbytes, arrays_digest(run_id, rnd, nbytes, content)),
    )


def _thin_arrays(db: sqlite3.Connection, run_id: str, rnd: int, every: int) -> None:
    """Drop earlier rounds' arrays off the keep-every grid (the initial arrays stay).

    ``every`` = 0 keeps no earlier round's (``keep_arrays_every=None``).
    """
    if every == 0:
        db.execute("DELETE FROM arrays WHERE run_id = ? AND round > 0 AND round < ?", (run_id, rnd))
        return
    db.execute(
        "DELETE FROM arrays WHERE run_id = ? AND round > 0 AND round < ? AND round % ? != 0",
        (run_id, rnd, every),
    )


def _set_last_round(db: sqlite3.Connection, info: RunInfo, rnd: int) -> None:
    # The stored text, not a re-encoding of it: the digest covers the bytes on disk.
    config_json = db.execute(
        "SELECT config_json FROM runs WHERE run_id = ?", (info.run_id,)
    ).fetchone()[0]
    db.execute(
        "UPDATE runs SET last_round = ?, row_digest = ? WHERE run_id = ?",
        (
            rnd,
            run_digest(
                info.run_id,
                config_json,
                info.config_digest,
                info.population_id,
                info.keep_arrays_every,
                rnd,
                info.created_at,
            ),
            info.run_id,
        ),
    )
