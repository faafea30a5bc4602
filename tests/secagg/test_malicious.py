"""SecAgg+'s malicious mode against a malicious server: every attack is refused, nothing leaks.

The test plays the server by hand (``conftest.Federation(threat="malicious")``:
nodes with enrolled Ed25519 identity keys). It may send anything, but it cannot
sign for an honest node. Each attack has its negative control: the same attack
against the semi-honest mode, which succeeds where docs/secagg.md says it does
(so each test can fail).
"""

from __future__ import annotations

import dataclasses
import pickle
import warnings
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowerpets.core import (
    ArrayRecord,
    ConfigRecord,
    Context,
    FailureKind,
    FedAvg,
    Message,
    ServerApp,
)
from flowerpets.exceptions import (
    ConfigurationError,
    ParameterTypeError,
    ParameterValueError,
    RoundFailedError,
)
from flowerpets.secagg import (
    IdentityKey,
    Keyring,
    NodeConfigKey,
    NodeIdentities,
    Phase,
    RoundConfig,
    SecAggPlus,
    SecAggPlusClientMod,
    Stage,
    Threat,
    enroll,
)
from flowerpets.secagg._node_state import STATE_CONFIG, load
from flowerpets.secagg._primitives import aead, keys
from flowerpets.secagg.attacks import partner_holders, read_update, rebuild, split_view, two_views
from flowerpets.secagg.parameters import least_summed
from flowerpets.secagg.protocol import (
    DOMAIN_CONSISTENCY,
    RECORD,
    SHARE_BYTES,
    advertisement,
    share_key,
    survivor_set,
    survivor_sets,
    transcript,
)
from flowerpets.secagg.threat import MODELS
from flowerpets.simulation import Dropout, run_simulation
from tests.secagg import test_protocol as protocol
from tests.secagg.conftest import seeded_randomness
from tests.secagg.test_attacks import phase, refused

BOTH = [Threat.SEMI_HONEST, Threat.MALICIOUS]


def _forged_advertisement(fed: Any, victim: int, impostor: IdentityKey) -> dict[str, Any]:
    """The share-keys fields for ``victim`` with its first neighbour's keys replaced by keys
    the server made, signed (malicious mode) with a key the server holds."""
    fields = fed.share_fields(victim)
    server_c = keys.generate_private_key(seeded_randomness(50))
    server_s = keys.generate_private_key(seeded_randomness(51))
    j = fields["nodes"][0]
    c_pk, s_pk = keys.public_bytes(server_c), keys.public_bytes(server_s)
    fields["c-pks"][0], fields["s-pks"][0] = c_pk, s_pk
    if fed.malicious:
        fields["signatures"][0] = impostor.sign(advertisement(fed.config, 1, j, c_pk, s_pk))
    return {"fields": fields, "neighbour": j, "server_c": server_c}


# -- identity: the keys a server introduces --------------------------------------------------
@pytest.mark.parametrize("threat", BOTH)
def test_a_forged_key_advertisement_for_an_existing_node(federation: Any, threat: Threat) -> None:
    fed = federation(threat=threat)
    fed.advertise()
    victim = fed.ids[0]
    forged = _forged_advertisement(fed, victim, IdentityKey.generate(seeded_randomness(52)))
    reply = fed.ask(victim, Stage.SHARE_KEYS, forged["fields"])
    if fed.malicious:
        refused(reply, f"the key advertisement of node {forged['neighbour']}")
        refused(reply, "the signature does not verify")
        assert phase(fed, victim) == Phase.ABORTED
        return
    # Negative control (documented: the server can impersonate nodes): the semi-honest node
    # encrypts its shares for "j" to the server's key, and the server reads them.
    body = fed.ok(reply)[RECORD]
    j = forged["neighbour"]
    at = list(body["receivers"]).index(j)  # type: ignore[call-overload]
    key = share_key(forged["server_c"], fed.pks[victim][0], session=fed.config.session)
    associated = aead.associated_data(
        session=fed.config.session, round=1, sender=victim, receiver=j
    )
    plaintext = aead.decrypt(key, body["ciphertexts"][at], associated)  # type: ignore[index]
    assert len(plaintext) == 2 * SHARE_BYTES  # a share of the victim's seed and of its key


def test_an_unsigned_or_malformed_advertisement_is_refused(federation: Any) -> None:
    fed = federation(threat=Threat.MALICIOUS)
    fed.advertise()
    node = fed.ids[0]
    unsigned = {k: v for k, v in fed.share_fields(node).items() if k != "signatures"}
    refused(fed.ask(node, Stage.SHARE_KEYS, unsigned), "signatures")
    fed = federation(threat=Threat.MALICIOUS, seed=1)
    fed.advertise()
    node = fed.ids[0]
    fields = fed.share_fields(node)
    fields["signatures"][0] = fields["signatures"][0][:-1]  # 63 bytes
    refused(fed.ask(node, Stage.SHARE_KEYS, fields), "signatures")
    fed = federation(threat=Threat.MALICIOUS, seed=2)
    fed.advertise()
    node = fed.ids[0]
    fields = fed.share_fields(node)
    fields["signatures"][0], fields["signatures"][1] = (
        fields["signatures"][1],
        fields["signatures"][0],
    )
    refused(fed.ask(node, Stage.SHARE_KEYS, fields), "does not verify")  # another node's


@pytest.mark.parametrize("threat", BOTH)
def test_an_advertisement_for_a_node_not_enrolled(federation: Any, threat: Threat) -> None:
    """A Sybil: the server invents a node, with its own identity key, in the ring order."""
    fed = federation(threat=threat)
    sybil = 99_999
    order = list(fed.config.order)
    order[1] = sybil  # takes a real node's place in the ring
    fields = {**fed.advertise_message_fields(), "order": order}
    node = next(i for i in order if i in fed.ids)
    reply = fed.ask(node, Stage.ADVERTISE_KEYS, fields)
    if fed.malicious:
        refused(reply, f"nodes [{sybil}] of the ring order are not enrolled")
    else:
        fed.ok(reply)  # negative control: a semi-honest node takes the Sybil as a peer


