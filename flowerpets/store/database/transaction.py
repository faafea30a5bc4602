"""One write transaction: ``BEGIN IMMEDIATE`` ... ``COMMIT``, or nothing at all.

``BEGIN IMMEDIATE`` takes SQLite's write lock before anything is read, so two
writers never interleave a read-check-write; the lock waits up to the
connection's busy timeout and then refuses with
:class:`~flowerpets.exceptions.StoreLockedError`. Any error inside the block,
including a failing ``COMMIT`` (disk full), rolls back: the store is as it was
before the block began.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager, suppress

from flowerpets.store.database.errors import translate

__all__ = ["write_transaction"]


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
