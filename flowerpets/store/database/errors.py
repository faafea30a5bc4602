"""SQLite's errors, as the store's typed errors.

The primary result code says whose fault it is: a damaged file
(``SQLITE_CORRUPT``, ``SQLITE_NOTADB``), another writer holding the lock
(``SQLITE_BUSY``, ``SQLITE_LOCKED``), or a write the disk refused
(``SQLITE_FULL``, ``SQLITE_IOERR``, ...). A failed write always rolls back, so
the previous round is intact whatever the error.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Final

from flowerpets.exceptions import CorruptStoreError, StoreError, StoreLockedError, StoreWriteError

__all__ = ["fetch", "reading", "translate"]

_CORRUPT: Final = frozenset({11, 26})  # SQLITE_CORRUPT, SQLITE_NOTADB
_BUSY: Final = frozenset({5, 6})  # SQLITE_BUSY, SQLITE_LOCKED
# SQLITE_READONLY, SQLITE_IOERR, SQLITE_FULL, SQLITE_CANTOPEN, SQLITE_PROTOCOL
_WRITE: Final = frozenset({8, 10, 13, 14, 15})


def translate(exc: sqlite3.Error, what: str) -> StoreError:
    """The typed error for ``exc``; ``what`` says what the store was doing."""
    code = getattr(exc, "sqlite_errorcode", None)
    primary = None if code is None else code & 0xFF
    name = getattr(exc, "sqlite_errorname", None) or type(exc).__name__
    message = f"{what}: {name}: {exc}"
    if primary in _CORRUPT or (
        primary is None and isinstance(exc, sqlite3.DatabaseError) and "malformed" in str(exc)
    ):
        return CorruptStoreError(message)
    if primary in _BUSY:
        return StoreLockedError(message)
    if primary in _WRITE:
        return StoreWriteError(message)
    return StoreError(message)


@contextmanager
def reading(what: str) -> Iterator[None]:
    """Translate SQLite's errors raised in the block; ``what`` says what was being read."""
    try:
        yield
    except sqlite3.Error as exc:
        raise translate(exc, f"cannot read {what}") from exc


def fetch(connection: sqlite3.Connection, what: str, sql: str, *params: object) -> list[Any]:
    """Every row ``sql`` selects, SQLite's errors translated; ``what`` names what is read."""
    with reading(what):
        return connection.execute(sql, params).fetchall()