@pytest.mark.parametrize("threat", BOTH)
def test_a_ring_order_told_differently_to_two_neighbours(federation: Any, threat: Threat) -> None:
    """The advertisement binds the round's configuration: a neighbour sent another ring
    order (or threshold) signed another one, and the node refuses its keys."""
    fed = federation(threat=threat)
    node = fed.ids[0]
    other = fed.graph.neighbours(node)[0]
    fed.advertise([i for i in fed.ids if i != other])
    changed = {**fed.advertise_message_fields(), "order": list(reversed(fed.config.order))}
    body = fed.ok(fed.ask(other, Stage.ADVERTISE_KEYS, changed))[RECORD]
    fed.pks[other] = (body["c-pk"], body["s-pk"])  # type: ignore[assignment]
    if fed.malicious:
        fed.key_signatures[other] = body["signature"]  # type: ignore[assignment]
    reply = fed.ask(node, Stage.SHARE_KEYS, fed.share_fields(node))
    if fed.malicious:
        refused(reply, f"the key advertisement of node {other}")
    else:
        fed.ok(reply)  # negative control: nothing ties the keys to the configuration


def _next_session(fed: Any, replay: str) -> None:
    """Finish round 1 honestly and start round 2 (``"round"``), or restart round 1 with a
    fresh session on fresh node state (``"session"``)."""
    if replay == "round":
        fed.share()
        fed.collect()
        if fed.malicious:
            fed.check()
        for node in fed.ids:
            fed.ok(fed.unmask(node, fed.ids, []))
        fed.next_round()  # round 2, a fresh session
    else:  # the same round number, another session: a restarted round
        _restart(fed)


def _restart(fed: Any) -> None:
    """Round 1 again, with another session and fresh node state (a restarted round)."""
    fed.contexts = {node: Context(node_id=node, run_id=1) for node in fed.ids}
    fed.next_round()
    fed.round = 1


@pytest.mark.parametrize("replay", ["round", "session"])
@pytest.mark.parametrize("threat", BOTH)
def test_an_advertisement_replayed_from_another_round_or_session(
    federation: Any, threat: Threat, replay: str
) -> None:
    fed = federation(threat=threat)
    fed.advertise()
    old_pks, old_signatures = dict(fed.pks), dict(fed.key_signatures)
    _next_session(fed, replay)
    fed.advertise()
    node = fed.ids[0]
    fields = fed.share_fields(node)
    j = fields["nodes"][0]
    fields["c-pks"][0], fields["s-pks"][0] = old_pks[j]  # keys the server may know more of
    if not fed.malicious:
        # Negative control: nothing dates a semi-honest advertisement; the node takes the
        # old keys and encrypts its shares for j to them.
        body = fed.ok(fed.ask(node, Stage.SHARE_KEYS, fields))[RECORD]
        assert j in body["receivers"]  # type: ignore[operator]
        return
    fields["signatures"][0] = old_signatures[j]
    refused(fed.ask(node, Stage.SHARE_KEYS, fields), f"the key advertisement of node {j}")


def test_a_malicious_node_is_never_downgraded_nor_a_semi_honest_one_upgraded(
    federation: Any,
) -> None:
    fed = federation(threat=Threat.MALICIOUS)
    downgrade = {
        **fed.advertise_message_fields(),
        "threat": Threat.SEMI_HONEST.value,
        "quorum": 0,  # a semi-honest round has none
    }
    refused(fed.ask(fed.ids[0], Stage.ADVERTISE_KEYS, downgrade), "malicious rounds only")
    plain = federation()
    upgrade = {**plain.advertise_message_fields(), "threat": Threat.MALICIOUS.value}
    refused(plain.ask(plain.ids[0], Stage.ADVERTISE_KEYS, upgrade), "semi-honest rounds only")


# -- the consistency check ----------------------------------------------------------------------
def test_the_honest_round_unmasks_with_t_signatures(federation: Any) -> None:
    fed = federation(threat=Threat.MALICIOUS)
    fed.honest_until_unmask()
    for node in fed.ids:
        got = fed.ok(fed.unmask(node, fed.ids, []))[RECORD]
        assert sorted(got["b-nodes"]) == sorted(fed.graph.neighbours(node))  # type: ignore[call-overload]
        assert phase(fed, node) == Phase.DONE


@pytest.mark.parametrize("threat", BOTH)
def test_a_split_view_two_neighbours_told_different_survivor_sets(
    federation: Any, threat: Threat
) -> None:
    """The server tells a node's neighbour A that the node survived and neighbour B that it
    dropped, to collect its self-mask shares from A and its key shares from B."""
    fed = federation(n=9, degree=4, threshold=3, threat=threat)
    fed.honest_until_collect()
    target = fed.ids[0]
    a, b = fed.graph.neighbours(target)[:2]
    without = [i for i in fed.ids if i != target]
    if fed.malicious:
        fed.check([i for i in fed.ids if i != b])  # every node but b signs the full set
        fed.check([b], survivors=without)  # b alone is shown the target dropped
    # The honest view is answered: a releases the target's self-mask share (given the
    # signatures over its own set: b's, over another, would not verify).
    signed = fed.signed_fields(a)
    if fed.malicious:
        keep = [at for at, j in enumerate(signed["signers"]) if j != b]
        signed = {key: [value[at] for at in keep] for key, value in signed.items()}
    answer = fed.ok(fed.unmask(a, fed.ids, [], signed=signed))[RECORD]
    assert target in answer["b-nodes"]  # type: ignore[operator]
    # No neighbour of b signed b's set: the server has nothing to forward that verifies.
    reply_b = fed.unmask(b, without, [target], signed={"signers": [], "signatures": []})
    if not fed.malicious:
        assert target in fed.ok(reply_b)[RECORD]["s-nodes"]  # negative control: it releases
        return
    refused(reply_b, "only 0 of this node's neighbours signed the survivor set")
    assert phase(fed, b) == Phase.ABORTED
    # Nor do the other view's signatures help: they are over another set.
    fed2 = federation(n=9, degree=4, threshold=3, threat=threat, seed=1)
    fed2.honest_until_collect()
    target = fed2.ids[0]
    b = fed2.graph.neighbours(target)[1]
    without = [i for i in fed2.ids if i != target]
    fed2.check([i for i in fed2.ids if i != b])
    fed2.check([b], survivors=without)
    others = [j for j in fed2.graph.neighbours(b) if j != target]  # they signed the full set
    theirs = {"signers": others, "signatures": [fed2.set_signatures[j] for j in others]}
    refused(fed2.unmask(b, without, [target], signed=theirs), "signature of the survivor set")


