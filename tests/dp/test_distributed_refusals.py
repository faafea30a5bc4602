"""DistributedDp and DistributedDpMod refuse what they cannot protect, and say so without values.

Without SecAgg+ the server refuses to run and the node refuses to reply (a node's
noised update alone would reach the server); the node's refusals name what was
wrong, never a value of the update it protects (error replies travel in the clear).
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from typing import Any

import numpy as np
import pytest

from flowerpets.core import (
    BINDING_KEY,
    MODULUS_BITS_KEY,
    NAMES_KEY,
    ArrayRecord,
    ClientApp,
    ConfigRecord,
    Context,
    ErrorCode,
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
    fewest_inputs_of,
)
from flowerpets.dp import AdaptiveClipping, DistributedDp, DistributedDpMod, Mechanism
from flowerpets.dp._primitives.clip import global_norm
from flowerpets.dp._protocol import CLIPPED, ENCODING_KEY, RESIDUES
from flowerpets.dp.distributed._round_config import RoundEncoding
from flowerpets.exceptions import (
    IncompatibleModsError,
    InfeasibleParametersError,
    ModelMismatchError,
    ParameterTypeError,
    ParameterValueError,
    RequestRefusedError,
)
from flowerpets.secagg import SecAggPlus
from flowerpets.simulation import run_simulation
from tests.dp.distributed_kit import NODES, federate
from tests.sentinels import leaks

VALUE, OTHER, THIRD = 98765.4321, -24680.1357, 7777.25
UPDATE = np.array([VALUE, OTHER, THIRD, -5432.125])
SENTINELS = (VALUE, OTHER, THIRD, -5432.125, global_norm({"w": UPDATE}))
MODEL = np.array([0.5, -1.0, 2.0, 0.25])


def encoding(**changes: Any) -> RoundEncoding:
    settings: dict[str, Any] = {
        "seed": secrets.token_bytes(32),
        "scale": 1000.0,
        "clip": 1.0,
        "dimension": MODEL.size,
        "modulus_bits": 32,
        "beta": math.exp(-0.5),
        "mechanism": Mechanism.SKELLAM,
        "share": 100.0,
    }
    settings.update(changes)
    return RoundEncoding(**settings)


def request(config: dict[str, Any], arrays: dict[str, Any] | None = None) -> Message:
    return Message.create(
        RecordDict(
            {
                "arrays": ArrayRecord(arrays if arrays is not None else {"w": MODEL}),
                "config": ConfigRecord(config),
            }
        ),
        message_type=MessageType.TRAIN,
        dst_node_id=1,
        round=1,
    )


def inside_secagg(e: RoundEncoding | None = None) -> dict[str, Any]:
    """The config the SecAgg+ client mod passes inward, with the round's encoding and the
    domain's binding of it."""
    e = e or encoding()
    return {
        ENCODING_KEY: e.to_json(),
        MODULUS_BITS_KEY: 32,
        NAMES_KEY: [RESIDUES, CLIPPED] if e.adaptive else [RESIDUES],
        BINDING_KEY: e.binding(),
    }


def app(reply: Any = None, mod: DistributedDpMod | None = None) -> ClientApp:
    client = ClientApp(mods=[mod or DistributedDpMod()])

    @client.train()
    def train(msg: Message, context: Context) -> RecordDict:
        if reply is not None:
            return RecordDict({"arrays": ArrayRecord(reply), "metrics": MetricRecord()})
        received = msg.require_content().get_typed("arrays", ArrayRecord)
        new = {n: np.asarray(a.numpy()) + UPDATE for n, a in received.items()}
        return RecordDict({"arrays": ArrayRecord(new), "metrics": MetricRecord()})

    return client


REFUSED_CONFIGS = {
    "no secure aggregation outside": {ENCODING_KEY: encoding().to_json()},
    "no encoding": {MODULUS_BITS_KEY: 32, NAMES_KEY: [RESIDUES]},
    "no binding": {k: v for k, v in inside_secagg().items() if k != BINDING_KEY},
    "malformed encoding": {**inside_secagg(), ENCODING_KEY: '{"seed": 1}'},
    "not json": {**inside_secagg(), ENCODING_KEY: "{"},
    "other modulus": {**inside_secagg(), MODULUS_BITS_KEY: 16},
    "other names": {**inside_secagg(), NAMES_KEY: ["x"]},
    "adaptive without the count": {
        **inside_secagg(),
        ENCODING_KEY: encoding(count_share=4.0).to_json(),
    },
    "other dimension": inside_secagg(encoding(dimension=5)),
}
BAD_REPLIES = {
    "nan": {"w": np.array([VALUE, np.nan, OTHER, THIRD])},
    "inf": {"w": np.array([VALUE, np.inf, OTHER, THIRD])},
    "shape": {"w": np.array([VALUE, OTHER])},
    "names": {"x": np.array([VALUE, OTHER, THIRD, 1.0])},
}


