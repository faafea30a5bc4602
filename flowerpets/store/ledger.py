"""The privacy ledger: what each population's data has spent, across every run and restart.

A budget follows the data, not the process: each entry is keyed by a
population id the operator chooses, so two runs over the same people append
to one ledger. An entry is a DP event's description as JSON (the accountant's
own format; :mod:`flowerpets.dp` composes them) with the run and round that
spent it. Entries are only ever appended, each in its own committed
transaction *before* the noised result it pays for is released: a crash after
the entry and before the release over-counts, never under-counts.

The entries of a population form a hash chain (each digest covers the one
before), whose length and head the ``populations`` row holds: an entry
deleted, changed or cut off the end is detected on read and refused with
:class:`~flowerpets.exceptions.CorruptStoreError`, never read as less spent.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flowerpets.exceptions import CorruptStoreError
from flowerpets.store.database import reading
from flowerpets.store.encoding import canonical_json, check_digest, parse_json, row_digest

__all__ = ["SpendRecord", "append_spend", "ensure_population", "read_spends"]


@dataclass(frozen=True, slots=True)
class SpendRecord:
    """One entry of a population's ledger: the ``seq``-th event spent on it."""

    population_id: str
    seq: int
    run_id: str
    round: int
    event: Mapping[str, Any]
    recorded_at: float


def _genesis(population_id: str) -> bytes:
    return row_digest("ledger-genesis", population_id)


def _population_digest(population_id: str, entries: int, head: bytes) -> bytes:
    return row_digest("populations", population_id, entries, head)


def _head(connection: sqlite3.Connection, population_id: str) -> tuple[int, bytes] | None:
    with reading(f"the ledger head of population {population_id!r}"):
        row = connection.execute(
            "SELECT entries, head, row_digest FROM populations WHERE population_id = ?",
            (population_id,),
        ).fetchone()
    if row is None:
        return None
    entries, head, digest = row
    if not isinstance(entries, int) or not isinstance(head, bytes):
        raise CorruptStoreError(f"the ledger head of population {population_id!r} is malformed")
    check_digest(
        digest,
        _population_digest(population_id, entries, head),
        f"the ledger head of population {population_id!r}",
    )
    return entries, head


def ensure_population(connection: sqlite3.Connection, population_id: str) -> None:
    """Open an empty ledger for ``population_id`` unless it has one (inside a write transaction)."""
    if _head(connection, population_id) is None:
        genesis = _genesis(population_id)
        connection.execute(
            "INSERT INTO populations (population_id, entries, head, row_digest) "
            "VALUES (?, 0, ?, ?)",
            (population_id, genesis, _population_digest(population_id, 0, genesis)),
        )


def append_spend(
    connection: sqlite3.Connection,
    population_id: str,
    *,
    run_id: str,
    round: int,
    event: Mapping[str, Any],
) -> SpendRecord:
    """Append one event to the population's ledger (inside the caller's write transaction)."""
    text = canonical_json(dict(event), name="event")
    head = _head(connection, population_id)
    if head is None:
        raise CorruptStoreError(f"population {population_id!r} has no ledger in this store")
    entries, previous = head
    seq, recorded_at = entries + 1, time.time()
    digest = row_digest(
        "privacy_ledger", population_id, seq, run_id, round, text, recorded_at, previous
    )
    connection.execute(
        "INSERT INTO privacy_ledger (population_id, seq, run_id, round, event_json, recorded_at, "
        "row_digest) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (population_id, seq, run_id, round, text, recorded_at, digest),
    )
    connection.execute(
        "UPDATE populations SET entries = ?, head = ?, row_digest = ? WHERE population_id = ?",
        (seq, digest, _population_digest(population_id, seq, digest), population_id),
    )
    return SpendRecord(population_id, seq, run_id, round, parse_json(text, "event"), recorded_at)


def read_spends(connection: sqlite3.Connection, population_id: str) -> list[SpendRecord]:
    """Every entry of the population's ledger, in order, the whole chain checked.

    A population with no ledger at all is refused (``CorruptStoreError`` if a
    run names it; the caller decides): never read as an empty ledger here.
    """
    head = _head(connection, population_id)
    if head is None:
        raise CorruptStoreError(f"population {population_id!r} has no ledger in this store")
    entries, last = head
    with reading(f"the privacy ledger of population {population_id!r}"):
        rows = connection.execute(
            "SELECT seq, run_id, round, event_json, recorded_at, row_digest FROM privacy_ledger "
            "WHERE population_id = ? ORDER BY seq",
            (population_id,),
        ).fetchall()
    where = f"the privacy ledger of population {population_id!r}"
    previous, out = _genesis(population_id), []
    for expected, (seq, run_id, rnd, text, recorded_at, digest) in enumerate(rows, start=1):
        if seq != expected:
            raise CorruptStoreError(f"{where} lacks entry {expected}")
        check_digest(
            digest,
            row_digest(
                "privacy_ledger", population_id, seq, run_id, rnd, text, recorded_at, previous
            ),
            f"{where}, entry {seq}",
        )
        out.append(
            SpendRecord(population_id, seq, run_id, rnd, parse_json(text, where), recorded_at)
        )
        previous = digest
    if len(out) != entries or previous != last:
        raise CorruptStoreError(
            f"{where} has {len(out)} entries where its head records {entries}: it was truncated"
        )
    return out
