"""No reason a SecAgg+ node sends carries a private value.

Error replies travel in the clear. A dishonest server chooses the weight key
(it may name ``"loss"``), ``max_weight`` (it may send 1) and what it asks for,
so every refusal or invalid-reply reason the client mod can send on the path
from the handler's reply to the masked vector is fed sentinel values (a weight,
update values, metrics) and searched for them in every usual format.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from flowerpets.core import (
    ArrayRecord,
    ClientApp,
    Context,
    ErrorCode,
    Message,
    MetricRecord,
    RecordDict,
)
from flowerpets.secagg import Stage
from flowerpets.secagg._primitives.quantize import SUM_BOUND
from tests.sentinels import assert_no_secret

WEIGHT = 123456.789  # a private weight that is not a whole number
WHOLE_WEIGHT = 98765  # a private whole weight above any max_weight the tests use
VALUE = 98765.4321  # a private update value or metric
BIG_INT = 987654321  # a private integer update value, beyond what one node may send
SMALL_WEIGHT = 4321  # a private weight within max_weight (the integer path's limit is from it)


Handler = Callable[[Message, Context], RecordDict]


def reply_of(fed: Any, handler: Handler, *, mods: tuple[Any, ...] = ()) -> Message:
    """Run the honest stages, then ask the first node to mask what ``handler`` returns."""
    fed.app = ClientApp(mods=[fed.mod, *mods])
    fed.app.train()(handler)
    fed.advertise()
    fed.share()
    node = fed.ids[0]
    return fed.ask(
        node, Stage.COLLECT_MASKED_INPUT, fed.collect_fields(node), extra=fed.train_content()
    )


def returning(arrays: dict[str, np.ndarray], metrics: dict[str, Any]) -> Handler:
    def handler(msg: Message, context: Context) -> RecordDict:
        return RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord(metrics)})

    return handler


FLOATS = {"w": np.full(64, 0.25, np.float32)}

# (federation options, handler, what the reason says, the private values it must not say)
CASES: dict[str, tuple[dict[str, Any], Handler, str, tuple[float, ...]]] = {
    "weight not whole": (
        {},
        returning(FLOATS, {"num-examples": WEIGHT}),
        "whole number",
        (WEIGHT,),
    ),
    "weight above max_weight": (
        {"max_weight": 100},
        returning(FLOATS, {"num-examples": WHOLE_WEIGHT}),
        "outside [0, max_weight=100]",
        (WHOLE_WEIGHT,),
    ),
    "weight below zero": (
        {},
        returning(FLOATS, {"num-examples": -WHOLE_WEIGHT}),
        "outside",
        (WHOLE_WEIGHT, -WHOLE_WEIGHT),
    ),
    "a server names the loss as the weight": (
        {"weight_key": "loss"},
        returning(FLOATS, {"num-examples": 3, "loss": VALUE}),
        "whole number",
        (VALUE,),
    ),
    "a server sends max_weight=1": (
        {"max_weight": 1},
        returning(FLOATS, {"num-examples": SMALL_WEIGHT}),
        "outside",
        (SMALL_WEIGHT,),
    ),
    "integer values too large": (
        {"max_weight": 10_000},
        returning(
            {"h": np.array([BIG_INT, -BIG_INT // 3, 5], np.int64)},
            {"num-examples": SMALL_WEIGHT},
        ),
        "could wrap",
        # the values, the weight, and the limit that the weight gives away
        (BIG_INT, -(BIG_INT // 3), SMALL_WEIGHT, (SUM_BOUND // 8) // SMALL_WEIGHT),
    ),
    "a secure metric that is a list": (
        {"secure_metrics": ("loss",)},
        returning(FLOATS, {"num-examples": 3, "loss": [VALUE, VALUE]}),
        "must be a number",
        (VALUE,),
    ),
    "NaN in the update": (
        {"max_weight": 10_000},
        returning({"w": np.array([VALUE, np.nan], np.float64)}, {"num-examples": SMALL_WEIGHT}),
        "NaN",
        (VALUE, SMALL_WEIGHT),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_invalid_updates_are_reported_without_their_values(federation: Any, case: str) -> None:
    options, handler, says, secrets = CASES[case]
    reply = reply_of(federation(**options), handler)
    assert reply.error is not None and reply.content is None
    assert reply.error.code == ErrorCode.INVALID_REPLY
    assert says in reply.error.reason, reply.error.reason
    assert_no_secret(reply.error.reason, *secrets)


def test_what_the_handler_raises_leaves_only_its_type(federation: Any) -> None:
    def handler(msg: Message, context: Context) -> RecordDict:
        raise ValueError(f"loss {VALUE} diverged at weight {WEIGHT:g}")

    reply = reply_of(federation(), handler)
    assert reply.error is not None and reply.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert reply.error.reason.startswith("ValueError")
    assert_no_secret(reply.error.reason, VALUE, WEIGHT)


@pytest.mark.parametrize("error", [ValueError, KeyError, TypeError, ArithmeticError])
def test_what_a_later_mod_raises_is_not_turned_into_a_refusal(
    federation: Any, error: type[Exception]
) -> None:
    # Before: a ValueError or KeyError of a mod after SecAgg+ became a REFUSED reply whose
    # reason was that mod's message (here, a private norm).
    def noisy(msg: Message, context: Context, call_next: Any) -> Message:
        raise error(f"update norm {VALUE} exceeds the clip")

    reply = reply_of(federation(), returning(FLOATS, {"num-examples": 3}), mods=(noisy,))
    assert reply.error is not None and reply.error.code == ErrorCode.MOD_RAISED_EXCEPTION
    assert reply.error.reason.startswith(error.__name__)
    assert_no_secret(reply.error.reason, VALUE)


def test_a_valid_update_is_masked_and_the_round_goes_on(federation: Any) -> None:
    # The control: the same path with honest values gives a masked vector, not an error.
    reply = reply_of(federation(), returning(FLOATS, {"num-examples": 3}))
    assert reply.error is None


def test_the_sentinel_search_finds_what_the_old_reasons_carried() -> None:
    # The old reasons, word for word: the search must flag every one of them.
    old = [
        f"the weight metric 'num-examples' must be a whole number under SecAgg+, got {WEIGHT!r}",
        f"the weight metric 'num-examples' = {WHOLE_WEIGHT} is outside [0, max_weight=100]",
        f"integer values must stay within +-{(SUM_BOUND // 8) // SMALL_WEIGHT} at weight "
        f"{SMALL_WEIGHT} so that the cohort's sum cannot wrap, got values in [-5, {BIG_INT}]",
    ]
    for reason, secret in zip(old, (WEIGHT, WHOLE_WEIGHT, SMALL_WEIGHT), strict=True):
        with pytest.raises(AssertionError, match="carries"):
            assert_no_secret(reason, secret)
