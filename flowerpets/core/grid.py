"""The Grid: how a server reaches its nodes, whatever runs them.

Both runtimes implement this protocol: the in-process simulation and the gRPC
deployment. A ServerApp and its mods only ever talk to nodes through it, which
is why the same app runs unchanged in both.

A round starts by asking :func:`round_nodes` for the nodes it may draw its
cohort from. A runtime whose nodes come and go (a deployment: nodes connect
after the server starts, reconnect after an outage) subclasses
:class:`WaitsForNodes` and waits there, bounded by its own settings, for enough
of them; :meth:`Grid.node_ids` itself never waits, so a mod that lists the
nodes mid-round gets the nodes connected now.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Sequence
from typing import Protocol, runtime_checkable

from flowerpets.core.message import Message

__all__ = ["Grid", "WaitsForNodes", "round_nodes"]


@runtime_checkable
class Grid(Protocol):
    """Send messages to nodes and receive their replies as they arrive."""

    @property
    def run_id(self) -> int:
        """The id of the run this grid serves; every message carries it."""
        ...

    def node_ids(self) -> Sequence[int]:
        """The nodes connected now, in a stable order (never waits for more)."""
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


class WaitsForNodes(abc.ABC):
    """A Grid that can wait, at a round's start, for enough nodes to be connected.

    Subclass it to declare the round-start hook; :meth:`wait_for_nodes` by
    default waits for nothing (all of the simulation's nodes are there from
    the start), and a deployment's grid overrides it with its own bounded
    wait (how many nodes, for how long: the runtime's settings).
    """

    @abc.abstractmethod
    def node_ids(self) -> Sequence[int]:
        """The nodes connected now (the Grid protocol's)."""

    def wait_for_nodes(self) -> Sequence[int]:
        """The nodes connected once this runtime's round-start wait is over (none here)."""
        return self.node_ids()


def round_nodes(grid: Grid) -> list[int]:
    """The nodes a round draws its cohort from: after the grid's round-start wait, if it has one."""
    if isinstance(grid, WaitsForNodes):
        return list(grid.wait_for_nodes())
    return list(grid.node_ids())
