"""Durable runs: a run store on SQLite, so a server that crashes loses nothing.

A :class:`RunStore` is one SQLite file (WAL mode, ``synchronous=FULL``) and a
directory of the global arrays' files, each fsynced before the commit naming it. Per
run it holds the configuration and its SHA-256, each committed round's record,
the global arrays (in the core's codec, never pickle; every N rounds plus the
last), the cohort sampler's state, each PET's server state and a monotone
round counter; a round commits whole or not at all. Privacy budgets are kept
per population, not per run or process, in a hash-chained ledger that every
run over the same data appends to. A damaged or truncated file, a row whose
SHA-256 does not match, and a second server for a live run are refused with
typed errors (:class:`~flowerpets.exceptions.StoreError` and its subclasses).
See ``docs/durability.md``.
"""

from flowerpets.store.ledger import SpendRecord
from flowerpets.store.run_store import RunStore
from flowerpets.store.run_writer import RunWriter
from flowerpets.store.snapshot import PetState, RunInfo, RunSnapshot

__all__ = ["PetState", "RunInfo", "RunSnapshot", "RunStore", "RunWriter", "SpendRecord"]
