"""Sending a round's messages over a Grid and collecting what comes back.

:class:`StageExchange` is the one reply loop of the project: it sends one
stage's requests (any message type, any stage name), folds each reply into the
caller's state as it arrives through an ``accept`` function, and records every
node that did not make it in one taxonomy (:class:`~flowerpets.core.FailureKind`).
One exchange lives for a whole round, so its ``failures`` hold every node's
reason across stages, and :meth:`StageExchange.round_failed` hands them to the
``RoundFailedError`` that fails the round: a failed round keeps them too.

:func:`aggregate_round`, the innermost step of every server chain, is one
stage of it: send the round's request to the cohort, fold the replies into a
running weighted sum. SecAgg+'s four stages and HE's key set-up use the same.

:func:`collect` underneath gives every addressed node exactly one outcome: its
reply, or a synthesized ``TIMEOUT`` / ``NODE_UNAVAILABLE`` error.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

from flowerpets.core.aggregation import MetricMean, WeightedSum
from flowerpets.core.grid import Grid
from flowerpets.core.message import Error, ErrorCode, Message, MessageType
from flowerpets.core.records import ArrayRecord, MetricRecord, RecordDict
from flowerpets.core.round import (
    Failure,
    FailureKind,
    RoundRequest,
    RoundResult,
    ServerContext,
)
from flowerpets.exceptions import (
    InvalidUpdateError,
    MessageFieldError,
    ParameterValueError,
    ProtocolViolationError,
    RecordTypeError,
    RoundFailedError,
)

__all__ = [
    "INVALID_REPLY_ERRORS",
    "Accept",
    "StageExchange",
    "aggregate_round",
    "collect",
    "reply_weight",
    "request_messages",
]

log = logging.getLogger(__name__)

# The codes of a missing reply: collect's own, and a runtime's that knew the node gone.
_NO_REPLY = frozenset({ErrorCode.TIMEOUT, ErrorCode.NODE_UNAVAILABLE})

Accept = Callable[[int, RecordDict], object]
"""``accept(node, content)``: check one reply whole, then fold it in; raise to refuse it."""

INVALID_REPLY_ERRORS: tuple[type[Exception], ...] = (
    InvalidUpdateError,
    MessageFieldError,
    RecordTypeError,
    KeyError,
)
"""What an ``accept`` raises for a reply it cannot use, by default (the node is recorded
``INVALID_REPLY``; anything else it raises is a bug and fails the round). A field read
through :class:`~flowerpets.core.fields.Fields` raises ``MessageFieldError``."""


def request_messages(
    grid: Grid,
    request: RoundRequest,
    content: RecordDict,
    *,
    nodes: Sequence[int] | None = None,
    stage: str = "",
    message_type: str | None = None,
) -> list[Message]:
    """One message per node (default: the cohort), all sharing ``content``.

    The message type is ``message_type`` if given, else the request's. The
    content is shared, not copied: a runtime hands each node a private copy of
    the record mappings, and arrays are immutable.
    """
    return [
        Message.create(
            content,
            message_type=message_type or request.message_type,
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


class StageExchange:
    """One round's stages over ``grid``, keeping every node's reason across them.

    ``message_type`` and ``timeout`` are the defaults of every stage sent (a
    stage may name another message type). :meth:`send` runs one stage;
    :meth:`fail` records a node the server itself leaves out;
    :attr:`failures` is the round's record (node -> :class:`Failure`, the
    latest reason wins), and :meth:`round_failed` the error that fails the
    round with it.
    """

    __slots__ = ("failures", "grid", "message_type", "round", "timeout")

    def __init__(
        self,
        grid: Grid,
        *,
        round: int,
        message_type: str = MessageType.TRAIN,
        timeout: float | None = None,
    ) -> None:
        self.grid = grid
        self.round = round
        self.message_type = message_type
        self.timeout = timeout
        self.failures: dict[int, Failure] = {}

    @classmethod
    def of(cls, grid: Grid, request: RoundRequest) -> StageExchange:
        """An exchange for ``request``'s round: its number, message type and timeout."""
        return cls(
            grid, round=request.round, message_type=request.message_type, timeout=request.timeout
        )

    def send(
        self,
        stage: str,
        requests: Mapping[int, RecordDict] | Iterable[tuple[int, RecordDict]],
        accept: Accept,
        *,
        message_type: str | None = None,
        invalid: tuple[type[Exception], ...] = INVALID_REPLY_ERRORS,
    ) -> tuple[int, ...]:
        """Send each node its content; fold the replies in; the nodes accepted, in arrival order.

        ``stage`` names the step in the messages' metadata (empty for a plain
        train/evaluate round) and in the failures (the message type when
        empty). Every other addressed node gets a failure: an error reply
        (``ERROR_REPLY``), none (``NO_REPLY``), or ``accept`` raised
        :class:`~flowerpets.exceptions.ProtocolViolationError`
        (``PROTOCOL_VIOLATION``) or one of ``invalid`` (``INVALID_REPLY``);
        a node accepted here loses an earlier failure. ``accept`` must check a
        reply whole before it folds anything of it in, so a refused reply
        changes nothing; what else it raises propagates (a bug is not a node's
        fault).
        """
        kind = message_type or self.message_type
        pairs = list(requests.items() if isinstance(requests, Mapping) else requests)
        nodes = [node for node, _ in pairs]
        if len(set(nodes)) != len(nodes):
            raise ParameterValueError(
                f"{stage or kind}: a stage addresses each node once, got {nodes}"
            )
        messages = [
            Message.create(
                content,
                message_type=kind,
                dst_node_id=node,
                round=self.round,
                run_id=self.grid.run_id,
                stage=stage,
            )
            for node, content in pairs
        ]
        named = stage or kind
        accepted: list[int] = []
        for reply in collect(self.grid, messages, timeout=self.timeout):
            node = reply.metadata.src_node_id
            if reply.error is not None:
                gone = reply.error.code in _NO_REPLY
                self.failures[node] = Failure(
                    named, reply.error, FailureKind.NO_REPLY if gone else FailureKind.ERROR_REPLY
                )
                continue
            assert reply.content is not None  # a Message holds exactly one of the two
            try:
                accept(node, reply.content)
            except ProtocolViolationError as exc:
                self._refuse(node, named, FailureKind.PROTOCOL_VIOLATION, exc)
                continue
            except invalid as exc:
                self._refuse(node, named, FailureKind.INVALID_REPLY, exc)
                continue
            self.failures.pop(node, None)
            accepted.append(node)
        return tuple(accepted)

    def _refuse(self, node: int, stage: str, kind: FailureKind, exc: Exception) -> None:
        log.warning("round %d, %s: node %d failed (%s): %s", self.round, stage, node, kind, exc)
        self.fail(node, stage, kind, str(exc))

    def fail(
        self,
        node: int,
        stage: str,
        kind: FailureKind,
        reason: str,
        *,
        code: ErrorCode | None = None,
    ) -> None:
        """Record ``node``'s failure at ``stage`` (the code follows the kind unless given)."""
        if code is None:
            code = ErrorCode.REFUSED if kind is FailureKind.EXCLUDED else ErrorCode.INVALID_REPLY
        self.failures[node] = Failure(stage, Error(code, reason), kind)

    def round_failed(self, message: str, *, participants: Iterable[int] = ()) -> RoundFailedError:
        """The error that fails the round, carrying every node's reason so far."""
        return RoundFailedError(message, failures=self.failures, participants=participants)


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


