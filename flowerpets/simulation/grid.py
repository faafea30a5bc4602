"""An in-process Grid: every node is a ClientApp call on a shared thread pool."""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType

from flowerpets.core import ClientApp, Context, Error, ErrorCode, Message, WaitsForNodes
from flowerpets.core.client_app import failure_reason
from flowerpets.exceptions import ParameterValueError
from flowerpets.simulation.faults import Delay, Dropout, ErrorReply, FaultPlan

__all__ = ["SimulationGrid"]

log = logging.getLogger(__name__)

_Delivery = tuple[float, int, Message]  # (deliver at, tie-breaker, reply)


class SimulationGrid(WaitsForNodes):
    """Runs a ClientApp for many nodes in one process.

    Each node has its own :class:`Context`, kept across rounds, and handles one
    message at a time; different nodes run concurrently on a pool of
    ``max_workers`` threads (numpy releases the GIL in the heavy parts). Each
    node gets a private copy of its message's record mappings, so one node's
    mods cannot change what another node receives.

    A node that has dropped out (see :mod:`flowerpets.simulation.faults`) is no
    longer listed by :meth:`node_ids`, and messages to it yield no reply: the
    runtime knows at once what a deployment learns from a missed heartbeat.
    A round never waits for nodes (the inherited :meth:`wait_for_nodes`): every
    node is there from the start, and one that dropped out does not come back.
    """

    def __init__(
        self,
        client_app: ClientApp,
        contexts: Sequence[Context],
        *,
        run_id: int = 0,
        faults: FaultPlan | None = None,
        max_workers: int | None = None,
    ) -> None:
        if not contexts:
            raise ParameterValueError("a simulation needs at least one node")
        ids = [c.node_id for c in contexts]
        if len(set(ids)) != len(ids) or 0 in ids:
            raise ParameterValueError("node ids must be unique and non-zero (0 is the server)")
        self._app = client_app
        self._run_id = run_id
        self._contexts = {c.node_id: c for c in contexts}
        self._index = {c.node_id: i for i, c in enumerate(contexts)}
        self._ids = ids
        self._faults = faults or FaultPlan()
        self._faults.check(len(ids))
        self._dropped: set[int] = set()
        self._locks = {node: threading.Lock() for node in ids}
        workers = max_workers or min(32, (os.cpu_count() or 1) + 2)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fp-node")
        self._window = 2 * workers
        self._sequence = itertools.count()  # orders replies due at the same instant

    # -- Grid protocol -------------------------------------------------------
    @property
    def run_id(self) -> int:
        return self._run_id

    def node_ids(self) -> list[int]:
        return [node for node in self._ids if node not in self._dropped]

    def send_and_receive(
        self, messages: Sequence[Message], *, timeout: float | None = None
    ) -> Iterator[Message]:
        # Routing and dropouts are decided for every message now, as a deployment
        # would on sending; the handling itself is started a window at a time.
        deliverable = deque(msg for msg in messages if self._reaches_a_node(msg))
        return self._exchange(deliverable, timeout)

    # -- the nodes -------------------------------------------------------------
    def context(self, node_id: int) -> Context:
        """The node's context (its state persists across rounds)."""
        return self._contexts[node_id]

    def node_index(self, node_id: int) -> int:
        return self._index[node_id]

    @property
    def dropped(self) -> frozenset[int]:
        """Node ids that dropped out so far."""
        return frozenset(self._dropped)

    def _reaches_a_node(self, msg: Message) -> bool:
        """False if ``msg`` will get no reply: unknown node, other run, or a dropout."""
        node = msg.metadata.dst_node_id
        if node not in self._contexts:
            log.warning("message to unknown node %s dropped", node)
            return False
        if msg.metadata.run_id != self._run_id:
            log.warning("message for run %s dropped by run %s", msg.metadata.run_id, self._run_id)
            return False
        if node in self._dropped or self._faults.find(self._index[node], msg.metadata, Dropout):
            self._dropped.add(node)
            return False
        return True

    def _start(self, msg: Message, arrived: queue.SimpleQueue[_Delivery]) -> None:
        """Start handling ``msg``; its reply (or injected error) will arrive in ``arrived``."""
        index = self._index[msg.metadata.dst_node_id]
        delay = self._faults.find(index, msg.metadata, Delay)
        extra = delay.seconds if isinstance(delay, Delay) else 0.0
        injected = self._faults.find(index, msg.metadata, ErrorReply)
        if isinstance(injected, ErrorReply):
            reply = msg.error_reply(Error(ErrorCode.INJECTED_FAULT, injected.reason))
            self._deliver(arrived, reply, extra)
            return
        future = self._pool.submit(self._handle, msg.metadata.dst_node_id, msg)
        future.add_done_callback(lambda f: self._deliver(arrived, self._outcome(f, msg), extra))

    def _handle(self, node: int, msg: Message) -> Message:
        with self._locks[node]:  # a node handles one message at a time
            return self._app(msg.with_private_content(), self._contexts[node])

    @staticmethod
    def _outcome(future: Future[Message], msg: Message) -> Message:
        exc = future.exception()
        if exc is None:
            return future.result()
        # ClientApp never raises; this is a runtime bug, reported as the node's failure.
        log.error("node %s crashed: %r", msg.metadata.dst_node_id, exc, exc_info=exc)
        return msg.error_reply(Error(ErrorCode.NODE_UNAVAILABLE, failure_reason(exc)))

    def _deliver(self, arrived: queue.SimpleQueue[_Delivery], reply: Message, delay: float) -> None:
        arrived.put((time.monotonic() + delay, next(self._sequence), reply))

    def _exchange(self, waiting: deque[Message], timeout: float | None) -> Iterator[Message]:
        """Yield replies as they become due, keeping at most a window of nodes busy.

        The window is what bounds memory: a node's reply is only computed once
        there is room, so a thousand fast nodes cannot pile a thousand updates
        up in front of a server that sums them one at a time.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        arrived: queue.SimpleQueue[_Delivery] = queue.SimpleQueue()
        due: list[_Delivery] = []  # replies in the order they may be seen (Delay faults)
        busy = 0
        while waiting or busy or due:
            while waiting and busy < self._window:
                self._start(waiting.popleft(), arrived)
                busy += 1
            now = time.monotonic()
            if due and due[0][0] <= now:
                yield heapq.heappop(due)[2]
                continue
            if deadline is not None and now >= deadline:
                return
            waits = [t - now for t in (deadline, due[0][0] if due else None) if t is not None]
            if not busy:  # only delayed replies are left
                time.sleep(min(waits))
                continue
            try:
                heapq.heappush(due, arrived.get(timeout=min(waits) if waits else None))
                busy -= 1
            except queue.Empty:
                continue

    # -- lifetime --------------------------------------------------------------
    def close(self) -> None:
        """Stop the worker threads (waiting for messages still being handled)."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> SimulationGrid:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