@pytest.mark.parametrize("views", [partner_holders, two_views])
@pytest.mark.parametrize("threat", BOTH)
def test_rebuilding_a_node_update_from_all_the_server_obtained(
    federation: Any, threat: Threat, views: Any
) -> None:
    """The split view on the victim's partners (flowerpets/secagg/attacks/split_view.py), the server
    doing its best at the consistency check: at a threshold every node accepts
    (n = 12, k = 6, t = 4), it unmasks the victim's weight and update in semi-honest mode,
    and gets too few shares to rebuild anything in malicious mode."""
    fed = federation(n=12, degree=6, threshold=4, seed=7, threat=threat)
    loot = split_view(fed, views)
    vector = rebuild(fed, loot)
    if fed.malicious:
        assert vector is None, "the server rebuilt the victim's vector"
        assert loot.refusals and all("signed the survivor set" in r for r in loot.refusals.values())
        return
    if views is two_views:
        assert vector is None  # too coarse a split even in semi-honest mode: rule 2t > k + c
        return
    assert vector is not None  # negative control (docs: not protected in semi-honest mode)
    i = fed.index[loot.victim]
    weight, update = read_update(fed, loot.victim, vector)
    assert weight == fed.weights[i]
    np.testing.assert_allclose(
        update, fed.updates[i], atol=2 / fed.config.quantization.float_factor(weight)
    )


@settings(max_examples=8, deadline=None)
@given(st.data())
def test_no_assignment_of_views_rebuilds_the_victim(data: st.DataObject) -> None:
    """Any split the server picks, each holder told any subset of the partners dropped
    (starting from the flow's assignment, which rebuilds the victim in semi-honest mode:
    hypothesis tries it first): in malicious mode the server never holds t shares of the
    victim's seed and t of every partner's key (the counting argument in docs/secagg.md)."""
    from tests.secagg.conftest import Federation

    fed = Federation(n=12, degree=6, threshold=4, seed=7, threat=Threat.MALICIOUS)

    def views(fed: Any, victim: int, partners: list[int]) -> dict[int, list[int]]:
        told = dict(partner_holders(fed, victim, partners))
        for m in sorted(told):
            if data.draw(st.booleans(), label=f"change {m}'s view"):
                subsets = st.lists(st.sampled_from(partners), unique=True, max_size=2)
                told[m] = data.draw(subsets, label=f"partners {m} is told dropped")
        return told

    loot = split_view(fed, views)
    assert rebuild(fed, loot) is None


def test_a_survivor_set_that_differs_by_one_node(federation: Any) -> None:
    fed = federation(threat=Threat.MALICIOUS)
    fed.honest_until_unmask()  # every node signed the full set
    node = fed.ids[0]
    outsider = next(i for i in fed.ids if i != node and i not in fed.graph.neighbours(node))
    fewer = [i for i in fed.ids if i != outsider]
    refused(fed.unmask(node, fewer, []), "differ from the set this node signed")
    other = next(i for i in fed.ids if i not in (node, outsider))
    refused(fed.unmask(other, fewer, []), f"nodes [{outsider}]")
    # Signatures over a set one node off (the neighbours signed `fewer`) do not verify.
    fed = federation(threat=Threat.MALICIOUS, seed=3)
    fed.honest_until_collect()
    node = fed.ids[0]
    outsider = next(i for i in fed.ids if i != node and i not in fed.graph.neighbours(node))
    fed.check([node])
    fewer = [i for i in fed.ids if i != outsider]
    fed.check([i for i in fewer if i != node], survivors=fewer)
    refused(fed.unmask(node, fed.ids, []), "signature of the survivor set")


def test_fewer_than_t_signatures_are_refused(federation: Any) -> None:
    fed = federation(n=9, degree=4, threshold=3, threat=Threat.MALICIOUS)
    fed.honest_until_unmask()
    node = fed.ids[0]
    signed = fed.signed_fields(node)
    two = {k: v[:2] for k, v in signed.items()}
    refused(fed.unmask(node, fed.ids, [], signed=two), "only 2 of this node's neighbours signed")
    assert phase(fed, node) == Phase.ABORTED
    # A stranger's signature does not count towards t: with the quorum (the default) it
    # counts for the cohort only, without one it is refused outright.
    other = fed.ids[1]
    stranger = next(i for i in fed.ids if i != other and i not in fed.graph.neighbours(other))
    padded = {
        "signers": [*fed.signed_fields(other)["signers"][:2], stranger],
        "signatures": [*fed.signed_fields(other)["signatures"][:2], fed.set_signatures[stranger]],
    }
    refused(fed.unmask(other, fed.ids, [], signed=padded), "only 2 of this node's neighbours")
    with pytest.warns(UserWarning, match="regional split view"):
        local = federation(n=9, degree=4, threshold=3, threat=Threat.MALICIOUS, quorum=0)
    local.honest_until_unmask()
    padded = {
        "signers": [*local.signed_fields(other)["signers"][:2], stranger],
        "signatures": [
            *local.signed_fields(other)["signatures"][:2],
            local.set_signatures[stranger],
        ],
    }
    refused(local.unmask(other, local.ids, [], signed=padded), "no surviving neighbours")
    unsigned = fed.ask(fed.ids[2], Stage.UNMASK, {"survivors": fed.ids, "dropped": []})
    refused(unsigned, "signers")  # no signatures at all


@pytest.mark.parametrize("replay", ["round", "session"])
def test_a_consistency_signature_replayed_from_another_round_or_session(
    federation: Any, replay: str
) -> None:
    fed = federation(threat=Threat.MALICIOUS)
    fed.advertise()
    fed.share()
    fed.collect()
    fed.check()
    old = dict(fed.set_signatures)
    if replay == "round":
        for node in fed.ids:
            fed.ok(fed.unmask(node, fed.ids, []))
        fed.next_round()  # round 2, a fresh session
    else:
        _restart(fed)
    fed.honest_until_collect()
    node = fed.ids[0]
    fed.check([node])  # only the target signs this set; its neighbours' signatures are old
    signers = list(fed.graph.neighbours(node))
    replayed = {"signers": signers, "signatures": [old[j] for j in signers]}
    refused(fed.unmask(node, fed.ids, [], signed=replayed), "signature of the survivor set")


