"""The Grid a ServerApp runs over: a :class:`TransportServer`'s nodes and exchanges."""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from flowerpets.core import Message, WaitsForNodes
from flowerpets.exceptions import StopRunError
from flowerpets.transport._sessions import _TICK, _Exchange, _Gone

if TYPE_CHECKING:
    from flowerpets.transport.server import TransportServer

log = logging.getLogger("flowerpets.transport.server")


class TransportGrid(WaitsForNodes):
    """The :class:`~flowerpets.core.Grid` of a :class:`TransportServer`.

    :meth:`node_ids` lists the connected nodes (sorted by id); a round starts
    with :meth:`wait_for_nodes`, which waits for ``settings.min_nodes``. A message to a
    node that is not connected, or that leaves before answering, yields no
    reply. ``timeout=None`` waits for as long as the nodes stay connected (or
    the server's ``message_timeout``, if set).
    """

    def __init__(self, server: TransportServer) -> None:
        self._server = server
        self._waited_in_vain = False

    @property
    def run_id(self) -> int:
        return self._server.run_id

    @property
    def stop_requested(self) -> str | None:
        """Why the server was asked to stop (a signal, a shutdown), or None.

        The next exchange raises StopRunError; a mod that waits between
        exchanges (for a file, for nodes) reads this to stop waiting too.
        """
        return self._server.stop_requested

    def node_ids(self) -> list[int]:
        """The nodes connected now (no wait: a mod listing the nodes mid-round gets these)."""
        return self._server.node_ids()

    def wait_for_nodes(self) -> list[int]:
        """The connected nodes, once ``settings.min_nodes`` are (waiting for them, bounded).

        A round starts here: after an outage (every node missed its heartbeats,
        or the server was paused and they reconnect) it waits up to
        ``settings.wait_for_nodes`` seconds for ``settings.min_nodes`` nodes to
        be back, rather than fail at once with none. A wait in vain is not
        repeated before the next exchange, so a round waits once at most.
        """
        server = self._server
        wanted, wait = server.settings.min_nodes, server.settings.wait_for_nodes
        nodes = server.node_ids()
        if len(nodes) >= wanted or wait <= 0 or self._waited_in_vain:
            return nodes
        if server.stop_requested is not None:
            return nodes
        log.warning(
            "%d of %d node(s) connected: waiting up to %g s for nodes to (re)connect",
            len(nodes),
            wanted,
            wait,
        )
        server.wait_for_nodes(wanted, timeout=wait)
        nodes = server.node_ids()
        if len(nodes) < wanted:
            self._waited_in_vain = True
            log.warning("still %d of %d node(s) after %g s; going on", len(nodes), wanted, wait)
        else:
            log.info("%d node(s) connected; going on", len(nodes))
        return nodes

    def send_and_receive(
        self, messages: Sequence[Message], *, timeout: float | None = None
    ) -> Iterator[Message]:
        self._waited_in_vain = False
        if self._server.stop_requested is not None:
            raise StopRunError(self._server.stop_requested)
        exchange = _Exchange()
        self._server._send(messages, exchange)  # sent now, as the Grid protocol says
        limits = [t for t in (timeout, self._server.settings.message_timeout) if t is not None]
        return self._replies(exchange, min(limits) if limits else None)

    def _replies(self, exchange: _Exchange, timeout: float | None) -> Iterator[Message]:
        server = self._server
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while exchange.pending:
                if server.stop_requested is not None:
                    raise StopRunError(server.stop_requested)
                wait = _TICK
                if deadline is not None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        log.info(
                            "%d node(s) did not answer within %g s", len(exchange.pending), timeout
                        )
                        return
                    wait = min(wait, remaining)
                try:
                    item = exchange.arrived.get(timeout=wait)
                except queue.Empty:
                    continue
                if isinstance(item, _Gone):
                    exchange.pending.discard(item.message_id)
                    continue
                if item.metadata.reply_to_message_id in exchange.pending:
                    exchange.pending.discard(item.metadata.reply_to_message_id)
                    yield item
        finally:
            server._forget(exchange)
