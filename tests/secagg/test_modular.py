"""SecAgg+'s modular path: a quantized domain's residues summed exactly modulo ``2**bits``.

A server mod asks for a quantized round (``RoundRequest.quantized``, as distributed
DP does); the nodes reply with residues under the domain's names, beside ordinary
float arrays or alone. The released sum of each residue array is the unweighted sum
over the participants modulo ``2**bits`` (checked against Python's integers), whoever
drops out at whatever stage, semi-honest or malicious; the server never sees a
residue but masked; a node refuses residues it was not given, without showing them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowerpets.core import (
    BINDING_KEY,
    MODULUS_BITS_KEY,
    NAMES_KEY,
    ArrayRecord,
    ClientApp,
    ConfigRecord,
    Context,
    ErrorCode,
    FailureKind,
    FedAvg,
    Message,
    MessageType,
    MetricRecord,
    QuantizedDomain,
    RecordDict,
    RoundRequest,
    RoundResult,
    ServerApp,
    ServerContext,
    domain_of,
    modulus_bits_of,
)
from flowerpets.exceptions import ProtocolViolationError
from flowerpets.secagg import RoundConfig, SecAggPlus, SecAggPlusClientMod, Stage, enroll
from flowerpets.secagg.protocol import (
    MASKED_ARRAY,
    MASKED_RECORD,
    MODULAR,
    PROTOCOL_VERSION,
    RECORD,
    Layout,
)
from flowerpets.secagg.threat import Threat
from flowerpets.simulation import Dropout, FaultPlan, SimulationGrid, run_simulation
from tests.he.conftest import RecordingGrid
from tests.secagg import test_malicious as malicious
from tests.secagg import test_protocol as protocol
from tests.secagg.conftest import seeded_randomness
from tests.secagg.test_attacks import refused

PARAMS = 24
SHAPE = (4, 6)  # the residues travel flattened and come back in this shape


# -- what the nodes send ---------------------------------------------------------------------
def residues(n: int, bits: int, seed: int = 0, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    """``n`` nodes' residues, crowded at the top of the range (so the sum wraps) and at 0."""
    rng = np.random.default_rng([seed, bits])
    modulus = 1 << bits
    top = np.uint64(modulus - 1)
    values = rng.integers(0, modulus, size=(n, *shape), dtype=np.uint64)
    edge = rng.integers(0, 3, size=values.shape)  # 0: random, 1: near the top, 2: zero
    near_top = top - rng.integers(0, min(modulus, 4), size=values.shape).astype(np.uint64)
    values = np.where(edge == 1, near_top, values)
    return np.where(edge == 2, np.uint64(0), values)


def modular_sum(rows: np.ndarray, bits: int, who: Sequence[int]) -> np.ndarray:
    """Python-integer sum of the rows ``who``, mod 2**bits (an independent computation)."""
    total = sum((rows[i].astype(object) for i in who), np.zeros(rows.shape[1:], dtype=object))
    return (total % (1 << bits)).astype(np.uint64)


def client(
    res: np.ndarray,
    *,
    updates: np.ndarray | None = None,
    weights: Sequence[int] | None = None,
    mods: Sequence[Any] | None = None,
    edit: Callable[[int, dict[str, Any]], dict[str, Any]] | None = None,
) -> ClientApp:
    """Node ``i`` replies with ``res[i]`` as ``"r"`` (and ``updates[i]`` as ``"w"``)."""
    app = ClientApp(mods=[SecAggPlusClientMod()] if mods is None else mods)

    @app.train()
    def train(msg: Message, context: Context) -> RecordDict:
        i = int(context.node_config["partition-id"])  # type: ignore[arg-type]
        arrays: dict[str, Any] = {"r": res[i]}
        if updates is not None:
            arrays["w"] = updates[i]
        if edit is not None:
            arrays = edit(i, arrays)
        weight = 1 if weights is None else weights[i]
        return RecordDict(
            {
                "arrays": ArrayRecord.from_numpy(arrays),
                "metrics": MetricRecord({"num-examples": weight}),
            }
        )

    return app


