"""The mods end to end: exact FedAvg under encryption, selective encryption, refusals, key
set-up with dropouts and late joiners, malformed updates, streaming, and central DP."""

from __future__ import annotations

import gc
import logging
import struct
import weakref
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import tenseal as ts

from flowerpets import (
    SEALED_WEIGHT_KEY,
    ArrayRecord,
    Context,
    ErrorCode,
    FailureKind,
    Message,
    RecordDict,
    RoundRequest,
    RoundResult,
    ServerContext,
    is_sealed,
)
from flowerpets.dp import CentralDp, fixed_clipping_mod
from flowerpets.exceptions import MissingKeyError
from flowerpets.he import (
    HE_MESSAGE_TYPE,
    KEY_GENERATOR_CONFIG,
    WIDE,
    CKKSClientMod,
    EncryptedSum,
    HomomorphicAggregation,
    Stage,
    ckks_mod,
    open_model,
)
from flowerpets.he._primitives.ciphertexts import HEADER_NAME, Header, chunk_name
from flowerpets.he._primitives.params import new_secret_context
from flowerpets.simulation import Dropout, ErrorReply

Next = Callable[[Message, Context], Message]


def assert_model(got: ArrayRecord, expected: dict[str, np.ndarray]) -> None:
    assert list(got) == list(expected)
    np.testing.assert_allclose(got["w"].numpy(), expected["w"], rtol=0, atol=1e-9)
    np.testing.assert_allclose(got["b"].numpy(), expected["b"], rtol=1e-5, atol=1e-5)
    assert got["b"].dtype == np.float32 and got["w"].dtype == np.float64


def test_encrypted_fedavg_equals_plain_fedavg(kit: SimpleNamespace) -> None:
    he = kit.run(
        kit.server_app([HomomorphicAggregation()], rounds=3, evaluate=True),
        kit.client_app([ckks_mod]),
        5,
    )
    plain = kit.run(kit.server_app([], rounds=3, evaluate=True), kit.client_app(), 5)
    sealed = he.result.arrays
    assert is_sealed(sealed)
    # 2,107 values in two ciphertexts: the bias does not get one of its own.
    assert sorted(sealed) == sorted([HEADER_NAME, chunk_name(0), chunk_name(1), SEALED_WEIGHT_KEY])
    assert float(sealed[SEALED_WEIGHT_KEY].numpy()) == 15.0
    expected = kit.expected_model([(r, range(5)) for r in (1, 2, 3)])
    assert_model(open_model(sealed, he.contexts[3]), expected)
    assert_model(plain.result.arrays, expected)
    for a, b in zip(he.result.history.rounds, plain.result.history.rounds, strict=True):
        assert len(a.participants) == 5 and not a.failures
        assert a.train_metrics == b.train_metrics
        # Federated evaluation saw the opened model, as the plain run's nodes saw theirs.
        assert a.evaluate_metrics == pytest.approx(b.evaluate_metrics, abs=1e-5)
    # The key set-up ran once, before round 1, stage by stage.
    assert he.grid.stages()[:4] == [
        (1, Stage.ADVERTISE),
        (1, Stage.KEYGEN),
        (1, Stage.INSTALL),
        (1, "train"),
    ]
    assert all(msg.message_type != HE_MESSAGE_TYPE for msg in he.grid.sent if msg.round > 1)


def test_selective_encryption_sums_the_rest_in_the_clear(kit: SimpleNamespace) -> None:
    he = kit.run(
        kit.server_app([HomomorphicAggregation(encrypt=["w"])], rounds=2),
        kit.client_app([CKKSClientMod(encrypt=["w"])]),
        4,
    )
    train_replies = [r for r in he.grid.received if r.message_type == "train"]
    assert len(train_replies) == 8
    for reply in train_replies:
        arrays = reply.require_content().get_typed("arrays", ArrayRecord)
        assert "b" in arrays and "w" not in arrays and HEADER_NAME in arrays
        header = Header.decode(arrays[HEADER_NAME])
        assert header.layout.names == ("w",) and header.chunks == 2
    sealed = he.result.arrays
    assert "b" in sealed and sealed["b"].dtype == np.float32  # the plain mean, cast back
    expected = kit.expected_model([(1, range(4)), (2, range(4))])
    np.testing.assert_allclose(sealed["b"].numpy(), expected["b"], rtol=1e-5)
    assert_model(open_model(sealed, he.contexts[0]), expected)


