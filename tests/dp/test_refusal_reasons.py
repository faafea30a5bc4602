"""No DP refusal carries a private value (issue 9, item 2).

Error replies travel in the clear. Every refusal path of the DP mods is driven
here with sentinel values in what they protect (a weight, a metric, an update's
values, its norm, a dataset size, the node's privacy state), and no reason may
contain any sentinel in a common rendering: ``repr``, ``%g``, ``.4g`` and friends,
the float32 repr, or the integer part.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from flowerpets.core import (
    ArrayRecord,
    ClientApp,
    ConfigRecord,
    Context,
    Error,
    FedAvg,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
    ServerApp,
)
from flowerpets.dp import (
    AdaptiveClipping,
    CentralDp,
    LocalDpMod,
    adaptive_clipping_mod,
    fixed_clipping_mod,
)
from flowerpets.dp._primitives.clip import global_norm
from flowerpets.exceptions import InsecureRandomnessWarning
from tests.sentinels import leaks as find_leaks

pytestmark = pytest.mark.filterwarnings("ignore::flowerpets.exceptions.InsecureRandomnessWarning")

WEIGHT = 123456.789  # a weight metric (num-examples)
LOSS = 31415.9265  # another metric
VALUE = 98765.4321  # a value of the update
OTHER = -24680.1357  # another value of the update
UPDATE = {"w": np.array([VALUE, OTHER, 7777.25]), "b": np.array([-5432.125])}
NORM = global_norm(UPDATE)  # the update's norm: private too
SENTINELS = (WEIGHT, LOSS, VALUE, OTHER, 7777.25, -5432.125, NORM)


def leaks(reason: str, sentinels: tuple[float, ...] = SENTINELS) -> list[str]:
    return find_leaks(reason, sentinels)


def test_the_leak_check_finds_the_formats_that_were_sent() -> None:
    # The check itself must be able to fail (what the mods used to send).
    assert leaks(f"the weight metric 'num-examples' = {int(WEIGHT)} is outside [0, 1]")
    assert leaks(f"got values in [{OTHER:.4g}, {VALUE:.4g}]")
    assert leaks(f"got {WEIGHT!r}")
    assert leaks(f"largest {NORM:.4g}")
    assert not leaks("the update's L2 norm exceeds the clip the server sent ('dp.clip')")


# -- the client mods ------------------------------------------------------------------------------
MODEL = {"w": np.array([0.5, -1.0, 2.0]), "b": np.array([0.25])}

Reply = Callable[[dict[str, Any]], RecordDict]  # received arrays -> handler's reply


def plain(received: dict[str, Any]) -> RecordDict:
    """The private reply: received + UPDATE, weight WEIGHT, loss LOSS."""
    new = {n: received[n] + UPDATE[n] for n in received}
    metrics = MetricRecord({"num-examples": WEIGHT, "train-loss": LOSS})
    return RecordDict({"arrays": ArrayRecord(new), "metrics": metrics})


def with_arrays(arrays: dict[str, Any]) -> Reply:
    def reply(received: dict[str, Any]) -> RecordDict:
        metrics = MetricRecord({"num-examples": WEIGHT, "train-loss": LOSS})
        return RecordDict({"arrays": ArrayRecord(arrays), "metrics": metrics})

    return reply


BAD_REPLIES: dict[str, Reply] = {
    "nan": with_arrays({"w": np.array([VALUE, np.nan, OTHER]), "b": np.array([VALUE])}),
    "inf": with_arrays({"w": np.array([VALUE, np.inf, OTHER]), "b": np.array([VALUE])}),
    "overflow": with_arrays({"w": np.array([1e308, 1e308, VALUE]), "b": np.array([OTHER])}),
    "shape": with_arrays({"w": np.array([VALUE, OTHER]), "b": np.array([VALUE])}),
    "names": with_arrays({"w": np.array([VALUE, OTHER, 1.0]), "x": np.array([VALUE])}),
    "complex": with_arrays({"w": np.array([VALUE + 1j, OTHER, 1.0]), "b": np.array([OTHER])}),
    "no arrays": lambda received: RecordDict(
        {"metrics": MetricRecord({"num-examples": WEIGHT, "train-loss": LOSS})}
    ),
    "arrays of the wrong kind": lambda received: RecordDict(
        {"arrays": MetricRecord({"w": VALUE, "num-examples": WEIGHT})}
    ),
}


def request(config: dict[str, Any], *, indicator: bool = False) -> Message:
    arrays = ArrayRecord(MODEL)
    if indicator:
        arrays["dp.unclipped"] = np.zeros(1)
    return Message.create(
        RecordDict({"arrays": arrays, "config": ConfigRecord(config)}),
        message_type=MessageType.TRAIN,
        dst_node_id=1,
        round=1,
    )


def app_with(mod: Any, reply: Reply) -> ClientApp:
    app = ClientApp(mods=[mod])

    @app.train()
    def train(msg: Message, context: Context) -> RecordDict:
        received = msg.require_content().get_typed("arrays", ArrayRecord)
        return reply({n: np.asarray(a.numpy()) for n, a in received.items()})

    return app


def error_of(reply: Message) -> Error | None:
    return reply.error  # the test checks that the path refused


def local_dp(**kwargs: Any) -> LocalDpMod:
    settings = {"clipping_norm": 1.0, "epsilon": 2.0, "delta": 1e-5, **kwargs}
    with warnings.catch_warnings():  # the paths are built at collection, outside pytestmark
        warnings.simplefilter("ignore", InsecureRandomnessWarning)
        return LocalDpMod(rng=np.random.default_rng(0), **settings)


def client_refusals() -> Iterator[tuple[str, Error | None]]:
    """Every refusal a DP client mod can send, with private sentinels in play."""
    clipping = {"fixed": fixed_clipping_mod, "adaptive": adaptive_clipping_mod}
    for kind, mod in clipping.items():
        adaptive = kind == "adaptive"
        good = {"dp.clip": 1.0}
        for name, reply in BAD_REPLIES.items():
            app = app_with(mod, reply)
            yield f"{kind}: {name}", error_of(app(request(good, indicator=adaptive), Context(1)))
        app = app_with(mod, plain)

        def sent(
            config: dict[str, Any], indicator: bool = adaptive, app: Any = app
        ) -> Error | None:
            return error_of(app(request(config, indicator=indicator), Context(1)))

        for config in ({}, {"dp.clip": -VALUE}, {"dp.clip": "x"}, {**good, "dp.reply-model": 2}):
            yield f"{kind}: {config}", sent(config)
        yield f"{kind}: wrong kind", sent(good, not adaptive)
        yield f"{kind}: tiny clip", sent({"dp.clip": 5e-324})  # below what float64 resolves
    for name, reply in BAD_REPLIES.items():
        yield f"local: {name}", error_of(app_with(local_dp(), reply)(request({}), Context(1)))
    # The budget: one round fits, the second does not.
    budgeted = app_with(local_dp(max_epsilon=2.5), plain)
    context = Context(1)
    assert budgeted(request({}), context).error is None
    yield "local: budget", error_of(budgeted(request({}), context))
    # Corrupt node state holding private-looking values.
    for state in (
        MetricRecord({"rounds": WEIGHT, "precision": VALUE}),
        MetricRecord({"rounds": 2, "precision": [VALUE, LOSS]}),
        ConfigRecord({"rounds": "x", "precision": VALUE}),
    ):
        context = Context(1)
        context.state["dp.local"] = state
        yield f"local: state {state!r}", error_of(app_with(local_dp(), plain)(request({}), context))


REFUSALS = list(client_refusals())


@pytest.mark.parametrize(("path", "error"), REFUSALS, ids=[path for path, _ in REFUSALS])
def test_no_client_refusal_carries_a_private_value(path: str, error: Error | None) -> None:
    assert error is not None, f"{path}: this path must refuse"
    assert error.reason, path
    assert not leaks(error.reason), f"{path}: {error.reason!r}"


def test_every_dp_client_mod_path_above_refuses() -> None:
    # The parametrization is not empty, and covers every mod.
    paths = [path for path, _ in REFUSALS]
    assert len(paths) > 30
    assert {p.split(":")[0] for p in paths} == {"fixed", "adaptive", "local"}


def test_corrupt_local_state_is_refused_not_forgotten() -> None:
    context = Context(1)
    context.state["dp.local"] = ConfigRecord({"rounds": 5})  # of the wrong record type
    reply = app_with(local_dp(max_epsilon=100.0), plain)(request({}), context)
    assert reply.error is not None and "corrupt" in reply.error.reason


# -- DP-SGD ---------------------------------------------------------------------------------------
def test_dpsgd_refusals_carry_neither_the_epsilon_nor_the_dataset_size() -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("opacus")
    from flowerpets.dp import DpSgd
    from flowerpets.exceptions import RequestRefusedError

    examples = 613  # private: the epsilon depends on it, through the sample rate
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((examples, 3)).astype(np.float32))
    data = torch.utils.data.TensorDataset(x, torch.from_numpy((rng.random(examples) > 0.5) * 1))
    dpsgd = DpSgd(
        noise_multiplier=0.8,
        max_grad_norm=1.0,
        delta=1e-5,
        batch_size=10,
        max_epsilon=0.5,
        rng=np.random.default_rng(1),
    )
    would_be = dpsgd.epsilon_of({(0.8, 1 / math.ceil(examples / 10)): math.ceil(examples / 10)})
    assert would_be > 0.5
    with pytest.raises(RequestRefusedError) as refused:
        dpsgd.train(torch.nn.Linear(3, 2), data, Context(1))
    assert not leaks(str(refused.value), (would_be, float(examples)))
    for state in (
        ConfigRecord({"noise-multipliers": [0.8], "sample-rates": [VALUE], "steps": [WEIGHT]}),
        MetricRecord({"steps": WEIGHT}),
    ):
        context = Context(1)
        context.state["dp.sgd"] = state
        with pytest.raises(RequestRefusedError, match="corrupt") as corrupt:
            dpsgd.train(torch.nn.Linear(3, 2), data, context)
        assert not leaks(str(corrupt.value))


# -- what the server records of a node it refused -----------------------------------------------
class ReplyingGrid:
    """Every node replies with ``reply`` to each train message (nodes 1..n)."""

    def __init__(self, app: ClientApp, n: int) -> None:
        self.app, self.contexts = app, {i: Context(i) for i in range(1, n + 1)}

    @property
    def run_id(self) -> int:
        return 0

    def node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> Iterator[Message]:
        for msg in messages:
            yield self.app(msg.with_private_content(), self.contexts[msg.metadata.dst_node_id])


def no_mod(msg: Message, context: Context, call_next: Callable[..., Message]) -> Message:
    return call_next(msg, context)


def forged_indicator(msg: Message, context: Context, call_next: Callable[..., Message]) -> Message:
    reply = adaptive_clipping_mod(msg, context, call_next)
    body = reply.require_content().copy()
    arrays = ArrayRecord(body.get_typed("arrays", ArrayRecord))
    arrays["dp.unclipped"] = np.array([VALUE])
    body["arrays"] = arrays
    return Message(metadata=reply.metadata, content=body)


@pytest.mark.parametrize(
    ("client_mod", "adaptive"),
    [(no_mod, None), (forged_indicator, AdaptiveClipping(count_stddev=5.0))],
)
def test_the_reasons_central_dp_records_for_refused_nodes_carry_no_value(
    client_mod: Any, adaptive: AdaptiveClipping | None
) -> None:
    dp = CentralDp(noise_multiplier=1.0, clipping_norm=1.0, adaptive=adaptive)
    server = ServerApp(
        strategy=FedAvg(), num_rounds=1, initial_arrays=ArrayRecord(MODEL), mods=[dp]
    )
    record = server.run(ReplyingGrid(app_with(client_mod, plain), 3)).history.round(1)
    assert len(record.failures) == 3
    for failure in record.failures.values():
        assert not leaks(failure.error.reason), failure.error.reason