class AskResidues:
    """The outer server mod distributed DP would be: asks for a quantized round and keeps its
    result; hands FedAvg back the model arrays only (zeros where the reply had none)."""

    def __init__(self, domain: QuantizedDomain) -> None:
        self.domain = domain
        self.requests: list[RoundRequest] = []
        self.results: list[RoundResult] = []

    def __call__(
        self, request: RoundRequest, context: ServerContext, call_next: Any
    ) -> RoundResult:
        asked = request.replace(quantized=self.domain)
        self.requests.append(asked)
        result: RoundResult = call_next(asked, context)
        self.results.append(result)
        model = ArrayRecord({"w": np.zeros(PARAMS, np.float32)})
        for name, array in result.aggregate.items():
            if name not in self.domain:
                model[name] = array
        return result.replace(aggregate=model)


def server(domain: QuantizedDomain, secagg: SecAggPlus) -> tuple[ServerApp, AskResidues]:
    ask = AskResidues(domain)
    app = ServerApp(
        strategy=FedAvg(),
        num_rounds=1,
        initial_arrays=ArrayRecord({"w": np.zeros(PARAMS, np.float32)}),
        mods=[ask, secagg],
    )
    return app, ask


def run_round(
    app: ClientApp,
    n: int,
    bits: int,
    *,
    faults: Sequence[Any] = (),
    secagg: SecAggPlus | None = None,
    node_ids: Sequence[int] | None = None,
    binding: bytes = b"",
) -> tuple[Any, RoundResult]:
    domain = QuantizedDomain(modulus_bits=bits, names=("r",), binding=binding)
    server_app, ask = server(domain, secagg or protocol.secagg())
    result = run_simulation(
        server_app, app, n, seed=0, faults=faults, max_workers=2, node_ids=node_ids
    )
    assert result.history[0].ok, result.history[0].error
    return result, ask.results[0]