def test_without_the_consistency_check_a_node_answers_any_set_unsigned(federation: Any) -> None:
    """Negative control of the consistency-check attacks above (a set one node off, fewer
    than t signatures, none, or replayed ones): a semi-honest node has no signed set to
    compare with and answers the unmask request as long as its own checks pass."""
    fed = federation(n=9, degree=4, threshold=3)
    fed.honest_until_unmask()
    node, other = fed.ids[:2]
    outsider = next(
        i for i in fed.ids if i not in (node, other) and i not in fed.graph.neighbours(node)
    )
    fewer = [i for i in fed.ids if i != outsider]
    got = fed.ok(fed.unmask(node, fewer, []))[RECORD]  # a set one node off, no signature
    assert sorted(got["b-nodes"]) == sorted(fed.graph.neighbours(node))  # type: ignore[call-overload]
    assert fed.ok(fed.unmask(other, fed.ids, []))[RECORD]["b-nodes"]  # none at all


def test_a_node_signs_one_survivor_set_per_round(federation: Any) -> None:
    fed = federation(threat=Threat.MALICIOUS)
    fed.honest_until_unmask()
    node = fed.ids[0]
    without = [i for i in fed.ids if i != fed.graph.neighbours(node)[0]]
    again = fed.ask(node, Stage.CONSISTENCY_CHECK, {"survivors": without})
    refused(again, "out of order")  # a second set would let the server split it
    assert phase(fed, node) == Phase.ABORTED


def test_the_consistency_check_refuses_lists_an_honest_server_never_sends(
    federation: Any,
) -> None:
    fed = federation(n=9, degree=4, threshold=3, threat=Threat.MALICIOUS)
    fed.honest_until_collect()
    a, b, c = fed.ids[:3]
    refused(fed.ask(a, Stage.CONSISTENCY_CHECK, {"survivors": [i for i in fed.ids if i != a]}))
    nbrs = fed.graph.neighbours(b)
    few = [i for i in fed.ids if i not in nbrs[1:]]  # b and one neighbour
    refused(fed.ask(b, Stage.CONSISTENCY_CHECK, {"survivors": few}), "fewer than the threshold")
    refused(fed.ask(c, Stage.CONSISTENCY_CHECK, {"survivors": [*fed.ids, c]}), "twice")
    # A semi-honest round has no consistency check: the stage is out of order there.
    plain = federation()
    plain.honest_until_collect()
    refused(
        plain.ask(plain.ids[0], Stage.CONSISTENCY_CHECK, {"survivors": plain.ids}), "out of order"
    )


# -- what never leaves a node ----------------------------------------------------------------
def test_no_message_carries_an_identity_or_round_private_key(federation: Any) -> None:
    fed = federation(threat=Threat.MALICIOUS)
    sent: list[Message] = []
    original = fed.app

    def recording(msg: Message, context: Context) -> Message:
        reply = original(msg, context)
        sent.extend([msg, reply])
        return reply

    fed.app = type("App", (), {"__call__": staticmethod(recording)})()
    fed.honest_until_unmask()
    for node in fed.ids:
        fed.ok(fed.unmask(node, fed.ids, []))
    assert {m.metadata.stage for m in sent} == set(MODELS[Threat.MALICIOUS].stages)
    secrets = [key.private_pem() for key in fed.enrolment.keyring.values()]
    secrets += [pem.split(b"\n")[1] for pem in secrets]  # the base64 body alone
    blob = b"".join(repr(m).encode() + _bytes_of(m) for m in sent)
    assert not any(secret in blob for secret in secrets)
    assert all("PRIVATE" not in repr(key) for key in fed.enrolment.keyring.values())


def _bytes_of(msg: Message) -> bytes:
    out = []
    for record in (msg.content or {}).values():
        if isinstance(record, ConfigRecord):
            for value in record.values():
                items = value if isinstance(value, list) else [value]
                out += [v for v in items if isinstance(v, bytes)]
    return b"".join(out)


# -- set-up ---------------------------------------------------------------------------------------
def test_malicious_without_identities_is_refused_at_set_up() -> None:
    with pytest.raises(ConfigurationError, match="needs identities"):
        SecAggPlus(threat="malicious")
    with pytest.raises(ConfigurationError, match="needs identities"):
        SecAggPlusClientMod(threat=Threat.MALICIOUS)
    with pytest.raises(ParameterValueError, match="threat must be one of"):
        SecAggPlus(threat="paranoid")
    with pytest.raises(ParameterTypeError, match="identities must be NodeIdentities"):
        SecAggPlus(threat="malicious", identities={1: b"x" * 32})  # type: ignore[arg-type]


def test_identities_make_malicious_the_default_and_opting_out_warns() -> None:
    pki = enroll([1, 2, 3], randomness=seeded_randomness(0))
    assert SecAggPlus().threat is Threat.SEMI_HONEST  # no PKI: semi-honest stays the default
    assert SecAggPlus(identities=pki.identities).threat is Threat.MALICIOUS
    mod = SecAggPlusClientMod(identities=pki.identities, identity=pki.keyring)
    assert mod.threat is Threat.MALICIOUS and "malicious" in repr(mod)
    with pytest.warns(UserWarning, match="different survivor lists"):
        SecAggPlus(identities=pki.identities, threat="semi-honest")


def test_a_node_whose_key_is_not_its_enrolment_does_not_sign(federation: Any) -> None:
    fed = federation(threat=Threat.MALICIOUS)
    node = fed.ids[0]
    wrong = Keyring({**fed.enrolment.keyring, node: IdentityKey.generate(seeded_randomness(9))})
    fed.mod.identity = wrong
    with pytest.raises(ConfigurationError, match="not the one enrolled"):
        fed.mod.identity_key(fed.contexts[node])
    reply = fed.ask(node, Stage.ADVERTISE_KEYS, fed.advertise_message_fields())
    assert reply.error is not None and reply.content is None


def test_the_server_chooses_the_malicious_threshold_in_malicious_mode() -> None:
    from flowerpets.secagg import SecAggPlus, enroll, find_parameters

    identities = enroll(range(1, 101)).identities
    malicious = SecAggPlus(threat="malicious", identities=identities).parameters(100)
    assert malicious == find_parameters(100, threat=Threat.MALICIOUS)
    semi_honest = SecAggPlus().parameters(100)
    assert malicious.threshold > semi_honest.threshold  # the stricter rule really reached it


