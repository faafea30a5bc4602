"""A bug is never taken for a peer's fault, on either side (issue 10, item 4).

The node refuses (``REFUSED``) what a server's request gets wrong, and only
that: a bare built-in raised inside a stage is a bug of the node's own code and
its reply says so (``MOD_RAISED_EXCEPTION``). The server marks a reply
it cannot use as that node's failure, and only that: a bare built-in raised
while it checks a reply fails the round without blaming the node.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

import flowerpets.he._keysetup as keysetup
import flowerpets.he.client as he_client
from flowerpets import ClientApp, ConfigRecord, Context, ErrorCode, Message, RecordDict
from flowerpets.core import FailureKind
from flowerpets.he import COMPACT, HE_MESSAGE_TYPE, HomomorphicAggregation, Stage, ckks_mod
from flowerpets.he._primitives.keywrap import TransportKeys
from flowerpets.he._state import ClientKeys, ClientPhase

NODE = 7
PEER = TransportKeys.generate()


def _keygen(config: dict[str, object]) -> Message:
    return Message.create(
        RecordDict({"config": ConfigRecord(config)}),
        message_type=HE_MESSAGE_TYPE,
        dst_node_id=NODE,
        round=1,
        run_id=1,
        stage=Stage.KEYGEN,
    )


def _advertised() -> Context:
    context = Context(node_id=NODE, run_id=1)
    mine = TransportKeys.generate()
    ClientKeys(
        phase=ClientPhase.ADVERTISED, transport_private=mine.private, transport_public=mine.public
    ).store(context.state)
    return context


GOOD = {"he.params": COMPACT.to_list(), "he.recipients": [5], "he.recipient-keys": [PEER.public]}


@pytest.mark.parametrize(
    "change",
    [
        {"he.params": None},  # missing
        {"he.params": "compact"},  # mistyped
        {"he.recipients": [True]},  # a bool is not a node id
        {"he.recipient-keys": [b"short"]},  # not an X25519 key
        {"he.params": [4096, 40, 60, 60]},  # insecure
    ],
    ids=["missing", "mistyped", "bool-node", "bad-key", "insecure"],
)
def test_a_bad_request_is_a_refusal(change: dict[str, object]) -> None:
    config = {k: v for k, v in {**GOOD, **change}.items() if v is not None}
    reply = ClientApp(mods=[ckks_mod])(_keygen(config), _advertised())
    assert reply.error is not None and reply.error.code == ErrorCode.REFUSED, reply.error


@pytest.mark.parametrize("where", ["new_secret_context", "wrap"])
def test_a_bug_inside_a_stage_is_not_a_refusal(where: str, monkeypatch: pytest.MonkeyPatch) -> None:
    assert ClientApp(mods=[ckks_mod])(_keygen(GOOD), _advertised()).error is None  # the control

    def broken(*args: object) -> object:
        raise ValueError("a bug in the node's own code")

    # ``wrap`` runs where a bad recipient key is refused: its bug must not read as one.
    monkeypatch.setattr(he_client, where, broken)
    reply = ClientApp(mods=[ckks_mod])(_keygen(GOOD), _advertised())
    assert reply.error is not None
    assert reply.error.code == ErrorCode.MOD_RAISED_EXCEPTION
    assert "ValueError" in reply.error.reason and "bug" not in reply.error.reason


def test_a_bug_in_the_servers_reply_check_fails_the_round_not_the_node(
    kit: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(data: bytes, params: object) -> object:
        raise ValueError("a bug in the server's own code")

    monkeypatch.setattr(keysetup, "load_public_context", broken)
    done = kit.run(kit.server_app([HomomorphicAggregation()]), kit.client_app([ckks_mod]), 3)
    record = done.result.history.round(1)
    assert not record.ok and "ValueError" in (record.error or "")
    # The keygen reply was fine: no node carries an invalid-reply failure for it.
    assert not any(
        f.stage == Stage.KEYGEN and f.kind is FailureKind.INVALID_REPLY
        for f in record.failures.values()
    ), record.failures


def test_a_malformed_set_up_reply_is_the_nodes_failure(
    kit: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The control of the test above: a reply without the public key marks its node."""
    original = he_client.CKKSClientMod._advertise

    def without_key(self: he_client.CKKSClientMod, *args: object) -> ConfigRecord:
        out = original(self, *args)  # type: ignore[arg-type]
        if args[1].node_id == 101:  # type: ignore[attr-defined]
            del out["he.public-key"]
        return out

    monkeypatch.setattr(he_client.CKKSClientMod, "_advertise", without_key)
    mod = he_client.CKKSClientMod()  # built after the patch: it binds its stages when built
    done = kit.run(kit.server_app([HomomorphicAggregation()]), kit.client_app([mod]), 3)
    record = done.result.history.round(1)
    assert record.ok and done.pids(record.participants) == [1, 2]
    failure = record.failures[101]
    assert failure.stage == Stage.ADVERTISE and failure.kind is FailureKind.INVALID_REPLY
    assert "he.public-key" in failure.error.reason
