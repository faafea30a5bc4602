"""CentralDp's state in a run store: its spends in the population's ledger, its state per round.

With a store (``ServerApp(..., store=writer)``) the budget follows the data:
every event a round spends is appended to the run's **population** ledger
(:meth:`flowerpets.store.RunWriter.record_spend`, its own committed
transaction) before any node sees the round, so before the noised aggregate
is released; the epsilon reported and checked against ``max_epsilon`` is that
of every event on the population's ledger, every run's, composed sequentially
by one accountant (chosen by the population's first event). The run's own
state (its ledger, the clip, the settings it ran with and its last spend's
entry) is committed with every round as the PET state ``"dp.central"``.

A resume continues exactly that state, or refuses with a typed
:class:`~flowerpets.exceptions.PrivacyLedgerError`: no state although rounds
were committed (:class:`MissingPrivacyLedgerError`), a state that counts more
or fewer events than the population's ledger holds for the run
(:class:`TruncatedPrivacyLedgerError`), other settings, another population or
other events (:class:`PrivacyLedgerMismatchError`). The spends of a round that
was interrupted after spending (and is run again) stay counted: a crash
over-counts, never under-counts.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from flowerpets.core import ServerContext
from flowerpets.dp.accountant import PrivacyEvent
from flowerpets.dp.central._ledger import (
    Ledger,
    RunState,
    _ledger_from_texts,
    added,
    event_from_json,
    event_json,
    ledger_texts,
)
from flowerpets.exceptions import (
    IncompatibleModsError,
    MissingPrivacyLedgerError,
    PrivacyLedgerError,
    PrivacyLedgerMismatchError,
    StateError,
    TruncatedPrivacyLedgerError,
)

if TYPE_CHECKING:
    from flowerpets.store import SpendRecord

__all__ = [
    "MECHANISM",
    "SpendJournal",
    "decode_state",
    "encode_state",
    "population_ledger",
    "restored",
    "spend_entry",
    "spend_journal",
]

MECHANISM = "CentralDp"
"""The ``mechanism`` of the ledger entries CentralDp writes."""

DISTRIBUTED = "DistributedDp"
"""The ``mechanism`` of the ledger entries DistributedDp writes."""

_MECHANISMS = frozenset({MECHANISM, DISTRIBUTED})

_VERSION = 1


@runtime_checkable
class SpendJournal(Protocol):
    """A run journal that keeps a population's privacy ledger (a RunWriter does)."""

    @property
    def run_id(self) -> str: ...

    @property
    def population_id(self) -> str: ...

    def record_spend(self, event: Mapping[str, Any], *, round: int) -> SpendRecord: ...

    def spends(self) -> Sequence[SpendRecord]: ...


def spend_journal(context: ServerContext) -> SpendJournal | None:
    """The context's journal as a privacy ledger (None without a store); refuses one without."""
    journal = context.journal
    if journal is None:
        return None
    if not isinstance(journal, SpendJournal):
        raise IncompatibleModsError(
            f"CentralDp keeps its budget in the run store, but {type(journal).__name__} keeps "
            "no privacy ledger (record_spend, spends): use a flowerpets.store.RunWriter"
        )
    return journal


def spend_entry(
    event: PrivacyEvent, *, delta: float, accountant: str, mechanism: str = MECHANISM
) -> dict[str, Any]:
    """One population-ledger entry: the event, the delta and the accountant it was counted at."""
    return {
        "mechanism": mechanism,
        "event": event_json(event),
        "delta": delta,
        "accountant": accountant,
    }


def population_ledger(spends: Sequence[SpendRecord]) -> Ledger:
    """The events of a population's ledger entries, each distinct one with its count.

    An entry that is not a CentralDp or DistributedDp event is refused, never
    skipped: skipping it would count less than was spent.
    """
    ledger: Ledger = ()
    for spend in spends:
        ledger = added(ledger, _entry_event(spend))
    return ledger


def _entry_event(spend: SpendRecord) -> PrivacyEvent:
    event = None
    if spend.event.get("mechanism") in _MECHANISMS:
        try:
            event = event_from_json(spend.event["event"])
        except (KeyError, TypeError, ValueError):
            event = None
    if event is None:
        raise PrivacyLedgerMismatchError(
            f"entry {spend.seq} of population {spend.population_id!r}'s ledger is not an event "
            "a DP mod can compose"
        )
    return event