# -- the PKI ------------------------------------------------------------------------------------
def test_identities_round_trip_as_text_and_refuse_what_is_not_a_pki(tmp_path: Any) -> None:
    pki = enroll([5, 17, 2**62], randomness=seeded_randomness(1))
    text = pki.identities.to_text()
    assert text.splitlines()[0].startswith("5 ssh-ed25519 ")
    path = tmp_path / "identities.pub"
    path.write_text("# the enrolled nodes\n\n" + text)
    loaded = NodeIdentities.load(path)
    assert dict(loaded) == dict(pki.identities) and len(loaded) == 3
    bad = [
        ("5 ssh-rsa AAAA", "expected"),
        ("x ssh-ed25519 AAAA", "expected"),
        (text + text, "enrolled twice"),
        ("5 ssh-ed25519 AAAA!!", "not an OpenSSH Ed25519 key"),
        ("", "at least one"),
    ]
    for content, match in bad:
        with pytest.raises(ParameterValueError, match=match):
            NodeIdentities.from_text(content)
    key = pki.keyring[5].public_bytes
    with pytest.raises(ParameterValueError, match="one public key"):
        NodeIdentities({1: key, 2: key})
    with pytest.raises(ValueError, match="32 bytes"):
        NodeIdentities({1: b"short"})
    with pytest.raises(ValueError, match="listed twice"):
        enroll([1, 1])


def test_identity_keys_are_never_pickled_nor_shown() -> None:
    key = IdentityKey.generate(seeded_randomness(2))
    ring = Keyring({1: key})
    for thing in (key, ring):
        with pytest.raises(ParameterTypeError, match="never pickled"):
            pickle.dumps(thing)
    assert key.private_pem().split(b"\n")[1].decode() not in repr(key) + repr(ring)
    assert repr(ring) == "Keyring(1 nodes)"
    # The PKI is public: an app that carries it can be shipped to its workers.
    pki = NodeIdentities({1: key.public_bytes})
    assert dict(pickle.loads(pickle.dumps(pki))) == {1: key.public_bytes}


def test_a_node_config_names_its_key_file(tmp_path: Any) -> None:
    key = IdentityKey.generate(seeded_randomness(3))
    path = tmp_path / "node.key"
    path.write_bytes(key.private_pem())
    source = NodeConfigKey()
    context = Context(node_id=4, node_config={"secagg-identity-key": str(path)})
    assert source.key_for(context).public_bytes == key.public_bytes
    assert source.key_for(context) is source.key_for(context)  # read once
    with pytest.raises(ConfigurationError, match="names no identity key"):
        source.key_for(Context(node_id=4))
    with pytest.raises(ConfigurationError, match="cannot read"):
        source.key_for(Context(node_id=4, node_config={"secagg-identity-key": str(path) + "x"}))
    path.write_bytes(b"not a key")
    with pytest.raises(ValueError, match="PEM"):
        NodeConfigKey().key_for(context)
    assert IdentityKey.from_pem(key.private_pem()).public_bytes == key.public_bytes


# A small malicious round's configuration, for the tests of what binds and caches it.
_SMALL_ROUND = RoundConfig(
    session=bytes(16),
    order=(3, 1, 2, 4, 5),
    degree=4,
    threshold=3,
    clipping_range=8.0,
    max_weight=10,
    weight_key="num-examples",
    secure_metrics=("loss",),
    threat=Threat.MALICIOUS,
)


def test_the_round_configuration_digest_binds_every_field() -> None:
    base = _SMALL_ROUND
    changes: list[dict[str, Any]] = [
        {"session": b"\x01" * 16},
        {"order": (1, 3, 2, 4, 5)},
        {"threshold": 4},
        {"clipping_range": 4.0},
        {"max_weight": 11},
        {"weight_key": None},
        {"secure_metrics": ()},
        {"threat": Threat.SEMI_HONEST},
        {"quorum": 3},
    ]
    digests = {base.digest} | {dataclasses.replace(base, **c).digest for c in changes}
    assert len(digests) == len(changes) + 1 and len(base.digest) == 32  # SHA-256
    assert RoundConfig.from_record(base.to_record()).digest == base.digest


def test_the_signed_transcripts_and_parsed_configs_are_cached_by_their_whole_content(
    federation: Any,
) -> None:
    """The survivor-set prefix and the node's parsed round configuration are cached: a
    configuration that differs in any field (or another round, another set) must give
    other bytes to sign and another parsed configuration, never a cached one."""
    base = dataclasses.replace(_SMALL_ROUND, quorum=3)
    configs = [
        base,
        dataclasses.replace(base, session=b"\x01" * 16),
        dataclasses.replace(base, order=(1, 3, 2, 4, 5)),
        dataclasses.replace(base, quorum=4),
        dataclasses.replace(base, clipping_range=4.0),
    ]
    changes: list[dict[str, Any]] = [
        {"session": b"\x01" * 16},
        {"threshold": 2},
        {"clipping_range": 4.0},
        {"max_weight": 11},
        {"quorum": 5},
    ]
    signed = set()
    for config in configs * 2:  # the second pass reads the caches
        for round, survivors in [(1, (1, 2, 3, 4, 5)), (2, (1, 2, 3, 4, 5)), (1, (1, 2, 3, 4))]:
            data = survivor_set(config, round, 3, reversed(survivors))
            assert data == transcript(DOMAIN_CONSISTENCY, config.digest, round, survivors, 3)
            assert survivor_sets(config, round, survivors)(3) == data
            signed.add(data)
    assert len(signed) == len(configs) * 3
    # The node's parsed configuration (every stage after the first reads it from its state).
    fed = federation(n=6, degree=4, threshold=3, threat=Threat.MALICIOUS)
    node = fed.ids[0]
    fed.advertise([node])
    context = fed.contexts[node]
    for config in [fed.config, *(dataclasses.replace(fed.config, **c) for c in changes)] * 2:
        context.state[STATE_CONFIG] = config.to_record()
        loaded = load(context)
        assert loaded is not None and loaded[1] == config


