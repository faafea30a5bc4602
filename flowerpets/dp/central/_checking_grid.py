"""A Grid that passes each plain train reply of one round through the server's check.

:class:`~flowerpets.dp.CentralDp` puts it under the inner chain when it can see
every update one by one (no secure aggregation): to clip each update on the
server, or to check that each client clipped its own.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterator, Sequence

from flowerpets.core import (
    ArrayRecord,
    Error,
    ErrorCode,
    Grid,
    Message,
    RoundRequest,
    RoundResult,
    ServerContext,
)
from flowerpets.exceptions import (
    FlowerpetsError,
    IncompatibleModsError,
    InvalidUpdateError,
    RecordTypeError,
)

__all__ = ["Check", "CheckingGrid", "ReplyRefusedError", "over", "refuse_bypass"]

log = logging.getLogger(__name__)


class ReplyRefusedError(FlowerpetsError):
    """A reply the server refuses; the message is the reason the node's failure records."""


Check = Callable[[int, ArrayRecord], ArrayRecord]
"""What a reply passes through: (node, reply arrays) -> the arrays the inner chain sums."""


class CheckingGrid:
    """A Grid that passes every plain train reply of one round through ``check``.

    The inner chain then sums what ``check`` returned; a reply it refuses
    (:class:`ReplyRefusedError`) becomes an ``INVALID_REPLY`` error, so the inner
    exchange records the node's failure with the reason. A reply ``check`` cannot
    read (``InvalidUpdateError``, ``RecordTypeError``) passes unchanged: the inner
    exchange refuses it too. ``seen`` holds the nodes whose reply was checked.
    """

    def __init__(self, grid: Grid, request: RoundRequest, check: Check) -> None:
        self._grid, self._request, self._check = grid, request, check
        self.seen: set[int] = set()

    @property
    def run_id(self) -> int:
        return self._grid.run_id

    def node_ids(self) -> Sequence[int]:
        return self._grid.node_ids()

    def send_and_receive(
        self, messages: Sequence[Message], *, timeout: float | None = None
    ) -> Iterator[Message]:
        for reply in self._grid.send_and_receive(messages, timeout=timeout):
            yield self._checked(reply)

    def _checked(self, reply: Message) -> Message:
        md = reply.metadata
        body = reply.content
        if (
            body is None
            or "arrays" not in body
            or md.message_type != self._request.message_type
            or md.round != self._request.round
            or md.stage
        ):
            return reply
        try:
            arrays = self._check(md.src_node_id, body.get_typed("arrays", ArrayRecord))
        except ReplyRefusedError as exc:
            log.warning("round %d: refused node %d's reply: %s", md.round, md.src_node_id, exc)
            return Message(metadata=md, error=Error(ErrorCode.INVALID_REPLY, str(exc)))
        except (InvalidUpdateError, RecordTypeError):
            return reply  # the inner exchange refuses it and records the node's failure
        self.seen.add(md.src_node_id)
        content = body.copy()
        content["arrays"] = arrays
        return Message(metadata=md, content=content)


def over(context: ServerContext, grid: CheckingGrid) -> ServerContext:
    """``context`` with its Grid replaced by ``grid``."""
    return ServerContext(
        grid=grid,
        secure_aggregation=context.secure_aggregation,
        run_id=context.run_id,
        run_config=context.run_config,
        state=context.state,
        journal=context.journal,
    )


def refuse_bypass(result: RoundResult, seen: Collection[int], what: str) -> None:
    """Refuses a result whose participants' replies did not all pass through ``what``."""
    missed = [node for node in result.participants if node not in seen]
    if missed:
        raise IncompatibleModsError(
            f"the updates of nodes {missed[:5]} did not pass through {what}: an inner mod "
            "runs its own exchange; clip on the clients, under secure aggregation, instead"
        )
