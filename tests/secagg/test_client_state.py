"""The client's state machine: every phase x stage pair, in the table and through the mod.

The table test checks :data:`TRANSITIONS` (semi-honest) and
:data:`MALICIOUS_TRANSITIONS` themselves; the mod test drives a real node, of
either threat model, into each phase of a round and sends it each stage with an
honest server's fields: the node answers exactly the pairs its table allows, and
a refused pair aborts the round unless the node has nothing to abort (a round
not started, or finished).
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from flowerpets.core import ConfigRecord, ErrorCode
from flowerpets.exceptions import RequestRefusedError, StateError
from flowerpets.secagg import Phase, Stage, Threat
from flowerpets.secagg._node_state import (
    MALICIOUS_TRANSITIONS,
    TABLES,
    TRANSITIONS,
    ClientState,
    transition,
)
from flowerpets.secagg._node_state import SLOT as _SLOT
from flowerpets.secagg._node_state import STATE as _STATE

ALLOWED = {
    (Phase.NEW, Stage.ADVERTISE_KEYS): Phase.ADVERTISED,
    (Phase.ADVERTISED, Stage.SHARE_KEYS): Phase.SHARED,
    (Phase.SHARED, Stage.COLLECT_MASKED_INPUT): Phase.MASKED,
    (Phase.MASKED, Stage.UNMASK): Phase.DONE,
}
# Malicious mode: the consistency check between masking and unmasking, signed once.
ALLOWED_MALICIOUS = {
    (Phase.NEW, Stage.ADVERTISE_KEYS): Phase.ADVERTISED,
    (Phase.ADVERTISED, Stage.SHARE_KEYS): Phase.SHARED,
    (Phase.SHARED, Stage.COLLECT_MASKED_INPUT): Phase.MASKED,
    (Phase.MASKED, Stage.CONSISTENCY_CHECK): Phase.CHECKED,
    (Phase.CHECKED, Stage.UNMASK): Phase.DONE,
}
EXPECTED = {Threat.SEMI_HONEST: ALLOWED, Threat.MALICIOUS: ALLOWED_MALICIOUS}
PAIRS = list(itertools.product(Threat, Phase, Stage.ALL))


@pytest.mark.parametrize(("threat", "phase", "stage"), PAIRS)
def test_every_transition_is_in_the_table_or_refused(
    threat: Threat, phase: Phase, stage: str
) -> None:
    allowed = EXPECTED[threat]
    if (phase, stage) in allowed:
        assert transition(phase, stage, threat) is allowed[(phase, stage)]
    else:
        with pytest.raises(RequestRefusedError, match="out of order"):
            transition(phase, stage, threat)
    assert dict(TRANSITIONS) == ALLOWED and dict(MALICIOUS_TRANSITIONS) == ALLOWED_MALICIOUS
    assert TABLES[threat] is (
        TRANSITIONS if threat is Threat.SEMI_HONEST else MALICIOUS_TRANSITIONS
    )


def _into(fed: Any, node: int, phase: Phase) -> None:
    """Bring ``node``'s round 1 to ``phase`` (the others follow an honest server)."""
    if phase is Phase.NEW:
        return
    fed.advertise()
    if phase is Phase.ABORTED:
        fed.unmask(node, fed.ids, [node])  # this node listed as dropped: it aborts
        return
    if phase is not Phase.ADVERTISED:
        fed.share()
    if phase in (Phase.MASKED, Phase.CHECKED, Phase.DONE):
        fed.collect()
    if phase is Phase.CHECKED or (phase is Phase.DONE and fed.malicious):
        fed.check()
    if phase is Phase.DONE:
        fed.ok(fed.unmask(node, fed.ids, []))


def _honest(fed: Any, node: int, stage: str) -> Any:
    if stage == Stage.ADVERTISE_KEYS:
        return fed.ask(node, stage, fed.advertise_message_fields())
    if stage == Stage.SHARE_KEYS:
        return fed.ask(node, stage, fed.share_fields(node))
    if stage == Stage.COLLECT_MASKED_INPUT:
        return fed.ask(node, stage, fed.collect_fields(node), extra=fed.train_content())
    if stage == Stage.CONSISTENCY_CHECK:
        return fed.ask(node, stage, {"survivors": fed.ids})
    others = [i for i in fed.masked if i != node]
    if fed.malicious and others and not fed.set_signatures:  # they sign, as an honest server asks
        fed.check(others, survivors=fed.ids)
    return fed.unmask(node, fed.ids, [])


# Phases a node of each threat model can be in (CHECKED only exists in malicious mode).
REACHABLE = [
    (threat, phase, stage)
    for threat, phase, stage in PAIRS
    if not (phase is Phase.CHECKED and threat is Threat.SEMI_HONEST)
]


def _phase(fed: Any, node: int) -> Phase:
    state = _SLOT.get(fed.contexts[node].state)
    return Phase.NEW if state is None else state.phase


@pytest.mark.parametrize(("threat", "phase", "stage"), REACHABLE)
def test_the_mod_answers_exactly_the_pairs_the_table_allows(
    federation: Any, threat: Threat, phase: Phase, stage: str
) -> None:
    fed = federation(threat=threat)
    node = fed.ids[0]
    _into(fed, node, phase)
    assert _phase(fed, node) is phase
    table = TABLES[threat]
    reply = _honest(fed, node, stage)
    if (phase, stage) in table:
        assert reply.error is None, reply.error
        assert _phase(fed, node) is table[(phase, stage)]
        return
    assert reply.error is not None and reply.error.code == ErrorCode.REFUSED
    if stage == Stage.ADVERTISE_KEYS:  # the round's start, repeated: it goes on
        assert "stale or repeated" in reply.error.reason
        assert _phase(fed, node) is phase
    elif phase is Phase.NEW:  # no round to abort
        assert "no SecAgg+ round 1 in progress" in reply.error.reason
        assert _phase(fed, node) is Phase.NEW
    else:
        assert "out of order" in reply.error.reason
        assert _phase(fed, node) is (Phase.DONE if phase is Phase.DONE else Phase.ABORTED)
        stored = _SLOT.load(fed.contexts[node].state)
        assert stored.c_sk == stored.s_sk == stored.self_seed == b""  # aborted or done: wiped
        assert stored.share_keys == stored.b_shares == stored.s_shares == ()


def test_a_corrupt_state_is_refused_never_taken_for_a_new_round(federation: Any) -> None:
    fed = federation()
    node = fed.ids[0]
    fed.advertise()
    record = fed.contexts[node].state.get_typed(_STATE, ConfigRecord)
    del record["released-b"]  # what stops a node from releasing both shares of a neighbour
    with pytest.raises(StateError):
        _SLOT.load(fed.contexts[node].state)
    for stage in Stage.ALL:
        reply = fed.ask(node, stage, {})
        assert reply.error is not None and reply.error.code == ErrorCode.REFUSED
        assert "state is unreadable" in reply.error.reason, reply.error.reason
        assert fed.contexts[node].state[_STATE] is record  # not overwritten by a fresh round


def test_the_state_record_holds_each_field_once_under_its_wire_name() -> None:
    state = ClientState(run_id=1, round=2, phase=Phase.SHARED, neighbours=(3, 4))
    record = _SLOT.to_record(state)
    assert record["phase"] == "shared" and record["neighbours"] == [3, 4]
    assert set(record) == {
        "state.version",
        *("run-id", "round", "phase", "c-sk", "s-sk", "self-seed", "neighbours", "share-keys"),
        *("s-pks", "senders", "b-shares", "s-shares", "released-b", "released-s"),
        "signed-set",
    }
    assert _SLOT.from_record(record) == state
