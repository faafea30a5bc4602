"""The store's tables, created in one transaction when a file is new.

The global arrays are files next to the store (:mod:`flowerpets.store.array_files`);
an ``arrays`` row names its file by SHA-256 (``content``) and size.
Every row that holds data carries a SHA-256 (``row_digest`` or ``sha256``)
over its own fields and the keys that place it (run, round, name), so a row
damaged, moved or swapped is refused on read. SQLite's own check on open covers
the file's structure; the digests cover what SQLite does not look at.

``runs.last_round`` is the run's monotone round counter: each commit raises it
by one, in the transaction that writes the round, and on read it must equal the
last round row there is (a lost tail is corruption, never an earlier round).
The privacy ledger is keyed by population, not by run: ``privacy_ledger`` rows
form a hash chain (each digest covers the previous one) whose length and head
``populations`` holds, so a deleted or truncated entry is detected.
"""

from __future__ import annotations

import sqlite3
from typing import Final

from flowerpets.exceptions import CorruptStoreError, StoreError
from flowerpets.store.database.connection import APPLICATION_ID
from flowerpets.store.database.errors import translate

__all__ = ["SCHEMA_VERSION", "ensure_schema"]

SCHEMA_VERSION: Final = 2  # 2: the arrays live in files the rows name

_TABLES: Final = (
    """
    CREATE TABLE runs (
        run_id            TEXT PRIMARY KEY,
        config_json       TEXT NOT NULL,
        config_digest     TEXT NOT NULL,
        population_id     TEXT,
        keep_arrays_every INTEGER NOT NULL CHECK (keep_arrays_every >= 0),
        last_round        INTEGER NOT NULL CHECK (last_round >= 0),
        created_at        REAL NOT NULL,
        row_digest        BLOB NOT NULL
    ) STRICT
    """,
    """
    CREATE TABLE rounds (
        run_id       TEXT NOT NULL REFERENCES runs (run_id),
        round        INTEGER NOT NULL CHECK (round >= 1),
        record_json  TEXT NOT NULL,
        sampler_json TEXT NOT NULL,
        committed_at REAL NOT NULL,
        row_digest   BLOB NOT NULL,
        PRIMARY KEY (run_id, round)
    ) STRICT
    """,
    """
    CREATE TABLE arrays (
        id     INTEGER PRIMARY KEY,
        run_id TEXT NOT NULL REFERENCES runs (run_id),
        round  INTEGER NOT NULL CHECK (round >= 0),
        content BLOB NOT NULL,
        nbytes  INTEGER NOT NULL CHECK (nbytes >= 0),
        sha256  BLOB NOT NULL,
        UNIQUE (run_id, round)
    ) STRICT
    """,
    """
    CREATE TABLE pet_states (
        run_id   TEXT NOT NULL REFERENCES runs (run_id),
        name     TEXT NOT NULL,
        round    INTEGER NOT NULL CHECK (round >= 0),
        encoding TEXT NOT NULL CHECK (encoding IN ('bytes', 'json')),
        value    BLOB NOT NULL,
        sha256   BLOB NOT NULL,
        PRIMARY KEY (run_id, name)
    ) STRICT
    """,
    """
    CREATE TABLE populations (
        population_id TEXT PRIMARY KEY,
        entries       INTEGER NOT NULL CHECK (entries >= 0),
        head          BLOB NOT NULL,
        row_digest    BLOB NOT NULL
    ) STRICT
    """,
    """
    CREATE TABLE privacy_ledger (
        population_id TEXT NOT NULL REFERENCES populations (population_id),
        seq           INTEGER NOT NULL CHECK (seq >= 1),
        run_id        TEXT NOT NULL,
        round         INTEGER NOT NULL CHECK (round >= 0),
        event_json    TEXT NOT NULL,
        recorded_at   REAL NOT NULL,
        row_digest    BLOB NOT NULL,
        PRIMARY KEY (population_id, seq)
    ) STRICT
    """,
    """
    CREATE TABLE leases (
        run_id      TEXT PRIMARY KEY REFERENCES runs (run_id),
        host        TEXT NOT NULL,
        pid         INTEGER NOT NULL,
        process     TEXT NOT NULL,
        token       TEXT NOT NULL,
        acquired_at REAL NOT NULL
    ) STRICT
    """,
)


def ensure_schema(connection: sqlite3.Connection) -> None:
    """Create the tables of a new store, or check an existing store's schema version."""
    try:
        version = connection.execute("PRAGMA user_version").fetchone()[0]
        if version == SCHEMA_VERSION:
            _check_tables(connection)
            return
        if version != 0:
            raise StoreError(
                f"the store has schema version {version}; this build reads {SCHEMA_VERSION}"
            )
        connection.execute("BEGIN IMMEDIATE")
        try:
            # Another process may have created it between our check and our lock.
            if connection.execute("PRAGMA user_version").fetchone()[0] == 0:
                if connection.execute("SELECT count(*) FROM sqlite_schema").fetchone()[0]:
                    raise StoreError("the file is an SQLite database with tables of its own")
                for statement in _TABLES:
                    connection.execute(statement)
                connection.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise
    except sqlite3.Error as exc:
        raise translate(exc, "cannot create the store's tables") from exc


def _schema_rows(connection: sqlite3.Connection) -> list[tuple[str, str, str, str | None]]:
    return connection.execute(
        "SELECT type, name, tbl_name, sql FROM sqlite_schema ORDER BY type, name"
    ).fetchall()


def _check_tables(connection: sqlite3.Connection) -> None:
    """The file's tables must be exactly the ones this version creates.

    The schema is text in the file like any other row: a damaged column name
    or constraint would otherwise surface as a confusing query error, or not at all.
    """
    expected = sqlite3.connect(":memory:")
    try:
        for statement in _TABLES:
            expected.execute(statement)
        wanted = _schema_rows(expected)
    finally:
        expected.close()
    if _schema_rows(connection) != wanted:
        raise CorruptStoreError("the store's table definitions are not this version's: damaged")
