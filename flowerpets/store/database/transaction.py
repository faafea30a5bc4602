"""Transactions: a write commits whole or not at all; a read sees one committed state.

A write transaction is ``BEGIN IMMEDIATE`` ... ``COMMIT``, or nothing at all.

``BEGIN IMMEDIATE`` takes SQLite's write lock before anything is read, so two
writers never interleave a read-check-write; the lock waits up to the
connection's busy timeout and then refuses with
:class:`~flowerpets.exceptions.StoreLockedError`. Any error inside the block,
including a failing ``COMMIT`` (disk full), rolls back: the store is as it was
before the block began.

A read (:func:`consistent_read`) runs in one deferred transaction: in WAL mode
it sees one snapshot, the last commit before its first statement, however
many statements it takes, while writers go on. The arrays' files are not in
the snapshot: a commit after the read began may drop the file the snapshot
names (a thinned round's). A read that finds damage is therefore run again if
another connection committed since its snapshot (``PRAGMA data_version``
moved), and the damage is reported only if the store did not change under it.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Final, TypeVar

from flowerpets.exceptions import CorruptStoreError, StoreError
from flowerpets.store.database.errors import reading, translate

__all__ = ["consistent_read", "read_transaction", "write_transaction"]

T = TypeVar("T")

_ATTEMPTS: Final = 64  # reads in a row the store changed under before giving up


@contextmanager
def write_transaction(connection: sqlite3.Connection, what: str) -> Iterator[sqlite3.Connection]:
    """Run the block in one immediate transaction; ``what`` names it in errors."""
    try:
        connection.execute("BEGIN IMMEDIATE")
    except sqlite3.Error as exc:
        raise translate(exc, f"cannot begin {what}") from exc
    try:
        yield connection
        connection.execute("COMMIT")
    except BaseException as exc:
        if connection.in_transaction:
            with suppress(sqlite3.Error):  # the original error is the one to report
                connection.execute("ROLLBACK")
        if isinstance(exc, sqlite3.Error):
            raise translate(exc, f"{what} failed and was rolled back") from exc
        raise


@contextmanager
def read_transaction(connection: sqlite3.Connection, what: str) -> Iterator[None]:
    """Run the block's reads on one snapshot (inside the caller's transaction if there is one)."""
    if connection.in_transaction:
        yield
        return
    with reading(what):
        connection.execute("BEGIN")
    try:
        yield
    finally:
        if connection.in_transaction:
            with suppress(sqlite3.Error):  # nothing was written: ending it cannot lose data
                connection.execute("COMMIT")


def consistent_read(connection: sqlite3.Connection, what: str, read: Callable[[], T]) -> T:
    """``read()`` on one snapshot; run again while damage it found is a commit's doing.

    A :class:`CorruptStoreError` is raised only when no other connection
    committed between the snapshot and the check: damage that stays.
    """
    if connection.in_transaction:  # the caller's transaction: its snapshot, its writes
        return read()
    for _ in range(_ATTEMPTS):
        with read_transaction(connection, what):
            try:
                return read()
            except CorruptStoreError as exc:
                damage, seen = exc, _data_version(connection, what)
        if _data_version(connection, what) == seen:
            raise damage
    raise StoreError(f"cannot read {what}: the store changed under {_ATTEMPTS} reads in a row")


def _data_version(connection: sqlite3.Connection, what: str) -> int:
    with reading(what):
        return int(connection.execute("PRAGMA data_version").fetchone()[0])