def assert_modular(outcome: RoundResult, got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == np.uint64 and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    assert "r" in outcome.aggregate


# -- exact sums ------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 8, 16, 31, 32])
def test_residues_sum_exactly_modulo_the_modulus_and_wrap(bits: int) -> None:
    res = residues(10, bits)
    _, outcome = run_round(client(res), 10, bits)
    got = outcome.aggregate["r"].numpy()
    everyone = range(10)
    assert_modular(outcome, got, modular_sum(res, bits, everyone))
    plain = res.astype(object).sum(0)
    assert (plain >= (1 << bits)).any()  # the sum did wrap: the test can tell
    assert int(got.max()) < (1 << bits)


@settings(max_examples=12, deadline=None)
@given(bits=st.integers(2, 32), seed=st.integers(0, 2**32 - 1))
def test_property_the_sum_is_numpys_sum_modulo_2_to_the_bits(bits: int, seed: int) -> None:
    n = 5
    res = residues(n, bits, seed=seed, shape=(7,))
    want = res.sum(axis=0, dtype=np.uint64) % np.uint64(1 << bits)  # 5 * 2**32 fits in 64 bits
    _, outcome = run_round(client(res), n, bits, secagg=protocol.secagg(degree=4, threshold=3))
    np.testing.assert_array_equal(outcome.aggregate["r"].numpy(), want)


def test_residues_beside_float_arrays_in_one_reply() -> None:
    """The float array keeps its weighted, quantized path; the residues are unweighted."""
    n, bits = 10, 20
    updates, weights = protocol.make_data(n)
    updates = updates[:, :PARAMS]
    res = residues(n, bits)
    app = client(res, updates=updates, weights=weights)
    result, outcome = run_round(app, n, bits)
    assert_modular(outcome, outcome.aggregate["r"].numpy(), modular_sum(res, bits, range(n)))
    assert outcome.total_weight == sum(weights)
    bound = outcome.metrics["secagg-mean-error-bound"]
    assert isinstance(bound, float)
    mean = protocol.weighted_mean(updates, weights, range(n))
    assert np.max(np.abs(result.arrays["w"].numpy() - mean)) <= bound + 1e-6
    assert outcome.aggregate["w"].numpy().dtype == np.float64  # the weighted sum


def test_narrow_unsigned_dtypes_are_residues_too() -> None:
    bits = 8
    res = residues(6, bits)
    app = client(res, edit=lambda i, a: {"r": a["r"].astype(np.uint8)})
    _, outcome = run_round(app, 6, bits, secagg=protocol.secagg(degree=4, threshold=3))
    np.testing.assert_array_equal(outcome.aggregate["r"].numpy(), modular_sum(res, bits, range(6)))


# -- dropouts ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(protocol.DROPOUT_SETS))
def test_dropouts_at_every_stage_leave_the_exact_modular_sum(name: str) -> None:
    plan = protocol.DROPOUT_SETS[name]
    bits = 12
    res = residues(10, bits, seed=3)
    faults = [Dropout(node=i, round=1, stage=s) for s, nodes in plan.items() for i in nodes]
    result, outcome = run_round(client(res), 10, bits, faults=faults)
    lost = {i for stage, nodes in plan.items() if stage != Stage.UNMASK for i in nodes}
    participants = sorted(result.node_index(p) for p in outcome.participants)
    assert participants == [i for i in range(10) if i not in lost]
    assert outcome.metrics["secagg-unmask-missing"] == len(plan.get(Stage.UNMASK, []))
    got = outcome.aggregate["r"].numpy()
    np.testing.assert_array_equal(got, modular_sum(res, bits, participants))
    if lost:  # the dropped nodes' residues are out: not the full cohort's sum by accident
        assert not np.array_equal(got, modular_sum(res, bits, range(10)))


@pytest.mark.parametrize("name", sorted(malicious.MALICIOUS_DROPOUTS))
def test_malicious_mode_with_dropouts_at_every_stage_gives_the_exact_modular_sum(
    name: str,
) -> None:
    plan = malicious.MALICIOUS_DROPOUTS[name]
    bits = 32
    res = residues(10, bits, seed=4)
    pki = enroll(range(1, 11), randomness=seeded_randomness(11))
    mod = SecAggPlusClientMod(identities=pki.identities, identity=pki.keyring)
    faults = [Dropout(node=i, round=1, stage=s) for s, nodes in plan.items() for i in nodes]
    result, outcome = run_round(
        client(res, mods=[mod]),
        10,
        bits,
        faults=faults,
        secagg=protocol.secagg(identities=pki.identities),
        node_ids=pki.node_ids,
    )
    assert outcome.metrics["secagg-degree"] == 8
    lost = {i for stage, nodes in plan.items() if stage not in malicious.LATE for i in nodes}
    participants = sorted(result.node_index(p) for p in outcome.participants)
    assert participants == [i for i in range(10) if i not in lost]
    got = outcome.aggregate["r"].numpy()
    np.testing.assert_array_equal(got, modular_sum(res, bits, participants))


# -- what the server sees --------------------------------------------------------------------
@pytest.mark.parametrize("bits", [8, 32])
def test_the_server_sees_the_residues_only_masked_and_their_modular_sum(bits: int) -> None:
    n = 8
    res = residues(n, bits, seed=5)
    contexts = [
        Context(node_id=201 + i, run_id=1, node_config={"partition-id": i}) for i in range(n)
    ]
    domain = QuantizedDomain(modulus_bits=bits, names=("r",))
    app, ask = server(domain, protocol.secagg(degree=4, threshold=3))
    dropped = Dropout(node=2, round=1, stage=Stage.UNMASK)  # its masked input is in the sum
    with SimulationGrid(
        client(res), contexts, run_id=1, faults=FaultPlan([dropped]), max_workers=2
    ) as inner:
        grid = RecordingGrid(inner)
        assert app.run(grid).history[0].ok
    masked = {}
    for reply in grid.received:
        if reply.content is None:
            continue
        # No reply carries an array record but the masked vector.
        assert set(reply.content) <= {RECORD, MASKED_RECORD}, set(reply.content)
        if MASKED_RECORD in reply.content:
            layout = Layout.read(reply.content[RECORD], ())  # type: ignore[arg-type]
            assert layout.names == ("r",) and layout.kinds == (MODULAR,)
            vector = reply.content[MASKED_RECORD][MASKED_ARRAY].numpy()  # type: ignore[index]
            masked[reply.metadata.src_node_id - 201] = vector[: res[0].size]
    assert sorted(masked) == list(range(n))
    for i, words in masked.items():
        plain = res[i].reshape(-1)
        # Masked: uniform 32-bit words. Not one equals its residue (chance 24 * 2**-32)...
        assert not np.any(words.astype(np.uint64) == plain)
        if bits < 32:  # ... and they are no residues at all: most exceed the modulus
            assert np.count_nonzero(words >= (1 << bits)) > len(words) // 2
    # What the server sent never held a residue (only the model, keys and shares).
    for msg in grid.sent:
        assert msg.content is not None
        arrays = msg.content.get("arrays")
        assert arrays is None or list(arrays) == ["w"]  # type: ignore[arg-type]
    # The one thing released: the sum, modulo 2**bits.
    got = ask.results[0].aggregate["r"].numpy()
    np.testing.assert_array_equal(got, modular_sum(res, bits, range(n)))


@pytest.mark.parametrize(
    "change",
    [{"modulus-bits": 8}, {"binding": b"\x02" * 32}, {"binding": b""}],
    ids=["modulus", "binding", "no binding"],
)
def test_a_server_that_tells_one_node_another_domain_is_caught_in_malicious_mode(
    federation: Any, change: dict[str, Any]
) -> None:
    """The advertisement signs the configuration's digest, domain included: a neighbour told
    another modulus, or another binding (the digest of another noising encoding), signed
    another configuration, and the node refuses its keys."""
    for threat in (Threat.SEMI_HONEST, Threat.MALICIOUS):
        fed = federation(threat=threat)
        domain = QuantizedDomain(16, ("r",), binding=b"\x01" * 32)
        fed.config = dataclasses.replace(fed.config, quantized=domain)
        node = fed.ids[0]
        other = fed.graph.neighbours(node)[0]
        fed.advertise([i for i in fed.ids if i != other])
        changed = {**fed.advertise_message_fields(), **change}
        body = fed.ok(fed.ask(other, Stage.ADVERTISE_KEYS, changed))[RECORD]
        fed.pks[other] = (body["c-pk"], body["s-pk"])
        if fed.malicious:
            fed.key_signatures[other] = body["signature"]
        reply = fed.ask(node, Stage.SHARE_KEYS, fed.share_fields(node))
        if fed.malicious:
            refused(reply, f"the key advertisement of node {other}")
        else:
            fed.ok(reply)  # negative control: semi-honest nodes trust the server's config


def test_the_configuration_carries_the_domain_and_its_digest_binds_it() -> None:
    base = RoundConfig(
        session=bytes(16),
        order=(3, 1, 2, 4, 5),
        degree=4,
        threshold=3,
        clipping_range=8.0,
        max_weight=10,
        weight_key=None,
        secure_metrics=(),
        threat=Threat.MALICIOUS,
    )
    domains = [
        QuantizedDomain(16, ("r",)),
        QuantizedDomain(17, ("r",)),
        QuantizedDomain(16, ("s",)),
        QuantizedDomain(16, ("r", "s")),
        QuantizedDomain(16, ("s", "r")),
        QuantizedDomain(16, ("r",), binding=b"\x01" * 32),
        QuantizedDomain(16, ("r",), binding=b"\x02" * 32),
        QuantizedDomain(16, ("r",), binding=b"\x01" * 31),
    ]
    configs = [base] + [dataclasses.replace(base, quantized=d) for d in domains]
    assert len({c.digest for c in configs}) == len(configs)
    for config in configs:
        record = config.to_record()
        assert record["version"] == PROTOCOL_VERSION == 4
        back = RoundConfig.from_record(record)
        assert back == config and back.digest == config.digest
    record = base.to_record()
    for edit, match in [
        ({"modulus-bits": 1}, "modulus_bits"),
        ({"modulus-bits": 33}, "modulus_bits"),
        ({"modulus-bits": 8, "modular-names": []}, "names"),
        ({"modulus-bits": 8, "modular-names": ["r", "r"]}, "names"),
        ({"modulus-bits": 0, "modular-names": ["r"]}, "without modulus-bits"),
        ({"modulus-bits": 0, "binding": b"\x01" * 32}, "without modulus-bits"),
        ({"modulus-bits": 8, "modular-names": ["r"], "binding": b"\x01" * 65}, "binding"),
    ]:
        with pytest.raises(ProtocolViolationError, match=match):
            RoundConfig.from_record(ConfigRecord({**record, **edit}))


# -- what a node refuses -----------------------------------------------------------------------
SECRET = 987_654  # a value no reason may show


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (lambda a: {"r": a["r"] + np.uint64((1 << 20) + SECRET)}, "outside [0, 2**20)"),
        (lambda a: {"r": np.full(SHAPE, SECRET + 0.125)}, "unsigned integers"),
        (lambda a: {"r": np.full(SHAPE, -SECRET, np.int64)}, "unsigned integers"),
        (lambda a: {"r": np.ones(SHAPE, bool)}, "unsigned integers"),
        (lambda a: {"s": a["r"]}, "lacks the arrays ['r']"),
    ],
    ids=["too-large", "float", "signed", "bool", "missing"],
)
def test_a_node_refuses_what_is_no_residue_and_never_shows_it(
    edit: Callable[[dict[str, Any]], dict[str, Any]], reason: str
) -> None:
    bits, n = 20, 6
    res = residues(n, bits, seed=6)
    res[0, 0, 0] = SECRET  # the refused node's residues hold the secret value too
    app = client(res, edit=lambda i, a: edit(a) if i == 0 else a)
    result, outcome = run_round(app, n, bits, secagg=protocol.secagg(degree=4, threshold=3))
    (bad,) = [node for node in outcome.failures if result.node_index(node) == 0]
    failure = outcome.failures[bad]
    assert failure.stage == Stage.COLLECT_MASKED_INPUT
    assert failure.kind is FailureKind.ERROR_REPLY
    assert failure.error.code == ErrorCode.INVALID_REPLY
    assert reason in failure.error.reason and "'r'" in failure.error.reason
    for shown in (str(SECRET), str(SECRET + (1 << 20)), f"{SECRET}.125", "987"):
        assert shown not in failure.error.reason
    # The others' sum is exact without it.
    others = [result.node_index(p) for p in outcome.participants]
    assert sorted(others) == [1, 2, 3, 4, 5]
    np.testing.assert_array_equal(outcome.aggregate["r"].numpy(), modular_sum(res, bits, others))