def test_an_unmatched_pattern_is_a_loud_error(kit: SimpleNamespace) -> None:
    with pytest.raises(ValueError, match="match no array"):
        kit.run(
            kit.server_app([HomomorphicAggregation(encrypt=["fc*"])]), kit.client_app([ckks_mod]), 2
        )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"encrypt": "w"}, "sequence"),
        ({"encrypt": []}, "non-empty"),
        ({"params": "compact"}, "CKKSParameters"),
        ({"max_keygen_attempts": 0}, "max_keygen_attempts"),
    ],
)
def test_server_mod_configuration_is_validated(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        HomomorphicAggregation(**kwargs)


def test_client_mod_configuration_is_validated(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(TypeError, match="encrypt"):  # one str is not a sequence of them
        CKKSClientMod(encrypt="w")
    for bad in ([], [""]):
        with pytest.raises(ValueError, match="encrypt"):
            CKKSClientMod(encrypt=bad)
    with caplog.at_level(logging.WARNING):
        CKKSClientMod(encrypt=["w"])
    assert "in the clear" in caplog.text


def test_nodes_refuse_to_send_updates_in_the_clear(kit: SimpleNamespace) -> None:
    # No HE on the server: every node refuses rather than send its update unencrypted.
    plain_server = kit.run(kit.server_app([]), kit.client_app([ckks_mod]), 3)
    record = plain_server.result.history.round(1)
    assert not record.participants and record.error
    assert {f.error.code for f in record.failures.values()} == {ErrorCode.REFUSED}
    assert "in the clear" in next(iter(record.failures.values())).error.reason
    # The server asks to leave "b" in the clear, which these nodes encrypt: refused too.
    narrow = kit.run(
        kit.server_app([HomomorphicAggregation(encrypt=["w"])]), kit.client_app([ckks_mod]), 3
    )
    failures = narrow.result.history.round(1).failures
    assert len(failures) == 3
    assert all("'b'" in f.error.reason and "clear" in f.error.reason for f in failures.values())


def test_values_beyond_capacity_are_refused_wide_parameters_hold_them(
    kit: SimpleNamespace,
) -> None:
    def heavy(pid: int) -> int:
        return 100_000  # 100,000 x |update| ~ 3 over 3 nodes: far beyond 2^17 / 3

    compact = kit.run(
        kit.server_app([HomomorphicAggregation()]), kit.client_app([ckks_mod], weights=heavy), 3
    )
    failures = compact.result.history.round(1).failures
    assert len(failures) == 3
    assert all("capacity" in f.error.reason for f in failures.values())
    wide = kit.run(
        kit.server_app([HomomorphicAggregation(params=WIDE)]),
        kit.client_app([ckks_mod], weights=heavy),
        3,
    )
    assert len(wide.result.history.round(1).participants) == 3
    expected = kit.expected_model([(1, range(3))], weights=heavy)
    assert_model(open_model(wide.result.arrays, wide.contexts[0]), expected)


def _keys_state(run: Any) -> dict[str, Any]:
    from flowerpets.he._state import ClientKeys

    return {c.node_id: ClientKeys.load(c.state) for c in run.contexts}


def test_a_late_joiner_gets_the_key_from_a_holder(kit: SimpleNamespace) -> None:
    late = kit.run(
        kit.server_app([HomomorphicAggregation()], rounds=2),
        kit.client_app([ckks_mod]),
        4,
        faults=[ErrorReply(node=2, round=1, stage=Stage.INSTALL)],
        node_config=volunteer_zero,  # node 2 must not be the (randomly chosen) key generator
    )
    first, second = late.result.history.rounds
    node2 = late.ids[2]
    assert late.pids(first.participants) == [0, 1, 3]
    assert first.failures[node2].stage == Stage.INSTALL
    assert first.failures[node2].error.code == ErrorCode.INJECTED_FAULT
    assert late.pids(second.participants) == [0, 1, 2, 3] and not second.failures
    assert (2, Stage.SHARE) in late.grid.stages() and (2, Stage.INSTALL) in late.grid.stages()
    keys = _keys_state(late)
    assert len({k.key_id for k in keys.values()}) == 1
    expected = kit.expected_model([(1, [0, 1, 3]), (2, range(4))])
    assert_model(open_model(late.result.arrays, late.contexts[2]), expected)


def volunteer_zero(index: int) -> dict[str, bool]:
    return {KEY_GENERATOR_CONFIG: index == 0}


def test_a_generator_lost_during_keygen_is_replaced(kit: SimpleNamespace) -> None:
    lost = kit.run(
        kit.server_app([HomomorphicAggregation()], rounds=2),
        kit.client_app([ckks_mod]),
        4,
        faults=[Dropout(node=0, round=1, stage=Stage.KEYGEN)],
        node_config=volunteer_zero,
    )
    keygen = [m.metadata.dst_node_id for m in lost.grid.sent if m.metadata.stage == Stage.KEYGEN]
    assert keygen[0] == lost.ids[0] and len(keygen) == 2  # the volunteer first, then another
    for record in lost.result.history.rounds:
        assert lost.pids(record.participants) == [1, 2, 3]
    expected = kit.expected_model([(1, [1, 2, 3]), (2, [1, 2, 3])])
    assert_model(open_model(lost.result.arrays, lost.contexts[1]), expected)


def test_when_the_generator_is_gone_another_holder_serves_newcomers(kit: SimpleNamespace) -> None:
    gone = kit.run(
        kit.server_app([HomomorphicAggregation()], rounds=2),
        kit.client_app([ckks_mod]),
        4,
        faults=[ErrorReply(node=3, round=1, stage=Stage.ADVERTISE), Dropout(node=0, round=2)],
        node_config=volunteer_zero,
    )
    first, second = gone.result.history.rounds
    assert gone.pids(first.participants) == [0, 1, 2]
    assert first.failures[gone.ids[3]].stage == Stage.ADVERTISE
    shares = [m for m in gone.grid.sent if m.metadata.stage == Stage.SHARE]
    assert [gone.pid(m.metadata.dst_node_id) for m in shares] == [0, 1]  # generator, then next
    assert gone.pids(second.participants) == [1, 2, 3]
    expected = kit.expected_model([(1, [0, 1, 2]), (2, [1, 2, 3])])
    assert_model(open_model(gone.result.arrays, gone.contexts[3]), expected)


def test_with_every_holder_gone_the_sealed_model_waits(kit: SimpleNamespace) -> None:
    stuck = kit.run(
        kit.server_app([HomomorphicAggregation()], rounds=3),
        kit.client_app([ckks_mod]),
        3,
        faults=[
            ErrorReply(node=2, round=1, stage=Stage.ADVERTISE),
            Dropout(node=0, round=2),
            Dropout(node=1, round=2),
        ],
    )
    first, second, third = stuck.result.history.rounds
    assert first.ok and stuck.pids(first.participants) == [0, 1]
    assert not second.ok and not third.ok
    assert "no connected node holds the key" in (third.error or "")
    # The model is round 1's, still sealed under the lost key.
    expected = kit.expected_model([(1, [0, 1])])
    assert_model(open_model(stuck.result.arrays, stuck.contexts[0]), expected)
    with pytest.raises(MissingKeyError):
        open_model(stuck.result.arrays, stuck.contexts[2])


def test_with_every_holder_gone_before_a_sealed_model_a_new_key_is_made(
    kit: SimpleNamespace,
) -> None:
    fresh = kit.run(
        kit.server_app([HomomorphicAggregation()], rounds=3),
        kit.client_app([ckks_mod]),
        3,
        faults=[
            ErrorReply(node=2, round=1, stage=Stage.ADVERTISE),
            ErrorReply(node=0, round=1, stage="train"),
            ErrorReply(node=1, round=1, stage="train"),
            Dropout(node=0, round=2),
            Dropout(node=1, round=2),
        ],
    )
    first, second, third = fresh.result.history.rounds
    assert not first.ok and not second.ok
    assert third.ok and fresh.pids(third.participants) == [2]
    keygens = [m for m in fresh.grid.sent if m.metadata.stage == Stage.KEYGEN]
    assert [m.round for m in keygens] == [1, 3] and keygens[1].metadata.dst_node_id == fresh.ids[2]
    expected = kit.expected_model([(3, [2])])
    assert_model(open_model(fresh.result.arrays, fresh.contexts[2]), expected)


# -- malformed updates ---------------------------------------------------------------------------
def _other_params_chunk(arrays: ArrayRecord) -> None:
    blob = ts.ckks_vector(new_secret_context(WIDE), np.ones(2048)).serialize()
    arrays[chunk_name(0)] = np.frombuffer(blob, np.uint8)


def _short_chunk(arrays: ArrayRecord) -> None:
    # A real ciphertext under the run's key, of the wrong number of values.
    arrays[chunk_name(1)] = arrays[chunk_name(0)]


def _header(**changes: Any) -> Callable[[ArrayRecord], None]:
    def tamper(arrays: ArrayRecord) -> None:
        header = Header.decode(arrays[HEADER_NAME])
        fields = {
            "key_id": header.key_id,
            "params": header.params,
            "layout": header.layout,
            "order": header.order,
        }
        fields.update(changes)
        if "layout" in changes and changes["layout"] == "other":
            from flowerpets.he._primitives.packing import Layout

            fields["layout"] = Layout.of({"w": np.zeros((70, 30)), "b": np.zeros(7)}, ["w", "b"])
        if "layout" in changes and changes["layout"] == "huge":
            from flowerpets.core import ArrayLayout
            from flowerpets.he._primitives.packing import Layout

            fields["layout"] = Layout(ArrayLayout(("w",), ((1 << 20, 1 << 20),), ("<f8",)))
        arrays[HEADER_NAME] = Header(**fields).encode()

    return tamper


TAMPERS: dict[str, Callable[[ArrayRecord], None]] = {
    "garbage bytes": lambda a: a.__setitem__(chunk_name(0), np.frombuffer(b"\x07" * 999, np.uint8)),
    "truncated": lambda a: a.__setitem__(chunk_name(0), a[chunk_name(0)].numpy()[:-64]),
    "empty": lambda a: a.__setitem__(chunk_name(0), np.zeros(0, np.uint8)),
    "missing chunk": lambda a: a.pop(chunk_name(1)),
    "extra reserved array": lambda a: a.__setitem__("he.note", np.ones(1, np.uint8)),
    "other parameters": _other_params_chunk,
    "wrong size": _short_chunk,
    "other key id": _header(key_id="f" * 32),
    "other layout": _header(layout="other"),
    "a sum's header": _header(order=("w", "b")),
    "a header claiming 2^40 values": _header(layout="huge"),
    "no encrypted part": lambda a: [a.pop(n) for n in list(a) if n.startswith("he.")],
    "floats as ciphertext": lambda a: a.__setitem__(chunk_name(0), np.ones(10)),
}


@pytest.mark.parametrize("tamper", list(TAMPERS), ids=list(TAMPERS))
def test_a_malformed_update_fails_its_node_and_the_round_goes_on(
    kit: SimpleNamespace, tamper: str
) -> None:
    def corrupt(msg: Message, context: Context, call_next: Next) -> Message:
        reply = call_next(msg, context)
        if msg.message_type != "train" or context.node_config["partition-id"] != 0:
            return reply
        content = reply.require_content()
        arrays = ArrayRecord(content.get_typed("arrays", ArrayRecord))
        TAMPERS[tamper](arrays)
        out = content.copy()
        out["arrays"] = arrays
        return Message(metadata=reply.metadata, content=out)

    bad = kit.run(
        kit.server_app([HomomorphicAggregation()]), kit.client_app([corrupt, ckks_mod]), 4
    )
    record = bad.result.history.round(1)
    assert bad.pids(record.participants) == [1, 2, 3]
    failure = record.failures[bad.ids[0]]
    assert failure.error.code == ErrorCode.INVALID_REPLY and failure.stage == "train"
    # The others' sum is exactly theirs: nothing of the bad update got in.
    assert_model(
        open_model(bad.result.arrays, bad.contexts[1]), kit.expected_model([(1, [1, 2, 3])])
    )


def test_a_nan_in_the_clear_part_fails_its_node(kit: SimpleNamespace) -> None:
    def poison(msg: Message, context: Context, call_next: Next) -> Message:
        reply = call_next(msg, context)
        if context.node_config["partition-id"] == 0 and msg.message_type == "train":
            content = reply.require_content()
            arrays = ArrayRecord(content.get_typed("arrays", ArrayRecord))
            arrays["b"] = np.full(7, np.nan, np.float32)
            content["arrays"] = arrays
        return reply

    bad = kit.run(
        kit.server_app([HomomorphicAggregation(encrypt=["w"])]),
        kit.client_app([poison, CKKSClientMod(encrypt=["w"])]),
        3,
    )
    record = bad.result.history.round(1)
    assert bad.pids(record.participants) == [1, 2]
    assert "NaN" in record.failures[bad.ids[0]].error.reason


def test_the_server_streams_one_update_at_a_time(kit: SimpleNamespace) -> None:
    alive: list[weakref.ref[np.ndarray]] = []
    most = [0]

    def watch(reply: Message) -> None:
        gc.collect()
        most[0] = max(most[0], sum(ref() is not None for ref in alive))
        if reply.message_type == "train" and reply.content is not None:
            arrays = reply.content.get_typed("arrays", ArrayRecord)
            alive.append(weakref.ref(arrays[chunk_name(0)].numpy()))

    server = kit.server_app([HomomorphicAggregation()])
    client = kit.client_app([ckks_mod])
    # Hook the recording grid before the run: ``run`` builds it, so wrap its class method.
    original = kit.RecordingGrid.send_and_receive

    def send_and_receive(self: Any, messages: Any, *, timeout: Any = None) -> Any:
        self.on_reply = watch
        return original(self, messages, timeout=timeout)

    kit.RecordingGrid.send_and_receive = send_and_receive
    try:
        streamed = kit.run(server, client, 6, record_replies=False)
    finally:
        kit.RecordingGrid.send_and_receive = original
    assert len(streamed.result.history.round(1).participants) == 6
    assert len(alive) == 6
    # When a reply arrives, at most the previous one is still referenced (by the loop that
    # is adding it): the server never holds the cohort's updates at once.
    assert most[0] <= 1


def test_central_dp_noise_adds_to_the_sealed_and_the_plain_sum(kit: SimpleNamespace) -> None:
    added: list[dict[str, np.ndarray]] = []

    def noise_mod(
        request: RoundRequest,
        context: ServerContext,
        call_next: Callable[[RoundRequest, ServerContext], RoundResult],
    ) -> RoundResult:
        result = call_next(request, context)
        assert isinstance(result.sealed, EncryptedSum)
        rng = np.random.default_rng(request.round)  # a stand-in: real DP noise is secure
        noise = {name: rng.normal(0, 0.5, shape) for name, shape in result.shapes().items()}
        added.append(noise)
        return result.add_to_sum(noise)

    noised = kit.run(
        kit.server_app([noise_mod, HomomorphicAggregation(encrypt=["w"])], rounds=2),
        kit.client_app([CKKSClientMod(encrypt=["w"])]),
        4,
    )
    assert set(added[0]) == {"w", "b"}
    current = kit.model()
    total = sum(kit.weight(p) for p in range(4))
    for rnd, noise in enumerate(added, start=1):
        step = kit.expected_model([(rnd, range(4))], start=current)
        current = {n: step[n] + noise[n] / total for n in step}
    opened = open_model(noised.result.arrays, noised.contexts[0])
    np.testing.assert_allclose(opened["w"].numpy(), current["w"], atol=1e-9)
    np.testing.assert_allclose(opened["b"].numpy(), current["b"], rtol=1e-5, atol=1e-5)


def _forge_tenseal_scale(arrays: ArrayRecord) -> None:
    """Rewrite TenSEAL's own scale field (``CKKSVectorProto.scale``), not SEAL's ``ct.scale``."""
    blob = arrays[chunk_name(0)].numpy().tobytes()
    field = b"\x19" + struct.pack("<d", 2.0**40)  # field 3, a double: the last one serialized
    assert blob.endswith(field)
    arrays[chunk_name(0)] = np.frombuffer(blob[:-8] + struct.pack("<d", 2.0**41), np.uint8)


class _ForgerFirst:
    """A grid that hands the server the forger's train reply before any other."""

    def __init__(self, inner: Any, forger: int) -> None:
        self.inner, self.forger = inner, forger
        self.run_id = inner.run_id

    def node_ids(self) -> Any:
        return self.inner.node_ids()

    def send_and_receive(self, messages: Any, *, timeout: Any = None) -> Any:
        replies = list(self.inner.send_and_receive(messages, timeout=timeout))
        return iter(sorted(replies, key=lambda r: r.metadata.src_node_id != self.forger))


@pytest.mark.filterwarnings("ignore::flowerpets.exceptions.InsecureRandomnessWarning")
def test_a_forged_tenseal_scale_arriving_first_fails_its_node_not_the_run(
    kit: SimpleNamespace,
) -> None:
    """Issue 9, item 3: the sum inherited the first update's scale; the noise then crashed."""
    forger = 101  # partition 0

    def forge(msg: Message, context: Context, call_next: Next) -> Message:
        reply = call_next(msg, context)
        if msg.message_type != "train" or context.node_id != forger or reply.has_error:
            return reply
        content = reply.require_content()
        arrays = ArrayRecord(content.get_typed("arrays", ArrayRecord))
        _forge_tenseal_scale(arrays)
        out = content.copy()
        out["arrays"] = arrays
        return Message(metadata=reply.metadata, content=out)

    dp = CentralDp(noise_multiplier=0.5, clipping_norm=5.0, rng=np.random.default_rng(7))
    done = kit.run(
        kit.server_app([dp, HomomorphicAggregation()], rounds=2),
        kit.client_app([forge, ckks_mod, fixed_clipping_mod]),
        4,
        wrap=lambda inner: _ForgerFirst(inner, forger),
    )
    assert done.grid.received[0].metadata.src_node_id == forger  # it did arrive first
    for rnd in (1, 2):
        record = done.result.history.round(rnd)
        assert done.pids(record.participants) == [1, 2, 3]
        failure = record.failures[forger]
        assert failure.error.code == ErrorCode.INVALID_REPLY and failure.stage == "train"
        assert "scale" in failure.error.reason
        assert record.ok and record.train_metrics["epsilon"] > 0
    opened = open_model(done.result.arrays, done.contexts[1])
    assert all(np.isfinite(a.numpy()).all() for a in opened.values())


def test_the_sealed_sum_refuses_bad_plaintext(kit: SimpleNamespace) -> None:
    captured: list[RoundResult] = []

    def spy(request: RoundRequest, context: ServerContext, call_next: Any) -> RoundResult:
        captured.append(call_next(request, context))
        return captured[-1]

    kit.run(kit.server_app([spy, HomomorphicAggregation()]), kit.client_app([ckks_mod]), 2)
    sealed = captured[0].sealed
    assert isinstance(sealed, EncryptedSum) and not sealed.empty
    assert dict(sealed.shapes) == {"w": (30, 70), "b": (7,)}
    with pytest.raises(KeyError):
        sealed.add_plaintext({"nope": np.ones(1)})
    with pytest.raises(ValueError, match="shape"):
        sealed.add_plaintext({"b": np.ones(8)})
    with pytest.raises(ValueError, match="NaN"):
        sealed.add_plaintext({"b": np.full(7, np.nan)})
    assert sealed.add_plaintext({"b": np.ones(7)}) is not sealed


def test_open_model_needs_a_key_holder(kit: SimpleNamespace) -> None:
    done = kit.run(kit.server_app([HomomorphicAggregation()]), kit.client_app([ckks_mod]), 2)
    with pytest.raises(MissingKeyError):
        open_model(done.result.arrays, Context(node_id=0))  # the server's kind of context
    plain = ArrayRecord.from_numpy(kit.model())
    assert open_model(plain, Context(node_id=0)) is plain


def test_a_node_without_the_key_refuses_a_sealed_model(kit: SimpleNamespace) -> None:
    done = kit.run(kit.server_app([HomomorphicAggregation()]), kit.client_app([ckks_mod]), 2)
    app = kit.client_app([ckks_mod])
    request = Message.create(
        RecordDict({"arrays": done.result.arrays}), message_type="train", dst_node_id=9, round=2
    )
    reply = app(request, Context(node_id=9))
    assert reply.error is not None and reply.error.code == ErrorCode.REFUSED
    assert "no CKKS key" in reply.error.reason


def test_a_key_set_up_that_fails_keeps_every_nodes_reason(kit: SimpleNamespace) -> None:
    # One node refuses to advertise, the three others to generate the key: the failed
    # round's record names each node, its stage and the kind of its failure.
    faults = [ErrorReply(node=i, round=1, stage=Stage.KEYGEN, reason=f"no {i}") for i in range(3)]
    failed = kit.run(
        kit.server_app([HomomorphicAggregation()], rounds=1),
        kit.client_app([ckks_mod]),
        4,
        faults=[*faults, ErrorReply(node=3, round=1, stage=Stage.ADVERTISE, reason="busy")],
    )
    (record,) = failed.result.history.rounds
    assert not record.ok and "no node could generate the CKKS key" in (record.error or "")
    got = {failed.pid(n): (f.stage, f.kind, f.error.reason) for n, f in record.failures.items()}
    assert got == {
        0: (Stage.KEYGEN, FailureKind.ERROR_REPLY, "no 0"),
        1: (Stage.KEYGEN, FailureKind.ERROR_REPLY, "no 1"),
        2: (Stage.KEYGEN, FailureKind.ERROR_REPLY, "no 2"),
        3: (Stage.ADVERTISE, FailureKind.ERROR_REPLY, "busy"),
    }
