"""A run's lease: at most one live server writes a run.

The lease is a row (host, pid, the process's start time, a random token)
written in a ``BEGIN IMMEDIATE`` transaction. A second server is refused while
the holder lives. On the same host a holder is alive if a process with its pid
exists *and* started when the holder did (a reused pid is not the holder); a
holder on another host cannot be checked from here, so it is taken as alive
until an operator breaks the lease. Every commit checks, inside its own
transaction, that the lease still carries this writer's token.
"""

from __future__ import annotations

import os
import secrets
import socket
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from flowerpets.exceptions import StoreLockedError

__all__ = ["LeaseOwner", "acquire", "check_held", "release"]


@dataclass(frozen=True, slots=True)
class LeaseOwner:
    """Who holds a lease: the host, the process and its start time, and a token."""

    host: str
    pid: int
    process: str
    token: str

    @classmethod
    def this_process(cls) -> LeaseOwner:
        pid = os.getpid()
        return cls(socket.gethostname(), pid, _process_start(pid) or "", secrets.token_hex(16))

    def alive(self) -> bool:
        """This owner still runs (always True for another host: it cannot be checked)."""
        if self.host != socket.gethostname():
            return True
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # exists, owned by another user
            pass
        started = _process_start(self.pid)
        return started is None or not self.process or started == self.process

    def __str__(self) -> str:
        return f"pid {self.pid} on {self.host}"


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), or None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 2 (the command) may hold spaces and parentheses: split after its last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    return fields[19] if len(fields) > 19 else None


def acquire(connection: sqlite3.Connection, run_id: str, owner: LeaseOwner) -> None:
    """Take the lease of ``run_id`` for ``owner`` (inside the caller's write transaction).

    Refused with :class:`StoreLockedError` while another live owner holds it; a
    dead owner's lease is taken over.
    """
    row = connection.execute(
        "SELECT host, pid, process, token FROM leases WHERE run_id = ?", (run_id,)
    ).fetchone()
    if row is not None:
        holder = LeaseOwner(str(row[0]), int(row[1]), str(row[2]), str(row[3]))
        if holder.token != owner.token and holder.alive():
            raise StoreLockedError(
                f"run {run_id!r} is held by another server ({holder}); "
                "a second server may not write to it"
            )
    connection.execute(
        "INSERT INTO leases (run_id, host, pid, process, token, acquired_at) "
        "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (run_id) DO UPDATE SET "
        "host = excluded.host, pid = excluded.pid, process = excluded.process, "
        "token = excluded.token, acquired_at = excluded.acquired_at",
        (run_id, owner.host, owner.pid, owner.process, owner.token, time.time()),
    )


def check_held(connection: sqlite3.Connection, run_id: str, owner: LeaseOwner) -> None:
    """Refuse unless ``owner`` still holds the lease (inside the caller's write transaction)."""
    row = connection.execute("SELECT token FROM leases WHERE run_id = ?", (run_id,)).fetchone()
    if row is None or row[0] != owner.token:
        raise StoreLockedError(
            f"this server no longer holds the lease of run {run_id!r}: "
            "it was broken or taken over, so the commit is refused"
        )


def release(connection: sqlite3.Connection, run_id: str, owner: LeaseOwner) -> None:
    """Give the lease up, if ``owner`` still holds it (inside a write transaction)."""
    connection.execute("DELETE FROM leases WHERE run_id = ? AND token = ?", (run_id, owner.token))
