"""A dishonest server against honest SecAgg+ nodes: every attack is refused, nothing leaks.

The test plays the server by hand (see ``conftest.Federation``): it runs the
honest stages, then sends what a dishonest server would. An honest node answers
with an error reply of code ``REFUSED`` that carries no content, so the server
learns nothing new; a same-round violation also aborts the node's round (its
secrets are wiped), so a later, well-formed request gets nothing either.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from flowerpets.core import (
    ClientApp,
    ConfigRecord,
    Context,
    ErrorCode,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flowerpets.secagg import Phase, SecAggPlusClientMod, Stage
from flowerpets.secagg._primitives import shamir
from flowerpets.secagg.protocol import PROTOCOL_VERSION, RECORD


def refused(reply: Message, match: str = "") -> str:
    assert reply.error is not None and reply.content is None, "the node answered"
    assert reply.error.code == ErrorCode.REFUSED, reply.error
    assert match in reply.error.reason, reply.error.reason
    return reply.error.reason


def phase(fed: Any, node: int) -> str:
    state = fed.contexts[node].state.get_typed("secagg+/client-state", ConfigRecord)
    return str(state["phase"])


def shares_of(content: Any) -> dict[str, list[int]]:
    body = content[RECORD]
    return {"b": list(body["b-nodes"]), "s": list(body["s-nodes"])}  # type: ignore[index, call-overload]


# -- unmasking: the lists the server sends --------------------------------------------------
def test_overlapping_survivor_and_dropout_lists_get_no_share_at_all(federation: Any) -> None:
    fed = federation()
    fed.honest_until_collect()
    target = fed.ids[0]
    # The server got the target's masked input; it asks the target's neighbours for its
    # self-mask shares (target "survived") and its key shares (target "dropped") at once.
    for node in fed.graph.neighbours(target):
        refused(fed.unmask(node, fed.ids, [target]), "both survivors and dropped")
        assert phase(fed, node) == Phase.ABORTED
        # Aborted: a clean request afterwards gets nothing either.
        refused(fed.unmask(node, fed.ids, []), "out of order")


def test_a_node_listed_as_dropped_or_not_listed_refuses(federation: Any) -> None:
    fed = federation()
    fed.honest_until_collect()
    a, b = fed.ids[0], fed.ids[1]
    others = [i for i in fed.ids if i != a]
    refused(fed.unmask(a, others, [a]), "listed as dropped")
    refused(fed.unmask(b, [i for i in fed.ids if i != b], []), "not listed as a survivor")


def test_fewer_than_t_surviving_neighbours_refused_exactly_t_answered(federation: Any) -> None:
    fed = federation(n=9, degree=4, threshold=3)
    fed.honest_until_collect()
    target = fed.ids[0]
    nbrs = fed.graph.neighbours(target)
    outsiders = [i for i in fed.ids if i != target and i not in nbrs]
    # Only t - 1 of its neighbours "survive": the server could then ask them for the key
    # shares of the rest and get close to unmasking the target's pairwise masks.
    survivors = [target, *nbrs[:2], *outsiders]
    refused(fed.unmask(target, survivors, list(nbrs[2:])), "fewer than the threshold t=3")

    fed2 = federation(n=9, degree=4, threshold=3)
    fed2.honest_until_collect()
    target = fed2.ids[0]
    nbrs = fed2.graph.neighbours(target)
    outsiders = [i for i in fed2.ids if i != target and i not in nbrs]
    reply = fed2.unmask(target, [target, *nbrs[:3], *outsiders], list(nbrs[3:]))
    got = shares_of(fed2.ok(reply))
    # Self-mask shares for survivors, key shares for the dropped, never both for one node.
    assert got == {"b": list(nbrs[:3]), "s": list(nbrs[3:])}


def test_a_listed_neighbour_that_never_shared_keys_is_refused(federation: Any) -> None:
    fed = federation()
    fed.advertise()
    target = fed.ids[0]
    silent = fed.graph.neighbours(target)[0]
    fed.share([i for i in fed.ids if i != silent])
    fed.collect([i for i in fed.ids if i != silent])
    refused(fed.unmask(target, [i for i in fed.ids if i != silent], [silent]), "never shared keys")


def test_no_second_unmask_and_nothing_left_to_release(federation: Any) -> None:
    fed = federation()
    fed.honest_until_collect()
    target = fed.ids[0]
    first = fed.ok(fed.unmask(target, fed.ids, []))
    assert shares_of(first)["b"] and not shares_of(first)["s"]
    neighbour = fed.graph.neighbours(target)[0]
    survivors = [i for i in fed.ids if i != neighbour]
    # Asking again, now for the key share of a neighbour whose self-mask share it released.
    refused(fed.unmask(target, survivors, [neighbour]), "out of order")
    state = fed.contexts[target].state.get_typed("secagg+/client-state", ConfigRecord)
    assert state["phase"] == Phase.DONE
    assert state["b-shares"] == state["s-shares"] == state["share-keys"] == []  # wiped
    assert state["c-sk"] == state["s-sk"] == state["self-seed"] == b""
    assert neighbour in state["released-b"] and state["released-s"] == []  # type: ignore[operator]


# -- share ciphertexts -----------------------------------------------------------------------
def _collect(fed: Any, node: int, senders: list[int], ciphertexts: list[bytes]) -> Message:
    return fed.ask(
        node,
        Stage.COLLECT_MASKED_INPUT,
        {"senders": senders, "ciphertexts": ciphertexts},
        extra=fed.train_content(),
    )


def test_rerouted_ciphertext_is_refused(federation: Any) -> None:
    fed = federation()
    fed.advertise()
    fed.share()
    sender = fed.ids[0]
    a, b = fed.graph.neighbours(sender)[:2]  # both hold a ciphertext from sender
    fields = fed.collect_fields(b)
    # Give b the ciphertext that sender encrypted for a, labelled as sender's for b.
    position = fields["senders"].index(sender)
    fields["ciphertexts"][position] = fed.ciphertexts[a][sender]
    refused(_collect(fed, b, fields["senders"], fields["ciphertexts"]), "failed authentication")
    assert b not in fed.handler_calls  # the update was never even computed


def test_ciphertext_claimed_from_another_sender_is_refused(federation: Any) -> None:
    fed = federation()
    fed.advertise()
    fed.share()
    node = fed.ids[0]
    fields = fed.collect_fields(node)
    fields["ciphertexts"][0], fields["ciphertexts"][1] = (
        fields["ciphertexts"][1],
        fields["ciphertexts"][0],
    )
    refused(_collect(fed, node, fields["senders"], fields["ciphertexts"]), "failed authentication")


def test_reflected_ciphertext_is_refused(federation: Any) -> None:
    """X25519 pair keys are symmetric: only the associated data's direction stops this."""
    fed = federation()
    fed.advertise()
    fed.share()
    node = fed.ids[0]
    fields = fed.collect_fields(node)
    peer = fields["senders"][0]
    fields["ciphertexts"][0] = fed.ciphertexts[peer][node]  # node's own ciphertext for peer
    refused(_collect(fed, node, fields["senders"], fields["ciphertexts"]), "failed authentication")


