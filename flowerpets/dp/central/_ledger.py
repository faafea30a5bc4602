"""A run's privacy state: the ledger of events and the clip, kept in the run's context.

The state is a :class:`RunState` in ``context.state["dp.central"]``, written by
:class:`~flowerpets.core.state.StateSlot`: each distinct event with its count,
as explicit JSON, and the clip. Everything else is derived from it: the
accountant (chosen by the first event, or made by the mod's factory), the
epsilon spent and the rounds counted. Nothing lives in the mod, so one
:class:`~flowerpets.dp.CentralDp` may serve any number of runs, and a run's
budget lasts as long as its context. A state that cannot be read stops the run
rather than restart the budget.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, get_args

from flowerpets._validation import integer, real
from flowerpets.core import ServerContext
from flowerpets.core.state import StateSlot, convert
from flowerpets.dp.accountant import (
    Accountant,
    AccountantFactory,
    PrivacyEvent,
    default_accountant,
    default_neighbouring,
)
from flowerpets.exceptions import ParameterValueError, StateError, StateTypeError, StopRunError

__all__ = [
    "STATE_KEY",
    "Ledger",
    "RunState",
    "accountant_for",
    "added",
    "charged",
    "event_from_json",
    "event_json",
    "ledger_texts",
    "load",
    "spent",
    "store",
]

STATE_KEY = "dp.central"

Ledger = tuple[tuple[PrivacyEvent, int], ...]

_EVENT_TYPES: dict[str, type] = {cls.__name__: cls for cls in get_args(PrivacyEvent)}


def ledger_texts(ledger: Ledger) -> list[str]:
    """Each distinct event and its count as explicit JSON, the form it takes in the run state."""
    return [
        json.dumps({"count": count, "event": event_json(event)}, sort_keys=True)
        for event, count in ledger
    ]


def event_json(event: PrivacyEvent) -> dict[str, Any]:
    """An event as JSON: its type's name and its fields (also a store ledger entry's event)."""
    return {"type": type(event).__name__, **_fields(event)}


def event_from_json(value: Any) -> PrivacyEvent:
    """The event :func:`event_json` describes (KeyError, TypeError or ValueError if none)."""
    fields = dict(value)
    cls = _EVENT_TYPES[fields.pop("type")]
    event: PrivacyEvent = cls(**fields)
    return event


def _fields(event: PrivacyEvent) -> dict[str, Any]:
    return {f.name: getattr(event, f.name) for f in dataclasses.fields(event)}


def _ledger_from_texts(texts: Any) -> Ledger:
    if not isinstance(texts, list):
        raise StateTypeError("the ledger is a list of JSON texts")
    ledger = []
    for text in texts:
        entry = json.loads(text)
        ledger.append((event_from_json(entry["event"]), entry["count"]))
    return tuple(ledger)


@dataclass(frozen=True, slots=True)
class RunState:
    """One run's privacy state: the clip and the ledger (each distinct event with its count).

    ``spend_seq``: with a run store, the population ledger's entry of the run's
    last spend (None before the first, and without a store).
    """

    clip: float
    ledger: Ledger = field(default=(), metadata=convert(ledger_texts, _ledger_from_texts))
    spend_seq: int | None = None

    def __post_init__(self) -> None:
        # A negative or infinite clip would scale the noise with it: never continue on one.
        real("the clip", self.clip, above=0, secret=True)  # adaptive clipping learns it from data
        for _, count in self.ledger:
            integer("a ledger count", count, at_least=1)
        if len({event for event, _ in self.ledger}) != len(self.ledger):
            raise ParameterValueError("the ledger lists an event twice")
        if self.spend_seq is not None:
            integer("the last spend's entry", self.spend_seq, at_least=1)

    @property
    def rounds(self) -> int:
        return sum(count for _, count in self.ledger)


_SLOTS = {STATE_KEY: StateSlot(RunState, STATE_KEY)}


def _slot(key: str) -> StateSlot[RunState]:
    slot = _SLOTS.get(key)
    if slot is None:
        slot = _SLOTS[key] = StateSlot(RunState, key)
    return slot


def load(context: ServerContext, clip: float, *, key: str = STATE_KEY) -> RunState:
    """This run's state under ``key``; only a context with no record starts a new run, at ``clip``.

    State that cannot be read stops the run: continuing would forget the budget spent.
    Each DP server mod keeps its state under a key of its own (CentralDp's is
    :data:`STATE_KEY`).
    """
    try:
        return _slot(key).get(context.state, RunState(clip=clip))
    except StateError as exc:
        raise StopRunError(
            f"the run's {key!r} state is unreadable ({exc}): the DP mod will not "
            "continue a run whose privacy ledger it cannot read"
        ) from None


def store(context: ServerContext, run: RunState, *, key: str = STATE_KEY) -> None:
    """Write ``run`` to the run's context under ``key`` (replacing the state it held)."""
    _slot(key).store(context.state, run)


def accountant_for(
    ledger: Ledger, event: PrivacyEvent, factory: AccountantFactory | None
) -> Accountant:
    """The accountant with ``ledger`` composed (``event`` chooses it for an empty ledger).

    ``factory`` makes the accountant for the first event's neighbouring relation;
    None: :func:`~flowerpets.dp.accountant.default_accountant`'s choice.
    """
    first = ledger[0][0] if ledger else event
    accountant = (
        default_accountant(first)
        if factory is None
        else factory(neighbouring=default_neighbouring(first))
    )
    for past, count in ledger:
        accountant.compose(past, count)
    return accountant


def added(ledger: Ledger, event: PrivacyEvent, count: int = 1) -> Ledger:
    """``ledger`` with ``count`` more of ``event`` (each distinct event listed once, in order)."""
    counts = dict(ledger)
    counts[event] = counts.get(event, 0) + count
    return tuple(counts.items())


def spent(ledger: Ledger, factory: AccountantFactory | None, delta: float) -> float:
    """The epsilon (at ``delta``) of the events ``ledger`` counts."""
    if not ledger:
        return 0.0
    return accountant_for(ledger, ledger[0][0], factory).get_epsilon(delta)


def charged(
    run: RunState,
    event: PrivacyEvent,
    *,
    factory: AccountantFactory | None,
    delta: float,
    max_epsilon: float | None,
    round: int,
    budget: Ledger | None = None,
) -> tuple[RunState, float]:
    """``run`` with ``event`` added, and the epsilon; refuses a round over the budget.

    The epsilon is that of ``budget`` (the events the budget counts: a
    population's, every run's, with a run store; None: the run's own ledger)
    with ``event`` composed. The refusal is a
    :class:`~flowerpets.exceptions.StopRunError`, raised before anything
    changes (the caller stores the state it returns only).
    """
    counted = run.ledger if budget is None else budget
    accountant = accountant_for(counted, event, factory)
    before = accountant.copy()
    epsilon = accountant.compose(event).get_epsilon(delta)
    if max_epsilon is not None and epsilon > max_epsilon:
        rounds = sum(count for _, count in counted)
        raise StopRunError(
            f"privacy budget: round {round} would raise epsilon to {epsilon:.4g} at "
            f"delta={delta:g}, above max_epsilon={max_epsilon:g} "
            f"(spent {before.get_epsilon(delta):.4g} in {rounds} round(s))"
        )
    return dataclasses.replace(run, ledger=added(run.ledger, event)), epsilon