def _tamper_kinds(kinds: Callable[[list[str]], list[str]]) -> Any:
    """A client mod outside SecAgg+'s: rewrites the first node's reported layout kinds."""

    def tamper(msg: Message, context: Context, call_next: Any) -> Message:
        reply: Message = call_next(msg, context)
        first = context.node_config["partition-id"] == 0
        if msg.metadata.stage != Stage.COLLECT_MASKED_INPUT or not first or reply.has_error:
            return reply
        content = reply.require_content()
        body = ConfigRecord(content[RECORD])  # type: ignore[arg-type]
        body["kinds"] = kinds(list(body["kinds"]))  # type: ignore[arg-type]
        content[RECORD] = body
        return reply

    return tamper


def test_the_server_releases_residues_only_for_the_domains_names() -> None:
    """A node that reports residues the domain does not name (or not those it names) fails."""
    bits, n = 16, 6
    res = residues(n, bits, seed=7)
    updates = protocol.make_data(n)[0][:, :PARAMS]
    # A quantized round: the first node says its float array is a residue array too.
    tamper = _tamper_kinds(lambda k: [MODULAR] * len(k))
    app = client(res, updates=updates, mods=[tamper, SecAggPlusClientMod()])
    result, outcome = run_round(app, n, bits, secagg=protocol.secagg(degree=4, threshold=3))
    (bad,) = [node for node in outcome.failures if result.node_index(node) == 0]
    assert outcome.failures[bad].kind is FailureKind.INVALID_REPLY
    assert "quantized domain" in outcome.failures[bad].error.reason
    others = sorted(result.node_index(p) for p in outcome.participants)
    np.testing.assert_array_equal(outcome.aggregate["r"].numpy(), modular_sum(res, bits, others))