def test_ciphertext_replayed_from_an_earlier_round_is_refused(federation: Any) -> None:
    fed = federation()
    fed.honest_until_collect()
    old = {node: dict(cts) for node, cts in fed.ciphertexts.items()}
    for node in fed.ids:
        fed.ok(fed.unmask(node, fed.ids, []))
    fed.next_round()
    fed.advertise()
    fed.share()
    node = fed.ids[0]
    fields = fed.collect_fields(node)
    fields["ciphertexts"] = [old[node][j] for j in fields["senders"]]
    refused(_collect(fed, node, fields["senders"], fields["ciphertexts"]), "failed authentication")


def test_tampered_ciphertext_is_refused(federation: Any) -> None:
    fed = federation()
    fed.advertise()
    fed.share()
    node = fed.ids[0]
    fields = fed.collect_fields(node)
    bad = bytearray(fields["ciphertexts"][0])
    bad[-1] ^= 1
    fields["ciphertexts"][0] = bytes(bad)
    refused(_collect(fed, node, fields["senders"], fields["ciphertexts"]), "failed authentication")


def test_too_few_or_foreign_senders_are_refused(federation: Any) -> None:
    fed = federation(n=9, degree=4, threshold=3)
    fed.advertise()
    fed.share()
    node = fed.ids[0]
    fields = fed.collect_fields(node)
    refused(
        _collect(fed, node, fields["senders"][:2], fields["ciphertexts"][:2]),
        "fewer than the threshold",
    )
    fed2 = federation(n=9, degree=4, threshold=3)
    fed2.advertise()
    fed2.share()
    node = fed2.ids[0]
    stranger = next(i for i in fed2.ids if i != node and i not in fed2.graph.neighbours(node))
    fields = fed2.collect_fields(node)
    fields["senders"][0] = stranger
    refused(_collect(fed2, node, fields["senders"], fields["ciphertexts"]), "never received")


