"""Opening a store file: SQLite's pragmas for durability, and its integrity check on open.

Every connection runs in WAL mode with ``synchronous=FULL``: a commit returns
only once the write-ahead log is on disk, so a round that committed survives a
power cut, and a round that did not is not there at all. Checkpoints (copying
the log into the main file) are run by the store after each commit, not by
SQLite's automatic rule, so the cost of a commit is one place to measure.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Final, Literal

from flowerpets.exceptions import CorruptStoreError, StoreError
from flowerpets.store.database.errors import translate

__all__ = ["APPLICATION_ID", "IntegrityCheck", "PAGE_SIZE", "open_connection"]

IntegrityCheck = Literal["quick", "full", "none"]

APPLICATION_ID: Final = 0x46504753  # b"FPGS": a flowerpets store, in the file's header
# Set when a store is created. The file holds only small rows (the arrays are files of
# their own), so a commit logs a few pages: small pages keep the log's write and fsync
# small (64 KiB pages logged 320 kB a round). A store made with other pages keeps them.
PAGE_SIZE: Final = 4096
BUSY_TIMEOUT_MS: Final = 5000


def open_connection(path: str | os.PathLike[str], *, check: IntegrityCheck) -> sqlite3.Connection:
    """A configured connection to the store at ``path`` (created if missing).

    ``check`` runs ``PRAGMA quick_check`` (``"quick"``, every page read once) or
    ``PRAGMA integrity_check`` (``"full"``, also every index) before anything
    is read: a damaged file raises :class:`CorruptStoreError`, never an empty run.
    """
    target = Path(path)
    fresh = not target.exists() or target.stat().st_size == 0
    try:
        # isolation_level=None: the store writes BEGIN IMMEDIATE / COMMIT itself.
        connection = sqlite3.connect(target, isolation_level=None, check_same_thread=True)
    except sqlite3.Error as exc:
        raise translate(exc, f"cannot open the store {str(target)!r}") from exc
    try:
        _configure(connection, fresh=fresh)
        if not fresh:
            _check_identity(connection, target)
            if check != "none":
                _check_integrity(connection, target, full=check == "full")
    except UnicodeDecodeError:
        # SQLite's own message quoted damaged schema text that is not UTF-8.
        connection.close()
        raise CorruptStoreError(f"the schema of {str(target)!r} is damaged") from None
    except BaseException:
        connection.close()
        raise
    return connection


def _text(data: bytes) -> str:
    # Text SQLite hands back is UTF-8 unless the file was damaged.
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise CorruptStoreError("the store holds text that is not UTF-8: it was damaged") from None


def _configure(connection: sqlite3.Connection, *, fresh: bool) -> None:
    connection.text_factory = _text
    try:
        connection.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        if fresh:
            connection.execute(f"PRAGMA page_size = {PAGE_SIZE}")  # only before the first table
        mode = connection.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        connection.execute("PRAGMA synchronous = FULL")
        connection.execute("PRAGMA wal_autocheckpoint = 0")
        connection.execute("PRAGMA foreign_keys = ON")
        connection.execute("PRAGMA cell_size_check = ON")  # malformed cells are errors, not reads
    except sqlite3.Error as exc:
        raise translate(exc, "cannot configure the store") from exc
    if str(mode).lower() != "wal":
        raise StoreError(f"the store's file system does not support WAL mode (got {mode!r})")


def _check_identity(connection: sqlite3.Connection, target: Path) -> None:
    try:
        application_id = connection.execute("PRAGMA application_id").fetchone()[0]
    except sqlite3.Error as exc:
        raise translate(exc, f"{str(target)!r} cannot be read as a store") from exc
    if application_id not in (0, APPLICATION_ID):
        raise CorruptStoreError(f"{str(target)!r} is an SQLite file but not a flowerpets store")


def _check_integrity(connection: sqlite3.Connection, target: Path, *, full: bool) -> None:
    pragma = "integrity_check" if full else "quick_check"
    try:
        rows = connection.execute(f"PRAGMA {pragma}(20)").fetchall()
    except sqlite3.Error as exc:
        raise translate(exc, f"the integrity check of {str(target)!r} failed") from exc
    problems = [str(row[0]) for row in rows]
    if problems != ["ok"]:
        # SQLite's messages name pages and tables, never the stored values.
        raise CorruptStoreError(
            f"the store {str(target)!r} failed {pragma}: " + "; ".join(problems[:5])
        )
