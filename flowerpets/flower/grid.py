"""Our Grid over Flower's: what lets our ServerApp and its server mods run inside flwr.

:class:`FlowerGrid` pushes a stage's messages with ``push_messages`` and yields
each reply as soon as ``pull_messages`` returns it (it polls only the ids still
pending: flwr answers a re-pulled id with a ``MESSAGE_UNAVAILABLE`` error).
Every request carries the :data:`~flowerpets.flower.client.BRIDGE_RECORD` mark.
Replies are rebuilt from our own request (``request.reply(content)``), so their
routing fields are ours whatever ids flwr uses for its server. A SuperLink error
(the node is gone, the message expired) arrives as the node's error reply.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence

from flwr import app as fl
from flwr.serverapp import Grid as FlwrGrid

from flowerpets._validation import integer, real
from flowerpets.core import Error, ErrorCode, Message, WaitsForNodes
from flowerpets.exceptions import ParameterValueError
from flowerpets.flower.client import BRIDGE_RECORD
from flowerpets.flower.messages import error_from_flwr, group_id, message_type_to_flwr
from flowerpets.flower.records import Session, recorddict_from_flwr, recorddict_to_flwr

__all__ = ["FlowerGrid"]

log = logging.getLogger(__name__)

_MAX_PAUSE = 0.1  # seconds: the longest wait between two pulls that brought nothing


class FlowerGrid(WaitsForNodes):
    """Our :class:`~flowerpets.core.Grid` protocol over a flwr ``Grid``.

    ``min_nodes``: a round starts with :meth:`wait_for_nodes`, which waits (up
    to ``node_timeout`` seconds) until that many nodes are connected, as flwr's
    SuperNodes connect after the ServerApp starts; :meth:`node_ids` never waits.
    ``poll_interval`` is the first pause after a pull that brought nothing; it
    doubles while nothing arrives, up to 0.1 s.
    """

    def __init__(
        self,
        grid: FlwrGrid,
        *,
        min_nodes: int = 1,
        node_timeout: float = 60.0,
        poll_interval: float = 0.01,
        ttl: float | None = None,
    ) -> None:
        integer("min_nodes", min_nodes, at_least=0)
        for name, value in (("node_timeout", node_timeout), ("poll_interval", poll_interval)):
            real(name, value, at_least=0, finite=False)
        if ttl is not None:
            real("ttl", ttl, above=0, finite=False)
        self.grid = grid
        self.min_nodes = min_nodes
        self.node_timeout = float(node_timeout)
        self.poll_interval = float(poll_interval)
        self.ttl = ttl
        self.pulls = 0  # how many pull_messages calls went out (for tests and benchmarks)

    @property
    def run_id(self) -> int:
        return int(self.grid.run.run_id)

    def node_ids(self) -> Sequence[int]:
        return sorted(int(n) for n in self.grid.get_node_ids())

    def wait_for_nodes(self) -> Sequence[int]:
        """The connected nodes, once ``min_nodes`` are (waiting up to ``node_timeout`` s)."""
        deadline = time.monotonic() + self.node_timeout
        while True:
            nodes = list(self.node_ids())
            if len(nodes) >= self.min_nodes or time.monotonic() >= deadline:
                if len(nodes) < self.min_nodes:
                    log.warning(
                        "only %d of %d nodes connected after %.0f s",
                        len(nodes),
                        self.min_nodes,
                        self.node_timeout,
                    )
                return nodes
            time.sleep(0.05)

    def _to_flwr(self, messages: Sequence[Message]) -> list[fl.Message]:
        session = Session()
        converted: dict[int, fl.RecordDict] = {}  # one flwr content per shared content
        out = []
        for msg in messages:
            content = msg.require_content()
            body = converted.get(id(content))
            if body is None:
                if BRIDGE_RECORD in content:
                    raise ParameterValueError(f"{BRIDGE_RECORD!r} is a reserved record name")
                body = recorddict_to_flwr(content, session)
                body[BRIDGE_RECORD] = fl.ConfigRecord({"version": 1})
                converted[id(content)] = body
            md = msg.metadata
            out.append(
                fl.Message(
                    body,
                    md.dst_node_id,
                    message_type_to_flwr(md.message_type),
                    group_id=group_id(md.round, md.stage),
                    ttl=self.ttl,
                )
            )
        return out

    def send_and_receive(
        self, messages: Sequence[Message], *, timeout: float | None = None
    ) -> Iterator[Message]:
        if not messages:
            return
        started = time.monotonic()
        outgoing = self._to_flwr(messages)
        returned = {str(i) for i in self.grid.push_messages(outgoing) if i}
        pending: dict[str, Message] = {}
        for ours, theirs in zip(messages, outgoing, strict=True):
            sent_id = theirs.metadata.message_id
            if sent_id and sent_id in returned:
                pending[sent_id] = ours
            else:
                yield ours.error_reply(
                    Error(ErrorCode.NODE_UNAVAILABLE, "the SuperLink did not accept the message")
                )
        pause = self.poll_interval
        while pending:
            self.pulls += 1
            replies = list(self.grid.pull_messages(list(pending)))
            for reply in replies:
                request = pending.pop(reply.metadata.reply_to_message_id, None)
                if request is None:
                    log.warning("dropping a reply that answers no pending request")
                    continue
                if reply.has_error():
                    yield request.error_reply(error_from_flwr(reply.error))
                    continue
                try:
                    content = recorddict_from_flwr(reply.content, Session())
                except (ValueError, TypeError) as exc:
                    yield request.error_reply(Error(ErrorCode.INVALID_REPLY, str(exc)))
                    continue
                yield request.reply(content)
            if not pending:
                return
            if timeout is not None and time.monotonic() - started >= timeout:
                return
            if replies:
                pause = self.poll_interval
            else:  # back off while nothing arrives (slow nodes), up to _MAX_PAUSE
                time.sleep(pause)
                pause = min(2 * pause, max(self.poll_interval, _MAX_PAUSE))