@pytest.mark.parametrize("config", list(REFUSED_CONFIGS.values()), ids=list(REFUSED_CONFIGS))
def test_the_node_refuses_a_request_it_cannot_protect(config: dict[str, Any]) -> None:
    reply = app()(request(config), Context(1))
    assert reply.error is not None and reply.error.code == ErrorCode.REFUSED
    assert not leaks(reply.error.reason, SENTINELS), reply.error.reason


@pytest.mark.parametrize("bad", list(BAD_REPLIES.values()), ids=list(BAD_REPLIES))
def test_a_bad_update_is_refused_without_its_values(bad: dict[str, Any]) -> None:
    reply = app(bad)(request(inside_secagg()), Context(1))
    assert reply.error is not None
    assert not leaks(reply.error.reason, SENTINELS), reply.error.reason


def test_without_the_domain_the_mod_raises_a_typed_refusal() -> None:
    mod = DistributedDpMod()
    with pytest.raises(RequestRefusedError, match="SecAgg"):
        mod(request({ENCODING_KEY: encoding().to_json()}), Context(1), lambda m, c: m)


@pytest.mark.parametrize(
    "other",
    [
        encoding(scale=1.0),  # a tiny scale: this node's share weighs little in the sum
        encoding(share=1e4),
        encoding(seed=bytes(32)),
        encoding(count_share=4.0),
    ],
    ids=["scale", "share", "seed", "adaptive"],
)
def test_a_node_sent_another_encoding_than_the_domain_binds_refuses(
    other: RoundEncoding,
) -> None:
    """A dishonest server binds the domain (signed by every node in malicious mode) to one
    encoding and sends this node another: the node refuses, naming no value."""
    bound = encoding()
    config = {**inside_secagg(other), BINDING_KEY: bound.binding()}
    assert app()(request(inside_secagg(bound)), Context(1)).error is None
    reply = app()(request(config), Context(1))
    assert reply.error is not None and reply.error.code == ErrorCode.REFUSED
    assert "binds" in reply.error.reason
    assert not leaks(reply.error.reason, SENTINELS), reply.error.reason
    assert bound.binding().hex() not in reply.error.reason
    with pytest.raises(RequestRefusedError, match="binds"):
        DistributedDpMod()(request(config), Context(1), lambda m, c: m)


class SplitEncoding:
    """What a dishonest server does to one node (partition 0): it sends that node an encoding
    with a thousandth of the scale, beside the domain SecAgg+ signed for everyone. Sits
    inside SecAgg+'s client mod, in front of DistributedDpMod (where the node's train
    message arrives with the server's encoding and the signed domain's binding)."""

    def __init__(self) -> None:
        self.mod = DistributedDpMod()
        self.refusals: list[str] = []

    def __call__(self, msg: Message, context: Context, call_next: Any) -> Message:
        if msg.message_type == MessageType.TRAIN and context.node_config["partition-id"] == 0:
            content = msg.require_content()
            config = ConfigRecord(content.get_typed("config", ConfigRecord))
            sent = RoundEncoding.from_json(str(config[ENCODING_KEY]))
            config[ENCODING_KEY] = dataclasses.replace(sent, scale=sent.scale / 1000).to_json()
            forged = RecordDict(dict(content.items()))
            forged["config"] = config
            msg = Message(metadata=msg.metadata, content=forged)
            try:
                return self.mod(msg, context, call_next)
            except RequestRefusedError as exc:
                self.refusals.append(str(exc))
                raise
        return self.mod(msg, context, call_next)


def test_a_node_sent_another_encoding_than_the_others_refuses_in_a_real_round() -> None:
    split = SplitEncoding()
    fed = federate(
        DistributedDp(noise_multiplier=1.0, clipping_norm=0.5), dimension=16, dp_mod=split
    )
    record = fed.result.history.round(1)
    assert record.ok, record.error
    assert len(split.refusals) == 1 and "binds" in split.refusals[0]
    assert fed.ids[0] not in record.participants  # its update never entered the sum
    assert len(record.participants) == NODES - 1
    assert (1, 0) not in fed.spies.residues and len(fed.spies.residues) == NODES - 1


def test_the_binding_is_the_digest_of_the_canonical_encoding() -> None:
    e = encoding(count_share=4.0)
    assert RoundEncoding.from_json(e.to_json()).binding() == e.binding()
    assert len(e.binding()) == 32
    assert e.binding() != encoding(seed=e.seed, count_share=4.0, share=e.share + 1).binding()


