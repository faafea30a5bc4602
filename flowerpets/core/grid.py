"""The Grid: how a server reaches its nodes, whatever runs them.

Both runtimes implement this protocol: the in-process simulation and the gRPC
deployment. A ServerApp and its mods only ever talk to nodes through it, which
is why the same app runs unchanged in both.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol, runtime_checkable

from flowerpets.core.message import Message

__all__ = ["Grid"]


@runtime_checkable
class Grid(Protocol):
    """Send messages to nodes and receive their replies as they arrive."""

    @property
    def run_id(self) -> int:
        """The id of the run this grid serves; every message carries it."""
        ...

    def node_ids(self) -> Sequence[int]:
        """The nodes connected now, in a stable order."""
        ...

    def send_and_receive(
        self, messages: Sequence[Message], *, timeout: float | None = None
    ) -> Iterator[Message]:
        """Send ``messages`` and yield each reply as soon as it arrives.

        Stops when every message has been answered, when the runtime knows the
        remaining nodes are gone, or after ``timeout`` seconds, whichever is
        first. A node that does not answer simply yields nothing: the caller
        decides what a missing reply means. Replies arrive in any order.
        """
        ...
