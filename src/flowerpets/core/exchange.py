"""Sending a round's messages over a Grid and collecting what comes back.

:func:`collect` gives every addressed node exactly one outcome: its reply, or
a synthesized ``TIMEOUT`` error for a node that never answered. PET mods that
run their own stages use it too, so every stage sees dropouts the same way.

:func:`aggregate_round` is the innermost step of every server chain: it sends
the round's request to the cohort and folds the replies into a running
weighted sum as they arrive.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence

from flowerpets.core.aggregation import MetricMean, WeightedSum
from flowerpets.core.grid import Grid
from flowerpets.core.message import Error, ErrorCode, Message
from flowerpets.core.records import ArrayRecord, MetricRecord, RecordDict
from flowerpets.core.round import Failure, RoundRequest, RoundResult, ServerContext
from flowerpets.exceptions import InvalidUpdateError, RecordTypeError

__all__ = ["aggregate_round", "collect", "gather", "reply_weight", "request_messages"]

log = logging.getLogger(__name__)


def request_messages(
    grid: Grid,
    request: RoundRequest,
    content: RecordDict,
    *,
    nodes: Sequence[int] | None = None,
    stage: str = "",
) -> list[Message]:
    """One message per node (default: the cohort), all sharing ``content``.

    The content is shared, not copied: a runtime hands each node a private copy
    of the record mappings, and arrays are immutable.
    """
    return [
        Message.create(
            content,
            message_type=request.message_type,
            dst_node_id=node,
            round=request.round,
            run_id=grid.run_id,
            stage=stage,
        )
        for node in (request.cohort if nodes is None else nodes)
    ]


def collect(grid: Grid, messages: Sequence[Message], *, timeout: float | None) -> Iterator[Message]:
    """Send ``messages``; yield one reply per message, as replies arrive.

    A reply that does not answer one of ``messages`` (a stray, a replay, a
    second answer) is dropped with a warning. Nodes that did not answer get an
    error reply, yielded last: ``TIMEOUT`` if the wait ran out, else
    ``NODE_UNAVAILABLE`` (the runtime knew the node was gone).
    """
    started = time.monotonic()
    pending = {m.metadata.message_id: m for m in messages}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        request = pending.get(reply.metadata.reply_to_message_id)
        if request is None or not reply.is_reply_to(request):
            log.warning("dropping a reply that answers no pending request: %s", reply.metadata)
            continue
        del pending[request.metadata.message_id]
        yield reply
    if timeout is not None and time.monotonic() - started >= timeout:
        missing = Error(ErrorCode.TIMEOUT, f"no reply within {timeout} s")
    else:
        missing = Error(ErrorCode.NODE_UNAVAILABLE, "the node is gone (dropped out)")
    for request in pending.values():
        yield request.error_reply(missing)


def reply_weight(metrics: MetricRecord, key: str | None) -> float | int:
    """The weight a reply's ``metrics`` give its update (1 when ``key`` is None).

    Raises ``InvalidUpdateError`` if the metric is missing or not a number; a
    PET's own exchange uses it to weigh updates exactly as the core does.
    """
    if key is None:
        return 1
    if key not in metrics:
        raise InvalidUpdateError(f"reply lacks the weight metric {key!r}")
    value = metrics[key]
    if isinstance(value, list):
        raise InvalidUpdateError(f"weight metric {key!r} must be a number, got a list")
    return value


def gather(
    grid: Grid,
    messages: Sequence[Message],
    request: RoundRequest,
    accept: Callable[[Message], None],
) -> tuple[tuple[int, ...], dict[int, Failure]]:
    """Collect the replies to ``messages``, handing each answer to ``accept``.

    Returns the nodes whose reply was accepted, in arrival order, and a failure
    for every other node: its error reply or missing reply, or, when ``accept``
    raised ``InvalidUpdateError``, ``RecordTypeError`` or ``KeyError``, an
    ``INVALID_REPLY`` with the reason. ``accept`` must check a reply whole
    before it adds anything of it, so a refused reply changes nothing.
    """
    participants: list[int] = []
    failures: dict[int, Failure] = {}
    stage = request.message_type
    for reply in collect(grid, messages, timeout=request.timeout):
        node = reply.metadata.src_node_id
        if reply.error is not None:
            failures[node] = Failure(stage, reply.error)
            continue
        try:
            accept(reply)
        except (InvalidUpdateError, RecordTypeError, KeyError) as exc:
            log.warning("round %d: node %d sent an invalid reply: %s", request.round, node, exc)
            failures[node] = Failure(stage, Error(ErrorCode.INVALID_REPLY, str(exc)))
            continue
        participants.append(node)
    return tuple(participants), failures


def aggregate_round(request: RoundRequest, context: ServerContext) -> RoundResult:
    """Send ``request`` to its cohort and sum the replies, streaming.

    A reply counts if it carries ``metrics`` (with the weight metric, unless
    ``request.weight_key`` is None) and, when it carries ``arrays``, arrays of
    the request's names and shapes, all finite. Anything else is recorded as
    that node's failure; the other nodes' sum is unaffected.
    """
    grid = context.require_grid()
    content = RecordDict({"arrays": request.arrays, "config": request.config})
    messages = request_messages(grid, request, content)
    total = WeightedSum(expected=request.arrays if len(request.arrays) else None)
    metrics = MetricMean(weight_key=request.weight_key)

    def accept(reply: Message) -> None:
        body = reply.require_content()
        if "metrics" not in body:
            raise InvalidUpdateError("reply carries no 'metrics' record")
        reported = body.get_typed("metrics", MetricRecord)
        weight = reply_weight(reported, request.weight_key)
        if "arrays" in body:
            total.add(body.get_typed("arrays", ArrayRecord), weight)
        metrics.add(reported, float(weight))

    participants, failures = gather(grid, messages, request, accept)
    return RoundResult(
        round=request.round,
        aggregate=total.result(),
        total_weight=total.total_weight,
        participants=participants,
        failures=failures,
        metrics=metrics.result(),
    )