# -- whole rounds over the simulation ---------------------------------------------------------
def _run(
    n: int,
    client_mod: Any,
    secagg: SecAggPlus,
    node_ids: list[int],
    *,
    seed: int = 1,
    faults: Any = (),
    stop_on_failure: bool = False,
) -> tuple[Any, Any, Any]:
    """One round over the simulation with these node ids: its result, the round's outcome
    (captured) and the nodes' updates and weights."""
    updates, weights = protocol.make_data(n, seed=seed)
    capture = protocol.Capture()
    server = ServerApp(
        strategy=FedAvg(),
        num_rounds=1,
        initial_arrays=ArrayRecord({"w": np.zeros(protocol.PARAMS, np.float32)}),
        mods=[capture, secagg],
        stop_on_failure=stop_on_failure,
    )
    app = protocol.make_app(updates, weights, mods=[client_mod])
    result = run_simulation(server, app, n, node_ids=node_ids, seed=0, faults=faults, max_workers=4)
    return result, capture.results[0] if capture.results else None, (updates, weights)


def _malicious_run(
    n: int,
    *,
    faults: Any = (),
    stop_on_failure: bool = False,
    quorum: bool | None = None,
    **kwargs: Any,
) -> tuple[Any, Any, Any]:
    """A malicious-mode round over the simulation: the nodes enrolled, each with its key
    (``quorum``: the nodes require the cohort's quorum, and the server sets it; by default
    both, and ``quorum=False`` opts both out, which warns)."""
    pki = enroll(range(1, n + 1), randomness=seeded_randomness(11))
    mod = SecAggPlusClientMod(
        identities=pki.identities, identity=pki.keyring, require_quorum=quorum
    )
    secagg = protocol.secagg(identities=pki.identities, quorum=quorum, **kwargs)
    return _run(n, mod, secagg, pki.node_ids, faults=faults, stop_on_failure=stop_on_failure)


# The semi-honest dropout sets (n = 10, k = 8, t = 5), and some at the consistency check.
MALICIOUS_DROPOUTS = {
    **protocol.DROPOUT_SETS,
    "check-1": {Stage.CONSISTENCY_CHECK: [1]},
    "check-3": {Stage.CONSISTENCY_CHECK: [1, 6, 9]},
    "mixed-c": {
        Stage.COLLECT_MASKED_INPUT: [4],
        Stage.CONSISTENCY_CHECK: [6],
        Stage.UNMASK: [7],
    },
    "mixed-d": {Stage.ADVERTISE_KEYS: [0], Stage.CONSISTENCY_CHECK: [5], Stage.UNMASK: [8]},
}
LATE = (Stage.CONSISTENCY_CHECK, Stage.UNMASK)  # after their masked input is in the sum


QUORUM_DROPOUTS = ("check-3", "mixed-c", "mixed-d", "unmask-3", "collect-3")


@pytest.mark.parametrize(
    ("name", "quorum"),
    [(name, None) for name in sorted(MALICIOUS_DROPOUTS)]  # the default: with the quorum
    + [(name, False) for name in QUORUM_DROPOUTS],  # opted out
)
def test_malicious_rounds_with_dropouts_at_every_stage_give_the_exact_sum(
    name: str, quorum: bool | None
) -> None:
    plan = MALICIOUS_DROPOUTS[name]
    faults = [Dropout(node=i, round=1, stage=stage) for stage, nodes in plan.items() for i in nodes]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "SecAggPlus.*quorum=False", UserWarning)
        warnings.filterwarnings("ignore", "SecAggPlusClientMod.*quorum=False", UserWarning)
        result, outcome, (updates, weights) = _malicious_run(10, faults=faults, quorum=quorum)
    record = result.history[0]
    assert record.ok, record.error
    lost = {i for stage, nodes in plan.items() if stage not in LATE for i in nodes}
    participants = sorted(result.node_index(p) for p in outcome.participants)
    assert participants == [i for i in range(10) if i not in lost]
    failed = {result.node_index(node): f.stage for node, f in outcome.failures.items()}
    assert failed == {i: s for s, nodes in plan.items() if s not in LATE for i in nodes}
    late = sum(len(plan.get(stage, [])) for stage in LATE)
    assert outcome.metrics["secagg-unmask-missing"] == late
    assert outcome.total_weight == sum(weights[i] for i in participants)  # exact
    bound = outcome.metrics["secagg-mean-error-bound"]
    assert isinstance(bound, float)
    mean = protocol.weighted_mean(updates, weights, participants)
    assert np.max(np.abs(result.arrays["w"].numpy() - mean)) <= bound + 1e-6


def test_too_few_signatures_fail_the_round_at_the_consistency_check() -> None:
    faults = [Dropout(node=i, round=1, stage=Stage.CONSISTENCY_CHECK) for i in range(6)]
    with pytest.raises(RoundFailedError, match=r"consistency-check: round 1: 4 of 10 survivors"):
        _malicious_run(10, faults=faults, degree=4, threshold=3, stop_on_failure=True)


def test_the_server_excludes_nodes_not_enrolled_and_refuses_bad_signatures() -> None:
    pki = enroll(range(1, 6), randomness=seeded_randomness(12))  # node 6 is not enrolled
    forger = Keyring({**pki.keyring, 6: IdentityKey.generate(seeded_randomness(13))})
    mod = SecAggPlusClientMod(identities=pki.identities, identity=forger, threat="malicious")
    secagg = protocol.secagg(degree=4, threshold=3, identities=pki.identities)
    result, outcome, (_, weights) = _run(6, mod, secagg, [*pki.node_ids, 6], seed=2)
    assert result.history[0].ok and sorted(outcome.participants) == [1, 2, 3, 4, 5]
    assert outcome.failures[6].kind == FailureKind.EXCLUDED
    assert "not enrolled" in outcome.failures[6].error.reason
    assert outcome.total_weight == sum(weights[:5])


def test_the_grpc_runtime_node_keys_serve_as_identities(tmp_path: Any) -> None:
    """docs/secagg.md's recipe: the PKI from the transport's node-keys.pub, each node's key
    from its node-<i>.key (Ed25519 already); a node checks its key is its enrolment."""
    from flowerpets.transport import NodeKey, load_public_keys, node_id_of, write_node_keys

    private_files, listing = write_node_keys(tmp_path, 3)
    pki = NodeIdentities.from_public_keys(load_public_keys([listing]), node_id=node_id_of)
    assert len(pki) == 3
    for path in private_files:
        node_key = NodeKey.load(path)
        key = IdentityKey.from_pem(node_key.private_pem())
        pki.check_own(node_key.node_id, key)  # the node's id in the runtime is its enrolment
        assert pki[node_key.node_id] == node_key.public_bytes
    with pytest.raises(ConfigurationError, match="not the one enrolled"):
        pki.check_own(NodeKey.load(private_files[0]).node_id, key)


