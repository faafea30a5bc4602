"""The server process's runtime: a gRPC server that hosts one run, and its Grid.

:class:`TransportServer` listens for nodes; each node keeps one bidirectional
gRPC stream open (see :mod:`flowerpets.transport._frames` for what travels on
it). :class:`TransportGrid` implements :class:`~flowerpets.core.Grid` over
those streams, so a :class:`~flowerpets.core.ServerApp` runs over it exactly as
it runs over the simulation:

.. code-block:: python

    with TransportServer("0.0.0.0:9092", tls=ServerTls.from_files("server.pem", "server.key"),
                         node_keys=load_public_keys(["node-keys.pub"])) as server:
        server.wait_for_nodes(5, timeout=60)
        result = server_app.run(server.grid)

What the server guarantees:

* only nodes whose Ed25519 keys it was given join; a replayed or forged request
  is refused, also one recorded before a restart: every HELLO signs its
  connection's challenge (:mod:`flowerpets.transport._auth`), and a node's id is derived
  from its key, so it keeps its id when it reconnects;
* a malformed or oversized frame or message closes that node's connection with a
  typed error in the log (:class:`~flowerpets.exceptions.FrameError`,
  :class:`~flowerpets.exceptions.MessageTooLargeError`, other
  :class:`~flowerpets.exceptions.CodecError`); a reply that claims another
  node's id or another run is refused (:class:`~flowerpets.exceptions.AuthenticationError`);
  the server and every other connection live on;
* a node that disconnects, or sends nothing for ``heartbeat_timeout`` seconds,
  is gone: the exchange stops waiting for it at once (it yields no reply, and
  the caller records a dropout). When it reconnects it is listed by
  :meth:`TransportGrid.node_ids` again, so it joins the next round;
* a round that finds fewer than ``settings.min_nodes`` nodes (an outage: every
  node missed its heartbeats) waits up to ``settings.wait_for_nodes`` seconds
  for them in :meth:`TransportGrid.wait_for_nodes` (the grid's round-start
  hook), instead of failing at once; a
  paused server does not count its own pause as its nodes' silence;
* :meth:`TransportServer.request_stop` (the CLI calls it on SIGTERM) makes the
  current exchange raise :class:`~flowerpets.exceptions.StopRunError`, which
  the ServerApp turns into an early, orderly end of the run; :meth:`stop`
  then tells every node why it is being let go.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType
from typing import Final

import grpc

from flowerpets._validation import integer
from flowerpets.core import ConfigRecord, ConfigValue, Message
from flowerpets.core.codec import CodecLimits
from flowerpets.exceptions import CodecError, ParameterValueError, TransportError, UsageError
from flowerpets.transport._auth import Authenticator
from flowerpets.transport._frames import (
    FRAME_ROOM,
    SESSION_BYTES,
    Bye,
    ByeCode,
    Welcome,
    decode_frame,
    encode_content,
)
from flowerpets.transport._grid import TransportGrid
from flowerpets.transport._routes import _Routes
from flowerpets.transport._sessions import _Close, _Exchange, _Outgoing, _Route, _Session
from flowerpets.transport.settings import ServerSettings, ServerTls, is_loopback, split_address

__all__ = ["METHOD_PATH", "TransportGrid", "TransportServer", "TransportStats"]

log = logging.getLogger("flowerpets.transport.server")

SERVICE: Final = "flowerpets.transport.v1.Fleet"
METHOD: Final = "Connect"
METHOD_PATH: Final = f"/{SERVICE}/{METHOD}"
_CONTENT_LIMITS: Final = CodecLimits()  # each node's own limit is checked on the whole envelope


@dataclass(frozen=True, slots=True)
class TransportStats:
    """Counters over the server's life: connections, refusals, and frame bytes each way.

    Bytes are those of the frames (the codec's bytes plus the framing); gRPC's
    HTTP/2 framing and TLS records add a little on the wire (see ``docs/transport.md``).
    """

    connections: int
    refused: int
    bytes_sent: int
    bytes_received: int
    messages_sent: int
    messages_received: int


class _SharedContent:
    """One content's frame, encoded once for every message of a send that shares it.

    A round sends the same global model to the whole cohort: encoding it once
    instead of once per node saves the copies, and the memory of holding one
    encoded copy per connection at the same time.
    """

    __slots__ = ("_data", "_done", "_error", "_lock", "_message")

    def __init__(self, message: Message) -> None:
        self._message = message
        self._lock = threading.Lock()
        self._done = False
        self._data: bytes | None = None
        self._error: CodecError | None = None

    def get(self) -> bytes | None:
        with self._lock:
            if not self._done:
                try:
                    self._data = encode_content(self._message, _CONTENT_LIMITS)
                except CodecError as exc:
                    self._error = exc
                self._done = True
        if self._error is not None:
            raise type(self._error)(str(self._error))
        return self._data


def _welcome_size(run_config: ConfigRecord, settings: ServerSettings) -> int:
    """The WELCOME's size with ``run_config``; a ValueError if no node could receive it.

    The run config travels in the WELCOME, one frame, which must fit in one chunk
    of the server's (``max_chunk_bytes``) plus the frame room; else every node
    would refuse the frame, and retry, without ever joining.
    """
    try:
        frame = Welcome(0, 0, bytes(SESSION_BYTES), 0, 0, 0, 0, run_config).encode()
    except CodecError as exc:
        raise ParameterValueError(f"the run config cannot be encoded: {exc}") from None
    size, limit = len(frame), settings.max_chunk_bytes + FRAME_ROOM
    if size <= limit:
        try:
            decode_frame(frame, max_frame=limit)  # as every node will
        except CodecError as exc:
            raise ParameterValueError(f"no node could read the run config: {exc}") from None
    else:
        raise ParameterValueError(
            f"the run config takes {size} bytes, and the WELCOME frame that carries it to "
            f"every node may take at most {limit} (max_chunk_bytes={settings.max_chunk_bytes} "
            f"plus {FRAME_ROOM}): no node could join. Send large data in messages, not in the "
            "run config"
        )
    return size


class TransportServer(_Routes):
    """A gRPC server hosting one run for the nodes that connect to it.

    ``address`` is HOST:PORT (port 0 picks a free port: see :attr:`port`).
    ``tls`` and ``node_keys`` (raw Ed25519 public key -> label, from
    :func:`~flowerpets.transport.load_public_keys`) are required unless the
    address is loopback or ``insecure`` is set (then a warning is logged).
    ``run_config`` is sent to every node when it joins (it becomes its
    ``Context.run_config``); ``run_id`` defaults to a random 63-bit id.
    """

    def __init__(
        self,
        address: str,
        *,
        tls: ServerTls | None = None,
        node_keys: Mapping[bytes, str] | None = None,
        settings: ServerSettings | None = None,
        run_id: int | None = None,
        run_config: Mapping[str, ConfigValue] | None = None,
        insecure: bool = False,
    ) -> None:
        self.settings = settings or ServerSettings()
        loopback = is_loopback(address)
        if tls is None and not loopback:
            if not insecure:
                raise ParameterValueError(
                    f"refusing to serve plain text on {address}, which is not a loopback "
                    "address: give a certificate and key (flowerpets certs makes development "
                    "ones), or pass insecure=True (--insecure) to accept eavesdropping"
                )
            log.warning(
                "INSECURE: serving PLAIN TEXT on %s; anyone on the network can read and alter "
                "every model update",
                address,
            )
        if node_keys is None and not loopback:
            if not insecure:
                raise ParameterValueError(
                    f"refusing to accept any node on {address}, which is not a loopback "
                    "address: give the nodes' public keys (--node-keys), or pass insecure=True "
                    "(--insecure) to let anyone join"
                )
            log.warning("INSECURE: node authentication is OFF on %s; any node can join", address)
        elif node_keys is None:
            log.info("node authentication is off (loopback only): any node key is accepted")
        if node_keys is not None and not node_keys:
            raise ParameterValueError("node_keys is empty: no node could join")
        if run_id is None:
            run_id = secrets.randbits(63) or 1
        integer("run_id", run_id, at_least=1, below=2**63)
        self.address = address
        self.run_id = run_id
        self.run_config = ConfigRecord(dict(run_config or {}))
        self._welcome_bytes = _welcome_size(self.run_config, self.settings)
        self._tls = tls
        self._auth = Authenticator(node_keys, max_clock_skew=self.settings.max_clock_skew)
        self._max_frame = self.settings.max_chunk_bytes + FRAME_ROOM
        self._lock = threading.Lock()
        self._all: set[_Session] = set()
        self._sessions: dict[int, _Session] = {}  # authenticated, by node id
        self._routes: dict[str, _Route] = {}  # by request message id
        self._dying: dict[_Session, float] = {}  # killed sessions -> when to cancel their RPC
        self._totals = {"bytes_sent": 0, "bytes_received": 0, "sent": 0, "received": 0}
        self._connections = 0
        self._refused = 0
        self._stop_reason: str | None = None
        self._goodbye: Bye | None = None  # what stop() says, also to nodes that connect meanwhile
        self._stopped = threading.Event()
        self._server: grpc.Server | None = None
        self._monitor: threading.Thread | None = None
        self._port = 0
        self.grid = TransportGrid(self)

    # -- lifetime ------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        """The port the server listens on (known after :meth:`start`)."""
        return self._port

    def start(self) -> TransportServer:
        if self._server is not None:
            raise UsageError("the server is already started")
        limit = self.settings.max_connections
        server = grpc.server(
            ThreadPoolExecutor(max_workers=limit + 4, thread_name_prefix="fp-stream"),
            handlers=[
                grpc.method_handlers_generic_handler(
                    SERVICE, {METHOD: grpc.stream_stream_rpc_method_handler(self._connect)}
                )
            ],
            options=[
                # gRPC's own bound is a backstop at twice ours, so that a frame just over
                # our limit gets our clear error rather than gRPC's bare cancellation.
                ("grpc.max_receive_message_length", 2 * self._max_frame),
                ("grpc.max_send_message_length", 2 * self._max_frame),
                ("grpc.so_reuseport", 0),  # a second server on a busy port must fail, not share
            ],
            maximum_concurrent_rpcs=limit,
        )
        try:
            if self._tls is not None:
                credentials = grpc.ssl_server_credentials(
                    [(self._tls.private_key, self._tls.certificate_chain)]
                )
                self._port = server.add_secure_port(self.address, credentials)
            else:
                self._port = server.add_insecure_port(self.address)
        except RuntimeError as exc:
            raise TransportError(f"cannot listen on {self.address}: {exc}") from None
        if self._port == 0:
            raise TransportError(
                f"cannot listen on {self.address} (in use, or not a local address?)"
            )
        server.start()
        self._server = server
        self._monitor = threading.Thread(target=self._watch, name="fp-monitor", daemon=True)
        self._monitor.start()
        host, _ = split_address(self.address)
        log.info(
            "listening on %s:%d (%s), run %d",
            f"[{host}]" if ":" in host else host,
            self._port,
            "TLS" if self._tls is not None else "plain text",
            self.run_id,
        )
        return self

    def request_stop(self, reason: str) -> None:
        """Make the running exchange raise StopRunError (safe to call from a signal handler)."""
        if self._stop_reason is None:
            self._stop_reason = reason

    @property
    def stop_requested(self) -> str | None:
        return self._stop_reason

    def stop(
        self,
        reason: str = "the server is shutting down",
        *,
        code: ByeCode = ByeCode.SHUTDOWN,
        grace: float | None = None,
    ) -> None:
        """Say goodbye to every node (``reason``), wait up to ``grace`` s, and stop listening."""
        if self._goodbye is None:
            self._goodbye = Bye(code, reason)
        self.request_stop(reason)
        if self._server is None or self._stopped.is_set():
            return
        grace = self.settings.shutdown_grace if grace is None else grace
        with self._lock:
            sessions = list(self._all)
        for session in sessions:
            session.close(_Close(reason, bye=Bye(code, reason)))
        deadline = time.monotonic() + grace
        for session in sessions:
            session.ended.wait(max(0.0, deadline - time.monotonic()))
        self._stopped.set()
        self._server.stop(grace=0.5).wait()
        if self._monitor is not None:
            self._monitor.join(timeout=2)
        log.info("stopped: %s", reason)

    def __enter__(self) -> TransportServer:
        if self._server is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- the run's view ------------------------------------------------------------------------
    def node_ids(self) -> list[int]:
        with self._lock:
            return sorted(node for node, s in self._sessions.items() if not s.closing)

    def wait_for_nodes(self, count: int, *, timeout: float | None = None) -> int:
        """Wait until ``count`` nodes are connected (or ``timeout`` s, or a stop request)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            connected = len(self.node_ids())
            if connected >= count or self._stop_reason is not None:
                return connected
            if deadline is not None and time.monotonic() >= deadline:
                return connected
            time.sleep(0.05)

    def stats(self) -> TransportStats:
        with self._lock:
            live = list(self._all)
            totals = dict(self._totals)
            connections, refused = self._connections, self._refused
        return TransportStats(
            connections=connections,
            refused=refused,
            bytes_sent=totals["bytes_sent"] + sum(s.bytes_sent for s in live),
            bytes_received=totals["bytes_received"] + sum(s.bytes_received for s in live),
            messages_sent=totals["sent"] + sum(s.messages_sent for s in live),
            messages_received=totals["received"] + sum(s.messages_received for s in live),
        )

    # -- the grid's side -----------------------------------------------------------------------
    def _send(self, messages: Sequence[Message], exchange: _Exchange) -> None:
        shared: dict[int, _SharedContent] = {}  # by id(content): alive while messages is
        for message in messages:
            md = message.metadata
            if md.run_id != self.run_id:
                log.warning("message for run %s dropped by run %s", md.run_id, self.run_id)
                continue
            with self._lock:
                session = self._sessions.get(md.dst_node_id)
                if session is None or session.closing:
                    log.info("message to node %s dropped: it is not connected", md.dst_node_id)
                    continue
                if md.message_id in self._routes:
                    log.warning("message %s is already in flight; not sent again", md.message_id)
                    continue
                self._routes[md.message_id] = _Route(message, exchange, session)
                exchange.pending.add(md.message_id)
            content = None
            if message.content is not None:
                content = shared.get(id(message.content))
                if content is None:
                    content = shared[id(message.content)] = _SharedContent(message)
            session.outbox.put(_Outgoing(message, content))

    def _forget(self, exchange: _Exchange) -> None:
        with self._lock:
            for mid in exchange.pending:
                route = self._routes.get(mid)
                if route is not None and route.exchange is exchange:
                    del self._routes[mid]
