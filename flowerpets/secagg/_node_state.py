"""A node's SecAgg+ round state: its phases, the transition table, and the context record.

Per node and round the client mod is an explicit state machine whose every
transition is checked against one table (:data:`TRANSITIONS`). The state (a
frozen :class:`ClientState`, with the round's private keys and self-mask seed)
lives in ``context.state`` through :class:`~flowerpets.core.state.StateSlot`
(a record it cannot read raises :class:`~flowerpets.exceptions.StateError`,
never reads as a new round), beside the round's configuration in the wire
format the node received it in; it is wiped when the round ends.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any

from flowerpets.core import (
    ConfigRecord,
    Context,
)
from flowerpets.core.fields import Fields
from flowerpets.core.state import StateSlot
from flowerpets.exceptions import (
    CorruptStateError,
    MessageFieldError,
    ProtocolViolationError,
    RequestRefusedError,
)
from flowerpets.secagg.protocol import (
    RoundConfig,
    Stage,
    Threat,
)

__all__ = [
    "MALICIOUS_TRANSITIONS",
    "SLOT",
    "STATE",
    "STATE_CONFIG",
    "TABLES",
    "TRANSITIONS",
    "ClientState",
    "Phase",
    "abort",
    "load",
    "transition",
]

STATE = "secagg+/client-state"
STATE_CONFIG = "secagg+/client-round"


class Phase(enum.StrEnum):
    """Where a node's round stands; :data:`TRANSITIONS` says which stage moves it on."""

    NEW = "new"  # no state for this round yet (never stored: the round starts at advertise-keys)
    ADVERTISED = "advertised"
    SHARED = "shared"
    MASKED = "masked"
    CHECKED = "checked"  # malicious mode: signed the survivor set at the consistency check
    DONE = "done"
    ABORTED = "aborted"


TRANSITIONS: Mapping[tuple[Phase, str], Phase] = MappingProxyType(
    {
        (Phase.NEW, Stage.ADVERTISE_KEYS): Phase.ADVERTISED,
        (Phase.ADVERTISED, Stage.SHARE_KEYS): Phase.SHARED,
        (Phase.SHARED, Stage.COLLECT_MASKED_INPUT): Phase.MASKED,
        (Phase.MASKED, Stage.UNMASK): Phase.DONE,
    }
)
"""A semi-honest round: (phase of the message's round, stage) -> the phase after it;
every other pair is refused.

A refused pair aborts the round (ABORTED: its secrets are wiped), except where the
node has nothing to abort: a round it never started (NEW) or one it finished (DONE).
"""

MALICIOUS_TRANSITIONS: Mapping[tuple[Phase, str], Phase] = MappingProxyType(
    {
        (Phase.NEW, Stage.ADVERTISE_KEYS): Phase.ADVERTISED,
        (Phase.ADVERTISED, Stage.SHARE_KEYS): Phase.SHARED,
        (Phase.SHARED, Stage.COLLECT_MASKED_INPUT): Phase.MASKED,
        (Phase.MASKED, Stage.CONSISTENCY_CHECK): Phase.CHECKED,
        (Phase.CHECKED, Stage.UNMASK): Phase.DONE,
    }
)
"""A malicious-mode round: the consistency check comes between masking and unmasking, and
a node signs one survivor set per round (CHECKED is left by unmask only)."""

TABLES: Mapping[Threat, Mapping[tuple[Phase, str], Phase]] = MappingProxyType(
    {Threat.SEMI_HONEST: TRANSITIONS, Threat.MALICIOUS: MALICIOUS_TRANSITIONS}
)
"""The transition table of each threat model (the round's configuration names it)."""


def transition(phase: Phase, stage: str, threat: Threat = Threat.SEMI_HONEST) -> Phase:
    """The phase after ``stage`` in a round of ``threat``; a stage this phase does not allow
    is refused."""
    table = TABLES[threat]
    after = table.get((phase, stage))
    if after is None:
        needs = [p.value for (p, s), _ in table.items() if s == stage]
        raise RequestRefusedError(
            f"{stage}: out of order (the round is {phase.value}, this stage needs "
            f"{' or '.join(needs) or f'nothing: it is no stage of a {threat.value} round'})"
        )
    return after


@dataclass(frozen=True, slots=True)
class ClientState:
    """One node's state for its current round, kept in ``context.state[STATE]``.

    The round's :class:`RoundConfig` is kept beside it (``STATE_CONFIG``), written
    once per round in the wire format the node received it in.
    """

    run_id: int
    round: int
    phase: Phase
    c_sk: bytes = b""
    s_sk: bytes = b""
    self_seed: bytes = b""
    neighbours: tuple[int, ...] = ()  # told at share-keys: got my shares
    share_keys: tuple[bytes, ...] = ()  # AES-GCM keys, per neighbour
    s_pks: tuple[bytes, ...] = ()
    senders: tuple[int, ...] = ()  # delivered shares to me: I mask with them
    b_shares: tuple[bytes, ...] = ()
    s_shares: tuple[bytes, ...] = ()
    released_b: tuple[int, ...] = ()
    released_s: tuple[int, ...] = ()
    signed_set: tuple[int, ...] = ()  # malicious mode: the survivor set it signed (sorted)

    def after(self, stage: str, threat: Threat, **changes: Any) -> ClientState:
        """This state after ``stage`` (checked against ``threat``'s table), with ``changes``."""
        return replace(self, phase=transition(self.phase, stage, threat), **changes)

    def wiped(self, phase: Phase) -> ClientState:
        """The round ended: every secret forgotten (what was released stays recorded)."""
        return replace(self, phase=phase, **_SECRETS_WIPED)


_SECRETS_WIPED: dict[str, Any] = {
    **dict.fromkeys(("c_sk", "s_sk", "self_seed"), b""),
    **dict.fromkeys(("share_keys", "b_shares", "s_shares"), ()),
}


SLOT = StateSlot(ClientState, STATE)


def load(context: Context) -> tuple[ClientState, RoundConfig] | None:
    state = SLOT.get(context.state)
    if state is None:
        return None
    record = context.state.get(STATE_CONFIG)
    if not isinstance(record, ConfigRecord):
        raise CorruptStateError(f"state {STATE_CONFIG!r} holds no ConfigRecord")
    try:
        config = _parsed(
            tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in record.items())
        )
    except (MessageFieldError, ProtocolViolationError) as exc:
        raise CorruptStateError(f"state {STATE_CONFIG!r} cannot be read: {exc}") from None
    return state, config


@functools.lru_cache(maxsize=2)
def _parsed(items: tuple[tuple[str, Any], ...]) -> RoundConfig:
    # Every stage of a round reads the same record: parse it (and build its graph, digest and
    # quantization) once per content, not once per stage. The key is the content itself; two
    # entries (this round's and the last) since each holds a ring order of the whole cohort.
    record = ConfigRecord({k: list(v) if isinstance(v, tuple) else v for k, v in items})
    return RoundConfig.from_record(Fields(record, STATE_CONFIG))


def abort(state: ClientState | None, context: Context) -> None:
    """The round ends unfinished: its secrets are wiped (nothing to do after DONE)."""
    if state is not None and state.phase != Phase.DONE:
        SLOT.store(context.state, state.wiped(Phase.ABORTED))