def test_the_server_refuses_an_advertisement_its_node_did_not_sign() -> None:
    """The server verifies what it forwards: a reply whose signature does not verify is a
    protocol violation, and the round goes on without that node."""
    pki = enroll(range(1, 7), randomness=seeded_randomness(14))
    secagg_mod = SecAggPlusClientMod(identities=pki.identities, identity=pki.keyring)

    def tampering(msg: Message, context: Context, call_next: Any) -> Message:
        reply = secagg_mod(msg, context, call_next)
        if context.node_id == 6 and msg.metadata.stage == Stage.ADVERTISE_KEYS:
            body = reply.require_content()[RECORD]
            body["signature"] = bytes(64)  # type: ignore[index]
        return reply

    secagg = protocol.secagg(degree=4, threshold=3, identities=pki.identities)
    result, outcome, _ = _run(6, tampering, secagg, pki.node_ids, seed=3)
    assert result.history[0].ok and sorted(outcome.participants) == [1, 2, 3, 4, 5]
    assert outcome.failures[6].kind == FailureKind.PROTOCOL_VIOLATION
    assert "does not verify" in outcome.failures[6].error.reason


# -- what the local consistency check does not stop: regional views ---------------------------
@pytest.mark.parametrize("threat", BOTH)
def test_regional_views_learn_the_sum_of_a_small_block(federation: Any, threat: Threat) -> None:
    """A documented limit (docs/secagg.md, *Malicious mode*): a node checks the signatures of
    its neighbours only, so far-apart parts of the ring can be shown different survivor sets.
    With two views the server learns the exact sum of a block of k/2 + 2 = 6 honest nodes of
    40 (k = 8, t = 5 = rule 3M's at c = 0), where one survivor set for everyone (the
    argument that gave ``least_summed(40, 8) == 18``) leaves no such plan. In both modes
    every node accepts (malicious mode: only nodes built with ``require_quorum=False``,
    which warns; by default they refuse, see the next test); the sum is of 6 nodes, never
    of one (1 + 2t - k - c = 3 at least)."""
    from flowerpets.secagg.attacks import learn_block_sum, regional_plan
    from flowerpets.secagg.parameters import check_parameters, least_summed

    n, k, t = 40, 8, 5
    assert regional_plan(n, k, t, 6, views=1) is None  # one view: the global argument holds
    plan = regional_plan(n, k, t, 6)
    assert plan is not None
    if threat is Threat.MALICIOUS:
        with pytest.warns(UserWarning, match="sum of a small block"):
            fed = federation(n=n, degree=k, threshold=t, seed=3, threat=threat, quorum=0)
    else:
        fed = federation(n=n, degree=k, threshold=t, seed=3, threat=threat)
    got = learn_block_sum(fed, plan)
    assert not got.refusals and got.vector is not None
    block = [fed.index[node] for node in got.nodes]
    assert int(got.vector[-2]) == sum(fed.weights[i] for i in block)  # the exact total weight
    summed = sum(fed.weights[i] * fed.updates[i].astype(np.float64) for i in block)
    step = 1 / fed.config.quantization.float_factor(1)
    read = got.vector.view(np.int32)[:-2].astype(np.float64) * step
    assert np.max(np.abs(read - summed)) <= len(block) * step  # the block's weighted sum
    assert len(block) < least_summed(n, k) == 18  # what the one-view argument claimed
    guaranteed = check_parameters(n, k, t, threat=threat).least_summed
    assert guaranteed is None or guaranteed <= len(block)  # what the finder now promises


def test_the_docs_split_view_block_prints_what_the_docs_say(capsys: Any) -> None:
    """docs/secagg.md's *The split view, played*: its code, run, prints its text block."""
    from pathlib import Path

    docs = (Path(__file__).parents[2] / "docs" / "secagg.md").read_text()
    section = docs[docs.index("**The split view, played.**") : docs.index("**The argument.**")]
    code = section.split("```python\n")[1].split("```")[0]
    shown = section.split("```text\n")[1].split("```")[0]
    exec(compile(code, "docs/secagg.md", "exec"), {})
    assert capsys.readouterr().out == shown


def test_regional_views_need_the_least_threshold() -> None:
    """docs/secagg.md: one above t = k/2 + 1 the program finds no block plan (the plan of
    the test above is not an artefact of the program: at t = 6 it is held to the same
    checks and comes back empty), nor with one view at t = k/2 + 1."""
    from flowerpets.secagg.attacks import regional_plan

    assert regional_plan(40, 8, 5, 6) is not None
    assert regional_plan(40, 8, 6, 6) is None
    assert regional_plan(40, 8, 6, 8) is None


# -- the cohort quorum: one survivor set for every node that unmasks ------------------------
def test_by_default_every_node_refuses_the_regional_plan(federation: Any) -> None:
    """The malicious mode's default: nodes require the cohort quorum (23 of 40 at the
    default corrupted_fraction), so a node unmasks only once more than half the cohort
    signed its set. Two views cannot both gather that: every node the regional plan asks to
    unmask refuses, and the server reads nothing. Nor can the server drop the quorum from
    the round: every node refuses such a round at its first stage."""
    from flowerpets.secagg.attacks import learn_block_sum, regional_plan

    plan = regional_plan(40, 8, 5, 6)
    assert plan is not None
    fed = federation(n=40, degree=8, threshold=5, seed=3, threat=Threat.MALICIOUS)
    assert fed.config.quorum == 23 and fed.mod.require_quorum  # one mod for every node
    got = learn_block_sum(fed, plan)
    assert got.vector is None
    asked = set(plan.releases)
    assert len(got.refusals) == len(asked)  # every node asked to unmask refused
    assert all("fewer than the quorum 23" in r for r in got.refusals.values())
    bare = federation(n=40, degree=8, threshold=5, seed=3, threat=Threat.MALICIOUS)
    bare.config = dataclasses.replace(bare.config, quorum=0)
    for node in bare.ids:
        refused(bare.ask(node, Stage.ADVERTISE_KEYS, bare.advertise_message_fields()), "quorum")
    # The honest round with the same quorum unmasks.
    honest = federation(n=40, degree=8, threshold=5, seed=3, threat=Threat.MALICIOUS)
    honest.honest_until_unmask()
    for node in honest.ids:
        honest.ok(honest.unmask(node, honest.ids, []))