def test_without_a_domain_no_node_can_have_its_words_released_as_residues() -> None:
    updates, weights = protocol.make_data(6)
    tamper = _tamper_kinds(lambda k: [MODULAR for _ in k])
    app = protocol.make_app(updates, weights, mods=[tamper, SecAggPlusClientMod()])
    result, capture = protocol.run(app, 6, secagg=protocol.secagg(degree=4, threshold=3))
    outcome = capture.results[0]
    (bad,) = [node for node in outcome.failures if result.node_index(node) == 0]
    assert outcome.failures[bad].kind is FailureKind.INVALID_REPLY
    assert "quantized domain" in outcome.failures[bad].error.reason
    assert outcome.aggregate["w"].numpy().dtype == np.float64


# -- what the mods inside SecAgg+'s see ----------------------------------------------------
class Spy:
    """A client mod inside SecAgg+'s: keeps the domain its train messages said."""

    def __init__(self) -> None:
        self.seen: list[tuple[int | None, QuantizedDomain | None]] = []
        self.bindings: list[object] = []  # the raw binding key, forged or not

    def __call__(self, msg: Message, context: Context, call_next: Any) -> Message:
        config = msg.require_content().get_typed("config", ConfigRecord)
        self.seen.append((modulus_bits_of(config), domain_of(config)))
        self.bindings.append(config.get(BINDING_KEY))
        return call_next(msg, context)  # type: ignore[no-any-return]