# -- keys the server introduces ------------------------------------------------------------------
def test_only_its_own_neighbours_with_distinct_keys_are_accepted(federation: Any) -> None:
    fed = federation(n=9, degree=4, threshold=3)
    fed.advertise()
    node = fed.ids[0]
    stranger = next(i for i in fed.ids if i != node and i not in fed.graph.neighbours(node))
    fields = fed.share_fields(node)
    fields["nodes"][0] = stranger
    refused(fed.ask(node, Stage.SHARE_KEYS, fields), "not this node's neighbours")

    fed = federation(n=9, degree=4, threshold=3, seed=1)
    fed.advertise()
    node = fed.ids[0]
    fields = fed.share_fields(node)
    fields["c-pks"][1] = fields["c-pks"][0]  # two neighbours with one key
    refused(fed.ask(node, Stage.SHARE_KEYS, fields), "twice")

    fed = federation(n=9, degree=4, threshold=3, seed=2)
    fed.advertise()
    node = fed.ids[0]
    fields = fed.share_fields(node)
    fields["s-pks"][0] = fed.pks[node][1]  # its own key, echoed back as a neighbour's
    refused(fed.ask(node, Stage.SHARE_KEYS, fields), "own public key")

    fed = federation(n=9, degree=4, threshold=3, seed=3)
    fed.advertise()
    node = fed.ids[0]
    fields = {k: v[:2] for k, v in fed.share_fields(node).items()}
    refused(fed.ask(node, Stage.SHARE_KEYS, fields), "fewer than the threshold")


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"threshold": 1}, "threshold"),
        ({"degree": 3}, "degree"),
        ({"version": PROTOCOL_VERSION + 1}, "version"),
        ({"version": 1}, "version"),  # before the threat model was on the wire
        ({"threat": "trusting"}, "unknown threat model"),
        ({"order": [1, 2, 3, 4, 5, 6]}, "not in the round's cohort"),
        ({"max-weight": 10**12}, "too large"),
        ({"clipping-range": float("nan")}, "clipping-range"),
    ],
)
def test_bad_round_configurations_are_refused(
    federation: Any, change: dict[str, Any], match: str
) -> None:
    fed = federation()
    fields = {**fed.advertise_message_fields(), **change}
    refused(fed.ask(fed.ids[0], Stage.ADVERTISE_KEYS, fields), match)


# -- the state machine ---------------------------------------------------------------------------
def test_out_of_order_repeated_and_stale_stage_messages_are_refused(federation: Any) -> None:
    fed = federation()
    node = fed.ids[0]
    refused(fed.ask(node, Stage.SHARE_KEYS, {}), "no SecAgg+ round 1 in progress")
    fed.advertise()
    refused(
        fed.ask(node, Stage.ADVERTISE_KEYS, fed.advertise_message_fields()), "stale or repeated"
    )
    refused(fed.ask(node, Stage.UNMASK, {"survivors": fed.ids, "dropped": []}), "out of order")
    assert phase(fed, node) == Phase.ABORTED
    refused(fed.ask(node, Stage.SHARE_KEYS, fed.share_fields(node)), "out of order")

    other = fed.ids[1]
    fed.ask(other, Stage.SHARE_KEYS, fed.share_fields(other))
    refused(fed.ask(other, Stage.SHARE_KEYS, fed.share_fields(other)), "out of order")  # repeated
    refused(
        fed.ask(fed.ids[2], Stage.SHARE_KEYS, fed.share_fields(fed.ids[2]), session=b"x" * 16),
        "another session",
    )
    refused(
        fed.ask(fed.ids[3], Stage.SHARE_KEYS, fed.share_fields(fed.ids[3]), round=2), "out of order"
    )
    refused(fed.ask(fed.ids[4], "secagg+/bogus", {}), "unknown SecAgg+ stage")

    fed.next_round()
    fed.advertise([fed.ids[5]])
    stale = fed.ask(fed.ids[5], Stage.SHARE_KEYS, {}, round=1)
    refused(stale, "stale")
    assert phase(fed, fed.ids[5]) == Phase.ADVERTISED  # a stale message does not abort