def test_a_node_that_requires_a_quorum_refuses_rounds_without_one(federation: Any) -> None:
    fed = federation(threat=Threat.MALICIOUS)
    assert fed.config.quorum == 5  # the default: floor((8 + 0) / 2) + 1
    node = fed.ids[0]
    fed.config = dataclasses.replace(fed.config, quorum=0)
    refused(fed.ask(node, Stage.ADVERTISE_KEYS, fed.advertise_message_fields()), "quorum")
    # With the quorum set, signatures short of it are refused even with t neighbours'.
    fed = federation(n=9, degree=4, threshold=3, threat=Threat.MALICIOUS)
    assert fed.config.quorum == 5
    fed.honest_until_unmask()
    node = fed.ids[0]
    signed = fed.signed_fields(node)
    short = {key: value[:4] for key, value in signed.items()}  # its 4 neighbours, no more
    refused(fed.unmask(node, fed.ids, [], signed=short), "only 4 nodes of the cohort signed")
    # Nor does the cohort's quorum stand in for t neighbours: 2 of them and 4 others.
    other = fed.ids[1]
    signed = fed.signed_fields(other)
    mine = set(fed.graph.neighbours(other))
    keep = [0, 1, *(at for at, j in enumerate(signed["signers"]) if j not in mine)]
    assert len(keep) == 6
    few = {key: [value[at] for at in keep] for key, value in signed.items()}
    refused(fed.unmask(other, fed.ids, [], signed=few), "only 2 of this node's neighbours")
    with pytest.raises(ConfigurationError, match="needs the malicious mode"):
        SecAggPlusClientMod(require_quorum=True)
    with pytest.raises(ConfigurationError, match="needs the malicious mode"):
        SecAggPlus(quorum=True)
    with pytest.raises(ParameterValueError, match="more than half the cohort"):
        dataclasses.replace(fed.config, quorum=4)
    with pytest.raises(ParameterValueError, match="more than half the cohort"):
        dataclasses.replace(fed.config, quorum=5, threat=Threat.SEMI_HONEST)


def test_the_server_sets_the_quorum_and_fails_the_round_short_of_it() -> None:
    pki = enroll(range(1, 101), randomness=seeded_randomness(0))
    secagg = SecAggPlus(identities=pki.identities)  # the malicious mode's default
    params = secagg.parameters(100)
    assert not params.is_complete and secagg.quorum_for(params) == (100 + 10) // 2 + 1
    assert params.quorum == secagg.quorum_for(params)  # what the finder counted
    # Hand-picked values report the quorum the round asks for too (and count it).
    picked = SecAggPlus(identities=pki.identities, degree=8, threshold=5).parameters(20)
    assert picked.quorum == 12 and picked.tolerated_dropouts == 3
    assert picked.least_summed == least_summed(20, 8)
    with pytest.warns(UserWarning, match="regional split view"):
        opted_out = SecAggPlus(identities=pki.identities, quorum=False)
    assert opted_out.quorum_for(params) == 0 and "quorum=False" in repr(opted_out)
    # 20 nodes, k = 8, t = 5: the quorum is 12 of the cohort; 8 drop at the consistency
    # check, so 12 sign and each has 11 others' signatures: short of it. Without the quorum
    # 9 nodes have their t neighbours' (and the round fails later, for too few of them).
    faults = [Dropout(node=i, round=1, stage=Stage.CONSISTENCY_CHECK) for i in range(0, 16, 2)]
    with pytest.raises(RoundFailedError, match=r"12 of 20 survivors signed .* 0 with t=5 .*of 12"):
        _malicious_run(20, faults=faults, stop_on_failure=True)
    with (
        pytest.warns(UserWarning, match="regional split view"),
        pytest.raises(RoundFailedError, match=r"12 of 20 survivors signed .* 9 with t=5 "),
    ):
        _malicious_run(20, faults=faults, quorum=False, stop_on_failure=True)


def test_a_threshold_above_the_quorum_forwards_t_signatures() -> None:
    """n = 10, k = 8, t = 7 above q = 6: the server forwards the t neighbours' signatures
    (which cover the quorum too), and the round succeeds with all 10 nodes (before, the
    server asked for a negative count of further signers and raised)."""
    result, outcome, _ = _malicious_run(10, degree=8, threshold=7)
    record = result.history[0]
    assert record.ok, record.error
    assert len(outcome.participants) == 10


def test_signatures_of_enrolled_nodes_outside_the_cohort_do_not_count(federation: Any) -> None:
    """The server may list enrolled nodes it colludes with, outside the round's cohort, as
    survivors, and forward their signatures: they would count towards the quorum (which
    bounds the cohort's colluders only, ``C``), so a handful of them would let two halves
    of the cohort each reach it over different sets. A node signs and counts only sets
    within the ring order."""
    fed = federation(n=9, degree=4, threshold=3, threat=Threat.MALICIOUS)
    outsiders = [1, 2]  # enrolled, colluding, not in the round
    pki = enroll([*fed.ids, *outsiders], randomness=seeded_randomness(5))
    fed.mod.identities, fed.mod.identity = pki.identities, pki.keyring
    fed.honest_until_collect()
    node = fed.ids[0]
    padded = [*fed.ids, *outsiders]
    reason = refused(fed.ask(node, Stage.CONSISTENCY_CHECK, {"survivors": padded}), "cohort")
    assert phase(fed, node) == Phase.ABORTED and "[1, 2]" in reason
    # Nor at unmasking, in either mode: an honest server lists only the cohort.
    for threat in BOTH:
        other = federation(n=9, degree=4, threshold=3, threat=threat)
        other.honest_until_unmask()
        refused(other.unmask(other.ids[1], [*other.ids, 1], []), "not in the round's cohort")
        refused(other.unmask(other.ids[2], other.ids, [2]), "not in the round's cohort")
        other.ok(other.unmask(other.ids[3], other.ids, []))