def test_the_inner_mods_learn_the_modulus_from_secagg_and_only_from_it() -> None:
    bits, n = 24, 6
    res = residues(n, bits)
    spy = Spy()
    run_round(
        client(res, mods=[SecAggPlusClientMod(), spy]),
        n,
        bits,
        secagg=protocol.secagg(degree=4, threshold=3),
    )
    assert spy.seen == [(bits, QuantizedDomain(bits, ("r",)))] * n
    assert spy.bindings == [None] * n

    # The domain's binding reaches them beside the modulus, from the signed configuration.
    spy = Spy()
    run_round(
        client(res, mods=[SecAggPlusClientMod(), spy]),
        n,
        bits,
        secagg=protocol.secagg(degree=4, threshold=3),
        binding=b"\x05" * 32,
    )
    assert spy.seen == [(bits, QuantizedDomain(bits, ("r",), binding=b"\x05" * 32))] * n

    # A server that writes the keys into a round without a domain: the inner mods never see them.
    forged = {MODULUS_BITS_KEY: 16, NAMES_KEY: ["w"], BINDING_KEY: b"\x07" * 32}
    spy = Spy()
    updates, weights = protocol.make_data(6)
    app = protocol.make_app(updates, weights, mods=[SecAggPlusClientMod(), spy])
    server_app = ServerApp(
        strategy=FedAvg(train_config=forged),
        num_rounds=1,
        initial_arrays=ArrayRecord({"w": np.zeros(protocol.PARAMS, np.float32)}),
        mods=[protocol.secagg(degree=4, threshold=3)],
    )
    assert run_simulation(server_app, app, 6, seed=0, max_workers=2).history[0].ok
    assert spy.seen == [(None, None)] * 6 and spy.bindings == [None] * 6


def test_messages_let_through_lose_a_forged_domain() -> None:
    spy = Spy()
    with pytest.warns(UserWarning, match="in the clear"):
        mod = SecAggPlusClientMod(refuse_plaintext=False)
    app = ClientApp(mods=[mod, spy])

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> RecordDict:
        return RecordDict({"metrics": MetricRecord({"num-examples": 1})})

    @app.train()
    def train(msg: Message, context: Context) -> RecordDict:
        return RecordDict({"metrics": MetricRecord({"num-examples": 1})})

    for kind in (MessageType.EVALUATE, MessageType.TRAIN):
        config = ConfigRecord(
            {MODULUS_BITS_KEY: 16, NAMES_KEY: ["w"], BINDING_KEY: b"\x07" * 32, "lr": 0.5}
        )
        msg = Message.create(
            RecordDict({"config": config}), message_type=kind, dst_node_id=5, round=1, run_id=1
        )
        assert app(msg, Context(node_id=5, run_id=1)).error is None
    assert spy.seen == [(None, None), (None, None)] and spy.bindings == [None, None]