def aggregate_round(request: RoundRequest, context: ServerContext) -> RoundResult:
    """Send ``request`` to its cohort and sum the replies, streaming.

    A reply counts if it carries ``metrics`` (with the weight metric, unless
    ``request.weight_key`` is None) and, when it carries ``arrays``, arrays of
    the request's names and shapes, all finite. Anything else is recorded as
    that node's failure; the other nodes' sum is unaffected. A quantized round
    (``request.quantized``) is refused before anything is sent
    (:class:`~flowerpets.exceptions.QuantizedRoundError`): this sum is weighted
    and never modular.
    """
    request.refuse_quantized("the plain exchange (aggregate_round)")
    exchange = StageExchange.of(context.require_grid(), request)
    content = RecordDict({"arrays": request.arrays, "config": request.config})
    total = WeightedSum(expected=request.arrays if len(request.arrays) else None)
    metrics = MetricMean(weight_key=request.weight_key)

    def accept(node: int, body: RecordDict) -> None:
        if "metrics" not in body:
            raise InvalidUpdateError("reply carries no 'metrics' record")
        reported = body.get_typed("metrics", MetricRecord)
        weight = reply_weight(reported, request.weight_key)
        if "arrays" in body:
            total.add(body.get_typed("arrays", ArrayRecord), weight)
        metrics.add(reported, float(weight))

    participants = exchange.send("", [(node, content) for node in request.cohort], accept)
    return RoundResult(
        round=request.round,
        aggregate=total.result(),
        total_weight=total.total_weight,
        participants=participants,
        failures=exchange.failures,
        metrics=metrics.result(),
    )
