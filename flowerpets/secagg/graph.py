"""The communication graph of SecAgg+: a Harary graph over a random ordering of the cohort.

``HararyGraph(order, degree)`` places the nodes on a ring in ``order`` and joins
each to the ``degree / 2`` nodes on either side (Harary's ``H(n, k)`` for even
``k``). With ``degree = n - 1`` it is the complete graph (the original SecAgg).
The server draws ``order`` as a uniformly random permutation of the cohort and
sends it to every node, so each node computes its own neighbourhood and checks
that the server only ever introduces it to those neighbours.

Shares are dealt at *relative* positions: the neighbour ``d`` steps clockwise
from the dealer (``1 <= d <= k/2``) holds the share at ``x = d``, the one ``d``
steps counter-clockwise holds ``x = k + 1 - d``. Every dealer's shares sit at
the same points ``1..k``, so a server reconstructing many secrets reuses the
same Lagrange coefficients.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property

from flowerpets._validation import integer, is_integer
from flowerpets.exceptions import ParameterTypeError, ParameterValueError

__all__ = ["HararyGraph"]


class HararyGraph:
    """``H(n, k)`` on the ring ``order`` (node ids): ``k`` even and ``< n - 1``, or ``n - 1``."""

    def __init__(self, order: Sequence[int], degree: int) -> None:
        # Node ids are integers as given: a float or a string is refused, never coerced (a
        # server's 1.5 must not quietly become node 1).
        if isinstance(order, str | bytes) or not all(is_integer(node) for node in order):
            raise ParameterTypeError("the ring order must list integer node ids")
        nodes = tuple(int(node) for node in order)
        n = len(nodes)
        if n < 2:
            raise ParameterValueError(f"a graph needs at least 2 nodes, got {n}")
        if len(set(nodes)) != n:
            raise ParameterValueError("the ring order lists a node twice")
        degree = integer("degree", degree)
        if degree != n - 1 and not (2 <= degree < n - 1 and degree % 2 == 0):
            raise ParameterValueError(
                f"degree must be even with 2 <= degree < n - 1 = {n - 1}, or n - 1 "
                f"(the complete graph), got {degree}"
            )
        self.order = nodes
        self.degree = degree

    def __repr__(self) -> str:
        return f"HararyGraph(n={len(self.order)}, degree={self.degree})"

    def __len__(self) -> int:
        return len(self.order)

    @property
    def is_complete(self) -> bool:
        return self.degree == len(self.order) - 1

    @cached_property
    def _positions(self) -> dict[int, int]:
        return {node: i for i, node in enumerate(self.order)}

    def __contains__(self, node: object) -> bool:
        return node in self._positions

    def position(self, node: int) -> int:
        try:
            return self._positions[node]
        except KeyError:
            raise ParameterValueError(f"node {node} is not in the graph") from None

    def neighbours(self, node: int) -> tuple[int, ...]:
        """The node's neighbours, clockwise first (``x = 1, 2, ...``), then counter-clockwise."""
        n, p = len(self.order), self.position(node)
        if self.is_complete:
            return tuple(self.order[(p + d) % n] for d in range(1, n))
        half = self.degree // 2
        clockwise = [self.order[(p + d) % n] for d in range(1, half + 1)]
        counter = [self.order[(p - d) % n] for d in range(half, 0, -1)]
        return tuple(clockwise + counter)

    def are_neighbours(self, a: int, b: int) -> bool:
        if a == b:
            return False
        d = (self.position(b) - self.position(a)) % len(self.order)
        return self.is_complete or d <= self.degree // 2 or d >= len(self.order) - self.degree // 2

    def share_point(self, dealer: int, holder: int) -> int:
        """The Shamir point (1..k) of the share ``dealer`` deals to its neighbour ``holder``."""
        n = len(self.order)
        d = (self.position(holder) - self.position(dealer)) % n
        if d == 0 or not self.are_neighbours(dealer, holder):
            raise ParameterValueError(f"node {holder} is not a neighbour of node {dealer}")
        return d if d <= self.degree // 2 else d - (n - 1 - self.degree)
