"""No error reply the core builds on a node carries a private value.

Error replies travel in the clear. The core turns whatever a handler or a mod
raises into one, so every such path is fed sentinel values (a loss, a weight)
and the reason searched for them in every usual format: a reason says what
went wrong (the exception's type, or one of our own vetted messages), never
the value.
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
from flowerpets.simulation import SimulationGrid
from tests.sentinels import assert_no_secret

LOSS = 98765.4321
WEIGHT = 123456.789


def request() -> Message:
    return Message.create(
        RecordDict({"arrays": ArrayRecord({"w": np.zeros(3, np.float32)})}),
        message_type="train",
        dst_node_id=7,
        round=1,
    )


def app_with(handler: Callable[[Message, Context], Any], mods: tuple[Any, ...] = ()) -> ClientApp:
    app = ClientApp(mods=list(mods))
    app.train()(handler)
    return app


def raising(error: Exception) -> Callable[[Message, Context], Any]:
    def handler(msg: Message, context: Context) -> Any:
        raise error

    return handler


SENTINEL_ERRORS = [
    ValueError(f"loss {LOSS} diverged at weight {WEIGHT}"),
    KeyError(f"{LOSS!r}"),
    ZeroDivisionError(f"{LOSS:.4g}"),
    RuntimeError(f"{WEIGHT:g} examples"),
    FloatingPointError(f"overflow at {int(LOSS)}"),
]


@pytest.mark.parametrize("error", SENTINEL_ERRORS, ids=lambda e: type(e).__name__)
def test_a_handlers_exception_leaves_only_its_type(error: Exception) -> None:
    reply = app_with(raising(error))(request(), Context(node_id=7))
    assert reply.error is not None and reply.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert reply.error.reason.startswith(type(error).__name__)
    assert_no_secret(reply.error.reason, LOSS, WEIGHT)


@pytest.mark.parametrize("error", SENTINEL_ERRORS, ids=lambda e: type(e).__name__)
def test_a_mods_exception_leaves_only_its_type(error: Exception) -> None:
    def mod(msg: Message, context: Context, call_next: Any) -> Message:
        raise error

    ok = app_with(lambda msg, context: RecordDict(), (mod,))
    reply = ok(request(), Context(node_id=7))
    assert reply.error is not None and reply.error.code == ErrorCode.MOD_RAISED_EXCEPTION
    assert reply.error.reason.startswith(type(error).__name__)
    assert_no_secret(reply.error.reason, LOSS, WEIGHT)


@pytest.mark.parametrize(
    "metrics",
    [
        {"loss": f"{LOSS}"},  # a str metric
        {"loss": [LOSS, int(WEIGHT), "x"]},  # a list of mixed types
        {"loss": [LOSS, int(WEIGHT)]},  # int and float mixed
        {"loss": {"value": LOSS}},
    ],
    ids=["str", "mixed-list", "int-and-float", "dict"],
)
def test_a_bad_metric_record_is_refused_without_its_values(metrics: dict[str, Any]) -> None:
    # A handler that builds its reply wrongly: the record's own error names key and types.
    def handler(msg: Message, context: Context) -> RecordDict:
        return RecordDict({"metrics": MetricRecord(metrics)})

    reply = app_with(handler)(request(), Context(node_id=7))
    assert reply.error is not None and reply.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert reply.error.reason.startswith("RecordTypeError") and "'loss'" in reply.error.reason
    assert_no_secret(reply.error.reason, LOSS, WEIGHT)


def test_our_own_errors_keep_their_vetted_reasons() -> None:
    from flowerpets.exceptions import InvalidUpdateError

    reply = app_with(raising(InvalidUpdateError("the update holds NaN or infinite values")))(
        request(), Context(node_id=7)
    )
    assert reply.error is not None
    assert reply.error.reason == "InvalidUpdateError: the update holds NaN or infinite values"


def test_a_runtime_reports_a_crashed_node_without_the_message() -> None:
    # The simulation's last resort, when the app itself raises (a runtime bug).
    def app(msg: Message, context: Context) -> Message:
        raise RuntimeError(f"loss {LOSS}")

    with SimulationGrid(app, [Context(node_id=7)], max_workers=1) as grid:  # type: ignore[arg-type]
        (reply,) = list(grid.send_and_receive([request()], timeout=5))
    assert reply.error is not None and reply.error.code == ErrorCode.NODE_UNAVAILABLE
    assert reply.error.reason.startswith("RuntimeError")
    assert_no_secret(reply.error.reason, LOSS)


def test_the_sentinel_search_finds_what_the_old_reasons_carried() -> None:
    for error in SENTINEL_ERRORS:
        with pytest.raises(AssertionError, match="carries"):
            assert_no_secret(f"{type(error).__name__}: {error}", LOSS, WEIGHT)