def encode_state(run: RunState, settings: Mapping[str, Any]) -> bytes:
    """The run state and the settings it was spent under, as canonical JSON."""
    value = {
        "version": _VERSION,
        "settings": dict(settings),
        "clip": run.clip,
        "ledger": ledger_texts(run.ledger),
        "spend_seq": run.spend_seq,
    }
    return json.dumps(value, sort_keys=True, allow_nan=False, separators=(",", ":")).encode()


def decode_state(state: bytes, where: str) -> tuple[dict[str, Any], RunState]:
    """The settings and run state :func:`encode_state` wrote; refuses anything else."""
    malformed = PrivacyLedgerError(f"the stored privacy state of {where} is malformed")
    try:
        value = json.loads(state)
    except ValueError:
        raise malformed from None
    if (
        not isinstance(value, dict)
        or set(value) != {"version", "settings", "clip", "ledger", "spend_seq"}
        or value["version"] != _VERSION
        or not isinstance(value["settings"], dict)
        or type(value["clip"]) is not float
    ):
        raise malformed
    try:
        run = RunState(
            clip=value["clip"],
            ledger=_ledger_from_texts(value["ledger"]),
            spend_seq=value["spend_seq"],
        )
    except (KeyError, TypeError, ValueError, StateError):
        raise malformed from None
    settings: dict[str, Any] = value["settings"]
    return settings, run


def restored(
    journal: SpendJournal,
    state: bytes | None,
    *,
    round: int,
    settings: Mapping[str, Any],
    population: str | None,
    clip: float,
) -> RunState:
    """The run state to continue from ``state`` (committed with ``round``), checked.

    The run's entries on the population's ledger must begin with exactly the
    events ``state`` counts, ending at its last spend; later entries of the
    run are spends of a round that was interrupted before it committed, and
    are added (over-counted). Refused with a :class:`PrivacyLedgerError` otherwise.
    """
    where = f"run {journal.run_id!r}"
    if population is not None and journal.population_id != population:
        raise PrivacyLedgerMismatchError(
            f"{where} spends from population {journal.population_id!r}, but CentralDp was "
            f"given population={population!r}"
        )
    spends = journal.spends()  # the chain is checked: a damaged ledger raises CorruptStoreError
    population_ledger(spends)  # every entry must be ours to compose
    mine = [spend for spend in spends if spend.run_id == journal.run_id]
    if state is None:
        if round > 0:
            raise MissingPrivacyLedgerError(
                f"{where} committed {round} round(s) but stored no CentralDp state: its budget "
                "cannot be continued"
            )
        run, last = RunState(clip=clip), 0
    else:
        stored, run = decode_state(state, where)
        changed = sorted(k for k in {*stored, *settings} if stored.get(k) != settings.get(k))
        if changed:
            raise PrivacyLedgerMismatchError(
                f"{where} was run with other CentralDp settings ({', '.join(changed)} differ): "
                "resume it with the settings it spent its budget under"
            )
        last = run.spend_seq or 0
    committed = [spend for spend in mine if spend.seq <= last]
    if last and (not committed or committed[-1].seq != last):
        raise TruncatedPrivacyLedgerError(
            f"{where}'s state ends with spend {last} of population {journal.population_id!r}, "
            "which its ledger does not hold: the ledger lost entries"
        )
    on_ledger = population_ledger(committed)
    if dict(on_ledger) != dict(run.ledger):
        counted = sum(count for _, count in run.ledger)
        if counted != len(committed):
            raise TruncatedPrivacyLedgerError(
                f"{where}'s state counts {counted} event(s) where the population's ledger holds "
                f"{len(committed)} for it"
            )
        raise PrivacyLedgerMismatchError(
            f"{where}'s state counts other events than the population's ledger holds for it"
        )
    later = [spend for spend in mine if spend.seq > last]
    if any(spend.round <= round for spend in later):
        raise TruncatedPrivacyLedgerError(
            f"{where}'s state lacks spends of rounds it committed: the state was cut short"
        )
    ledger = run.ledger
    for spend in later:  # an interrupted round's spend: released or not, it stays counted
        ledger = added(ledger, _entry_event(spend))
    return RunState(clip=run.clip, ledger=ledger, spend_seq=mine[-1].seq if mine else None)