# Stages a server might name to get an update past the mod in the clear: none is SecAgg+'s.
FOREIGN_STAGES = ["", "evil", "secagg", "secagg+", "SECAGG+/unmask", " secagg+/unmask", "train"]


@pytest.mark.parametrize("message_type", [MessageType.TRAIN, MessageType.QUERY])
@pytest.mark.parametrize("stage", FOREIGN_STAGES)
def test_train_and_query_requests_outside_secagg_stages_are_refused(
    federation: Any, stage: str, message_type: str
) -> None:
    fed = federation()
    node = fed.ids[0]
    reply = fed.ask(node, stage, {}, extra=fed.train_content(), message_type=message_type)
    refused(reply, "only through SecAgg+")
    assert not fed.handler_calls
    # Also in the middle of a round: the foreign stage gets nothing, the round goes on.
    fed.advertise()
    reply = fed.ask(node, stage, {}, extra=fed.train_content(), message_type=message_type)
    refused(reply, "only through SecAgg+")
    assert not fed.handler_calls and phase(fed, node) == Phase.ADVERTISED


@pytest.mark.parametrize("stage", ["", "evil"])
def test_the_opt_out_lets_foreign_stages_through_and_warns(stage: str) -> None:
    with pytest.warns(UserWarning, match="in the clear"):
        app = ClientApp(mods=[SecAggPlusClientMod(refuse_plaintext=False)])
    calls = []

    @app.train()
    def train(msg: Message, context: Context) -> RecordDict:
        calls.append(msg.metadata.stage)
        return RecordDict({"metrics": MetricRecord({"num-examples": 1})})

    msg = Message.create(
        RecordDict(), message_type=MessageType.TRAIN, dst_node_id=1, round=1, stage=stage
    )
    assert app(msg, Context(node_id=1)).error is None and calls == [stage]


# -- what t - 1 shares tell the server --------------------------------------------------------
def test_t_minus_one_released_shares_are_consistent_with_any_seed(federation: Any) -> None:
    fed = federation(n=9, degree=4, threshold=3)
    fed.honest_until_collect()
    target = fed.ids[0]
    nbrs = fed.graph.neighbours(target)
    # Two neighbours hand over the target's self-mask shares: one fewer than t.
    points, values = [], []
    for holder in nbrs[:2]:
        reply = fed.ok(fed.unmask(holder, fed.ids, []))
        body = reply[RECORD]
        at = list(body["b-nodes"]).index(target)  # type: ignore[call-overload]
        values.append(np.frombuffer(body["b-shares"][at], "<u4").astype(np.uint64))  # type: ignore[index]
        points.append(fed.graph.share_point(target, holder))
    field = shamir.Shamir()
    third = fed.graph.share_point(target, nbrs[2])
    weights = field.lagrange_at_zero([*points, third])
    p = field.prime
    for guess in (bytes(32), b"\xff" * 32, bytes(range(32))):
        # The third share that would make the seed equal to `guess` exists for any guess.
        target_elements = shamir.bytes_to_elements(guess).astype(object)
        partial = sum(int(w) * v.astype(object) for w, v in zip(weights[:2], values, strict=True))
        missing = ((target_elements - partial) * pow(weights[2], -1, p)) % p
        ys = np.stack([*values, missing.astype(np.uint64)])
        assert shamir.elements_to_bytes(field.combine([*points, third], ys)) == guess