def test_the_node_replies_with_residues_only() -> None:
    reply = app()(request(inside_secagg()), Context(1))
    assert reply.error is None
    arrays = reply.require_content().get_typed("arrays", ArrayRecord)
    assert list(arrays) == [RESIDUES]
    residues = arrays[RESIDUES].numpy()
    assert residues.dtype == np.uint32 and residues.shape == (4,)
    domain = QuantizedDomain(modulus_bits=32, names=(RESIDUES,))
    domain.check_residues(RESIDUES, residues)
    adaptive = app()(request(inside_secagg(encoding(count_share=4.0))), Context(1))
    assert list(adaptive.require_content().get_typed("arrays", ArrayRecord)) == [
        RESIDUES,
        CLIPPED,
    ]


# The default encoding's share: sigma 10 against a rounded L2 bound just above 1000.
FLOOR = 0.005


@pytest.mark.parametrize(
    "forged",
    [
        encoding(share=0.0),  # no noise at all
        encoding(share=1.0),  # a tiny share
        encoding(scale=1e6),  # the same share against a sensitivity 1000 times larger
        encoding(clip=1e3),  # the same, through the clip
        encoding(count_share=1e-6),  # the clipped count left (almost) bare
    ],
    ids=["zero", "tiny", "scale", "clip", "count"],
)
def test_a_node_refuses_a_share_below_its_own_floor(forged: RoundEncoding) -> None:
    mod = DistributedDpMod(min_share_multiplier=FLOOR)
    assert app(mod=mod)(request(inside_secagg(encoding())), Context(1)).error is None
    reply = app(mod=mod)(request(inside_secagg(forged)), Context(1))
    assert reply.error is not None and reply.error.code == ErrorCode.REFUSED
    assert "min_share_multiplier" in reply.error.reason
    assert not leaks(reply.error.reason, SENTINELS), reply.error.reason
    # Without a floor the node trusts the server's calibration.
    assert app()(request(inside_secagg(forged)), Context(1)).error is None


def test_a_floor_above_the_calibrated_share_refuses_the_honest_round() -> None:
    mod = DistributedDpMod(min_share_multiplier=2 * FLOOR)
    reply = app(mod=mod)(request(inside_secagg(encoding())), Context(1))
    assert reply.error is not None and reply.error.code == ErrorCode.REFUSED


def test_other_messages_pass_through() -> None:
    msg = Message.create(RecordDict(), message_type=MessageType.EVALUATE, dst_node_id=1, round=1)
    assert DistributedDpMod()(msg, Context(1), lambda m, c: m) is msg


# -- the server -------------------------------------------------------------------------------
def round_request(arrays: dict[str, Any] | None = None) -> RoundRequest:
    return RoundRequest(
        round=1,
        cohort=(1, 2, 3),
        arrays=ArrayRecord(arrays if arrays is not None else {"w": MODEL}),
        config=ConfigRecord(),
        population=3,
    )


def never(request: RoundRequest, context: ServerContext) -> RoundResult:
    raise AssertionError("the round must be refused before the inner chain runs")


def test_the_server_refuses_without_secure_aggregation() -> None:
    dp = DistributedDp(noise_multiplier=1.0, clipping_norm=1.0)
    with pytest.raises(IncompatibleModsError, match="secure aggregator"):
        dp(round_request(), ServerContext(), never)


class SeenError(Exception):
    """Stops the round once the inner chain has seen its request."""

    def __init__(self, request: RoundRequest) -> None:
        super().__init__("seen")
        self.request = request


def test_the_server_binds_the_encoding_it_sends_into_the_domain() -> None:
    def look(request: RoundRequest, context: ServerContext) -> RoundResult:
        raise SeenError(request)

    dp = DistributedDp(noise_multiplier=1.0, clipping_norm=1.0)
    with pytest.raises(SeenError) as seen:
        dp(round_request(), secure(), look)
    inner = seen.value.request
    sent = RoundEncoding.from_json(str(inner.config[ENCODING_KEY]))
    assert inner.quantized is not None
    assert inner.quantized.binding == sent.binding()


def test_a_run_without_secagg_stops_at_its_first_round() -> None:
    server = ServerApp(
        strategy=FedAvg(),
        num_rounds=2,
        initial_arrays=ArrayRecord({"w": MODEL}),
        mods=[DistributedDp(noise_multiplier=1.0, clipping_norm=1.0)],
    )
    with pytest.raises(IncompatibleModsError):
        run_simulation(server, app(), 3, seed=0, max_workers=1)


