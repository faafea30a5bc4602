"""Per-connection state: a session, what moves through its outbox, and its messages' routes.

A session is one node's gRPC stream; a route ties a request sent over it to the
exchange (one call of the grid's ``send_and_receive``) that waits for its reply.
"""

from __future__ import annotations

import itertools
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from flowerpets.core import Message
from flowerpets.transport._frames import SESSION_BYTES, Bye, Reassembler

if TYPE_CHECKING:
    from flowerpets.transport.server import _SharedContent

_TICK: Final = 0.2  # how often waits wake up to look at the stop flag and the clocks


# -- what moves through a session's outbox ---------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _Close:
    reason: str
    status: grpc.StatusCode | None = None  # None: end with OK (after the BYE, if any)
    bye: Bye | None = None


@dataclass(frozen=True, slots=True)
class _Outgoing:
    message: Message
    content: _SharedContent | None


class _Ping:
    """Send a heartbeat now (its sequence number is drawn when it is sent)."""


_PING: Final = _Ping()
_Item = _Outgoing | bytes | _Close | _Ping


class _Exchange:
    """One call of send_and_receive: its replies and the news of its nodes' departures."""

    __slots__ = ("arrived", "pending")

    def __init__(self) -> None:
        self.arrived: queue.SimpleQueue[Message | _Gone] = queue.SimpleQueue()
        self.pending: set[str] = set()


@dataclass(frozen=True, slots=True)
class _Gone:
    message_id: str


@dataclass(slots=True)
class _Route:
    """Where a reply to ``request`` is expected from, and who waits for it."""

    request: Message
    exchange: _Exchange
    session: _Session


@dataclass(eq=False, slots=True)
class _Session:
    """One connection (one gRPC stream), from its first frame to its end."""

    peer: str
    context: grpc.ServicerContext
    id: bytes = field(default_factory=lambda: os.urandom(SESSION_BYTES))
    started: float = field(default_factory=time.monotonic)
    last_seen: float = field(default_factory=time.monotonic)
    last_ping: float = field(default_factory=time.monotonic)
    outbox: queue.SimpleQueue[_Item] = field(default_factory=queue.SimpleQueue)
    ended: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)  # the sender returned
    closing: bool = False
    node_id: int = 0  # 0 until the HELLO is accepted
    label: str = ""
    public_key: Ed25519PublicKey | None = None
    max_chunk: int = 0  # the smaller of ours and the node's
    max_message: int = 0  # the node's limit on what we send
    uplink_seq: int = 0
    downlink_seq: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    reassembler: Reassembler | None = None
    bytes_sent: int = 0
    bytes_received: int = 0
    messages_sent: int = 0
    messages_received: int = 0

    @property
    def authenticated(self) -> bool:
        return self.node_id != 0

    def name(self) -> str:
        if self.authenticated:
            return f"node {self.node_id} ({self.label}, {self.peer})"
        return f"unauthenticated connection from {self.peer}"

    def close(self, item: _Close) -> None:
        """Ask the session's sender to end the stream (the first request wins)."""
        if not self.closing:
            self.closing = True
            self.outbox.put(item)


def _drain(outbox: queue.SimpleQueue[_Item]) -> None:
    while True:
        try:
            outbox.get_nowait()
        except queue.Empty:
            return
