"""The store's rows: the digest each one carries, and reading them back checked.

The writer (:mod:`flowerpets.store.run_writer`) computes the same digests when
it writes; everything read here is checked against them first, so a damaged
row raises :class:`~flowerpets.exceptions.CorruptStoreError` and is never
returned.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from flowerpets.core.history import History, RoundRecord
from flowerpets.core.records import ArrayRecord
from flowerpets.exceptions import CorruptStoreError, MissingRunError
from flowerpets.store.array_files import ArrayFiles
from flowerpets.store.database import fetch, reading
from flowerpets.store.encoding import (
    check_digest,
    decode_arrays,
    json_digest,
    parse_json,
    row_digest,
    row_hasher,
)
from flowerpets.store.snapshot import PetState, RunInfo

__all__ = [
    "arrays_digest",
    "pet_state_digest",
    "read_arrays",
    "read_history",
    "read_info",
    "read_pet_states",
    "read_sampler_state",
    "round_digest",
    "run_digest",
]


def run_digest(
    run_id: str,
    config_json: str,
    config_digest: str,
    population_id: str,
    keep_arrays_every: int,
    last_round: int,
    created_at: float,
) -> bytes:
    return row_digest(
        "runs",
        run_id,
        config_json,
        config_digest,
        population_id,
        keep_arrays_every,
        last_round,
        created_at,
    )


def round_digest(
    run_id: str, rnd: int, record_json: str, sampler_json: str, committed_at: float
) -> bytes:
    return row_digest("rounds", run_id, rnd, record_json, sampler_json, committed_at)


def arrays_digest(run_id: str, rnd: int, nbytes: int, content: bytes) -> bytes:
    """The arrays row's digest: its keys, and the size and SHA-256 of the file it names."""
    return row_digest("arrays", run_id, rnd, nbytes, content)


def pet_state_digest(run_id: str, name: str, rnd: int, encoding: str, value: bytes) -> bytes:
    hasher = row_hasher("pet_states", (run_id, name, rnd, encoding))
    hasher.update(value)
    return hasher.digest()


def read_info(connection: sqlite3.Connection, run_id: str) -> RunInfo:
    """The run's row, checked; its round counter checked against the rounds there are."""
    what = f"run {run_id!r}"
    rows = fetch(
        connection,
        what,
        "SELECT config_json, config_digest, population_id, keep_arrays_every, last_round, "
        "created_at, row_digest FROM runs WHERE run_id = ?",
        run_id,
    )
    if not rows:
        raise MissingRunError(f"the store holds no run {run_id!r}")
    top = fetch(connection, what, "SELECT max(round) FROM rounds WHERE run_id = ?", run_id)[0][0]
    row = rows[0]
    config_json, config_digest, population_id, every, last_round, created_at, digest = row
    where = f"the row of run {run_id!r}"
    try:
        computed = run_digest(
            run_id, config_json, config_digest, population_id, every, last_round, created_at
        )
    except (TypeError, AttributeError, ValueError):
        raise CorruptStoreError(f"{where} is malformed") from None
    check_digest(digest, computed, where)
    if json_digest(config_json) != config_digest:
        raise CorruptStoreError(f"the configuration of run {run_id!r} does not match its digest")
    if (top or 0) != last_round:
        raise CorruptStoreError(
            f"run {run_id!r} records {last_round} committed rounds but the store holds "
            f"{top or 0}: rounds were lost"
        )
    return RunInfo(
        run_id=run_id,
        config=parse_json(config_json, f"the configuration of run {run_id!r}"),
        config_digest=config_digest,
        population_id=population_id,
        keep_arrays_every=every,
        last_round=last_round,
        created_at=created_at,
    )


def read_history(connection: sqlite3.Connection, run_id: str, last_round: int) -> History:
    """Every committed round's record, in order, each checked."""
    rows = fetch(
        connection,
        f"the rounds of run {run_id!r}",
        "SELECT round, record_json, sampler_json, committed_at, row_digest FROM rounds "
        "WHERE run_id = ? ORDER BY round",
        run_id,
    )
    history = History()
    for expected, (rnd, record_json, sampler_json, committed_at, digest) in enumerate(rows, 1):
        where = f"round {expected} of run {run_id!r}"
        if rnd != expected:
            raise CorruptStoreError(f"run {run_id!r} lacks round {expected}")
        check_digest(
            digest, round_digest(run_id, rnd, record_json, sampler_json, committed_at), where
        )
        try:
            record = RoundRecord.from_json_dict(parse_json(record_json, where))
        except (KeyError, TypeError, ValueError, AttributeError):
            raise CorruptStoreError(f"the record of {where} is malformed") from None
        history.append(record)
    if len(history) != last_round:
        raise CorruptStoreError(f"run {run_id!r} holds {len(history)} of {last_round} rounds")
    return history


def read_sampler_state(connection: sqlite3.Connection, run_id: str, rnd: int) -> Any:
    """The cohort generator's state after round ``rnd`` (its row checked)."""
    with reading(f"round {rnd} of run {run_id!r}"):
        row = connection.execute(
            "SELECT record_json, sampler_json, committed_at, row_digest FROM rounds "
            "WHERE run_id = ? AND round = ?",
            (run_id, rnd),
        ).fetchone()
    where = f"round {rnd} of run {run_id!r}"
    if row is None:
        raise CorruptStoreError(f"run {run_id!r} lacks round {rnd}")
    record_json, sampler_json, committed_at, digest = row
    check_digest(digest, round_digest(run_id, rnd, record_json, sampler_json, committed_at), where)
    return parse_json(sampler_json, f"the sampler state of {where}")


def read_arrays(
    connection: sqlite3.Connection, files: ArrayFiles, run_id: str, rnd: int
) -> ArrayRecord | None:
    """The global arrays stored for round ``rnd`` (None if none were kept), checked:
    the row's digest, then the file's length and SHA-256."""
    rows = fetch(
        connection,
        f"the arrays of run {run_id!r}",
        "SELECT content, nbytes, sha256 FROM arrays WHERE run_id = ? AND round = ?",
        run_id,
        rnd,
    )
    if not rows:
        return None
    content, nbytes, digest = rows[0]
    where = f"the arrays of round {rnd} of run {run_id!r}"
    if not isinstance(content, bytes) or len(content) != 32 or not isinstance(nbytes, int):
        raise CorruptStoreError(f"{where} are malformed: the row was damaged")
    check_digest(digest, arrays_digest(run_id, rnd, nbytes, content), where)
    return decode_arrays(files.read(content, nbytes, where), where)


def read_pet_states(connection: sqlite3.Connection, run_id: str) -> dict[str, PetState]:
    """Each PET's last committed server state, checked."""
    rows = fetch(
        connection,
        f"the PET states of run {run_id!r}",
        "SELECT name, round, encoding, value, sha256 FROM pet_states WHERE run_id = ? "
        "ORDER BY name",
        run_id,
    )
    states: dict[str, PetState] = {}
    for name, rnd, encoding, value, digest in rows:
        where = f"PET state {name!r} of run {run_id!r}"
        if not isinstance(value, bytes) or encoding not in ("bytes", "json"):
            raise CorruptStoreError(f"{where} is malformed")
        check_digest(digest, pet_state_digest(run_id, name, rnd, encoding, value), where)
        if encoding == "bytes":
            states[name] = value
        else:
            try:
                text = value.decode("ascii")
            except UnicodeDecodeError:
                raise CorruptStoreError(f"{where} is not JSON text") from None
            states[name] = parse_json(text, where)
    return states