def secure(fewest: int = 3) -> ServerContext:
    return ServerContext(secure_aggregation=True, fewest_inputs=lambda n: fewest)


@pytest.mark.parametrize(
    ("arrays", "error"),
    [
        ({"w": np.arange(4)}, ModelMismatchError),  # integers: not encoded
        ({"dp.residues": MODEL}, ModelMismatchError),  # a reserved name
    ],
)
def test_the_server_refuses_a_model_it_cannot_encode(
    arrays: dict[str, Any], error: type[Exception]
) -> None:
    dp = DistributedDp(noise_multiplier=1.0, clipping_norm=1.0)
    with pytest.raises(error):
        dp(round_request(arrays), secure(), never)


def test_colluders_beyond_the_fewest_inputs_leave_no_secret_share() -> None:
    dp = DistributedDp(noise_multiplier=1.0, clipping_norm=1.0, colluding=3)
    with pytest.raises(InfeasibleParametersError, match="colluding"):
        dp(round_request(), secure(3), never)


def test_a_modulus_too_small_for_the_noise_is_refused() -> None:
    dp = DistributedDp(noise_multiplier=50.0, clipping_norm=1.0, modulus_bits=8)
    with pytest.raises(InfeasibleParametersError, match="2\\*\\*8"):
        dp(round_request({"w": np.zeros(4096)}), secure(), never)


def test_a_discrete_gaussian_share_below_sigma_one_half_is_refused() -> None:
    dp = DistributedDp(
        noise_multiplier=0.8,
        clipping_norm=1.0,
        mechanism=Mechanism.DISCRETE_GAUSSIAN,
        # The count's total sigma 2 * 0.42 over 3 shares: each sigma^2 = 0.235 < 1/4.
        adaptive=AdaptiveClipping(count_stddev=0.42),
    )
    with pytest.raises(InfeasibleParametersError, match="sigma >= 1/2"):
        dp(round_request(), secure(), never)


def test_adaptive_clipping_that_leaves_the_update_no_noise_is_refused() -> None:
    dp = DistributedDp(
        noise_multiplier=2.0, clipping_norm=1.0, adaptive=AdaptiveClipping(count_stddev=0.5)
    )
    with pytest.raises(InfeasibleParametersError, match="sigma_b"):
        dp(round_request(), secure(), never)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({}, ParameterValueError),  # neither noise_multiplier nor target_epsilon
        ({"noise_multiplier": 1.0, "target_epsilon": 1.0}, ParameterValueError),
        ({"target_epsilon": 1.0}, ParameterValueError),  # no rounds
        ({"noise_multiplier": 1.0, "rounds": 3}, ParameterValueError),
        ({"noise_multiplier": -1.0}, ParameterValueError),
        ({"noise_multiplier": 1.0, "clipping_norm": 0.0}, ParameterValueError),
        ({"noise_multiplier": 1.0, "delta": 1.0}, ParameterValueError),
        ({"noise_multiplier": 1.0, "max_epsilon": 0.0}, ParameterValueError),
        ({"noise_multiplier": 1.0, "mechanism": "skellam"}, ParameterTypeError),
        ({"noise_multiplier": 1.0, "dropouts": "worst-case"}, ParameterTypeError),
        ({"noise_multiplier": 1.0, "modulus_bits": 33}, ParameterValueError),
        ({"noise_multiplier": 1.0, "modulus_bits": 1}, ParameterValueError),
        ({"noise_multiplier": 1.0, "colluding": -1}, ParameterValueError),
        ({"noise_multiplier": 1.0, "beta": 1.0}, ParameterValueError),
        ({"noise_multiplier": 1.0, "max_wrap": 0.0}, ParameterValueError),
        ({"noise_multiplier": 1.0, "adaptive": 0.5}, ParameterTypeError),
    ],
)
def test_settings_are_validated(kwargs: dict[str, Any], error: type[Exception]) -> None:
    settings = {"clipping_norm": 1.0, **kwargs}
    with pytest.raises(error):
        DistributedDp(**settings)


def test_no_noise_warns() -> None:
    with pytest.warns(UserWarning, match="not private"):
        DistributedDp(noise_multiplier=0.0, clipping_norm=1.0)


def test_the_secagg_server_promises_t_plus_one_inputs() -> None:
    secagg = SecAggPlus(degree=4, threshold=3)
    assert secagg.fewest_inputs(10) == 4
    # The context carries the innermost secure aggregator's promise, and no promise without one.
    dp = DistributedDp(noise_multiplier=1.0, clipping_norm=1.0)
    assert fewest_inputs_of([dp, SecAggPlus(degree=6, threshold=5), secagg]) == secagg.fewest_inputs
    assert fewest_inputs_of([dp]) is None
