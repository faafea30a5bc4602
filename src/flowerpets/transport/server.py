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
  for them in :meth:`TransportGrid.node_ids`, instead of failing at once; a
  paused server does not count its own pause as its nodes' silence;
* :meth:`TransportServer.request_stop` (the CLI calls it on SIGTERM) makes the
  current exchange raise :class:`~flowerpets.exceptions.StopRunError`, which
  the ServerApp turns into an early, orderly end of the run; :meth:`stop`
  then tells every node why it is being let go.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import secrets
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import TracebackType
from typing import Final

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from flowerpets.core import ConfigRecord, ConfigValue, Error, ErrorCode, Message
from flowerpets.core.codec import CodecLimits
from flowerpets.exceptions import (
    AuthenticationError,
    CodecError,
    FrameError,
    MessageTooLargeError,
    ReplayError,
    StopRunError,
)
from flowerpets.transport._auth import Authenticator, node_id_of, verify_frame
from flowerpets.transport._frames import (
    DIGEST_BYTES,
    FRAME_ROOM,
    SESSION_BYTES,
    Bye,
    ByeCode,
    Challenge,
    Chunk,
    Frame,
    Head,
    Heartbeat,
    Hello,
    Reassembler,
    Welcome,
    chunk_frames,
    decode_frame,
    encode_content,
    envelope_parts,
    open_envelope,
)
from flowerpets.transport.settings import ServerSettings, ServerTls, is_loopback, split_address

__all__ = ["METHOD_PATH", "TransportGrid", "TransportServer", "TransportStats"]

log = logging.getLogger("flowerpets.transport.server")

SERVICE: Final = "flowerpets.transport.v1.Fleet"
METHOD: Final = "Connect"
METHOD_PATH: Final = f"/{SERVICE}/{METHOD}"
_TICK: Final = 0.2  # how often waits wake up to look at the stop flag and the clocks
_STALL: Final = 1.0  # a longer gap between the monitor's ticks: the process did not run
_CANCEL_AFTER: Final = 1.0  # seconds a killed session's sender has to end its stream itself
_CONTENT_LIMITS: Final = CodecLimits()  # each node's own limit is checked on the whole envelope


def _label(exc: BaseException) -> str:
    return f"[{type(exc).__name__}] {exc}"


# What a refusal looks like to the node: the gRPC status it gets.
_STATUS: Final[dict[type[BaseException], grpc.StatusCode]] = {
    ReplayError: grpc.StatusCode.UNAUTHENTICATED,
    AuthenticationError: grpc.StatusCode.UNAUTHENTICATED,
    MessageTooLargeError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    FrameError: grpc.StatusCode.INVALID_ARGUMENT,
    CodecError: grpc.StatusCode.INVALID_ARGUMENT,
}


def _status_of(exc: BaseException) -> grpc.StatusCode:
    for kind in type(exc).__mro__:
        if kind in _STATUS:
            return _STATUS[kind]
    return grpc.StatusCode.INTERNAL


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


# -- what moves through a session's outbox ---------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _Close:
    reason: str
    status: grpc.StatusCode | None = None  # None: end with OK (after the BYE, if any)
    bye: Bye | None = None


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


def _welcome_size(run_config: ConfigRecord, settings: ServerSettings) -> int:
    """The WELCOME's size with ``run_config``; a ValueError if no node could receive it.

    The run config travels in the WELCOME, one frame, which must fit in one chunk
    of the server's (``max_chunk_bytes``) plus the frame room; else every node
    would refuse the frame, and retry, without ever joining.
    """
    try:
        frame = Welcome(0, 0, bytes(SESSION_BYTES), 0, 0, 0, 0, run_config).encode()
    except CodecError as exc:
        raise ValueError(f"the run config cannot be encoded: {exc}") from None
    size, limit = len(frame), settings.max_chunk_bytes + FRAME_ROOM
    if size <= limit:
        try:
            decode_frame(frame, max_frame=limit)  # as every node will
        except CodecError as exc:
            raise ValueError(f"no node could read the run config: {exc}") from None
    else:
        raise ValueError(
            f"the run config takes {size} bytes, and the WELCOME frame that carries it to "
            f"every node may take at most {limit} (max_chunk_bytes={settings.max_chunk_bytes} "
            f"plus {FRAME_ROOM}): no node could join. Send large data in messages, not in the "
            "run config"
        )
    return size


def _drain(outbox: queue.SimpleQueue[_Item]) -> None:
    while True:
        try:
            outbox.get_nowait()
        except queue.Empty:
            return


class TransportServer:
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
                raise ValueError(
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
                raise ValueError(
                    f"refusing to accept any node on {address}, which is not a loopback "
                    "address: give the nodes' public keys (--node-keys), or pass insecure=True "
                    "(--insecure) to let anyone join"
                )
            log.warning("INSECURE: node authentication is OFF on %s; any node can join", address)
        elif node_keys is None:
            log.info("node authentication is off (loopback only): any node key is accepted")
        if node_keys is not None and not node_keys:
            raise ValueError("node_keys is empty: no node could join")
        if run_id is None:
            run_id = secrets.randbits(63) or 1
        if isinstance(run_id, bool) or not isinstance(run_id, int) or not 0 < run_id < 2**63:
            raise ValueError(f"run_id must be an integer in [1, 2**63), got {run_id!r}")
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
            raise RuntimeError("the server is already started")
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
            raise OSError(f"cannot listen on {self.address}: {exc}") from None
        if self._port == 0:
            raise OSError(f"cannot listen on {self.address} (in use, or not a local address?)")
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

    # -- one connection ------------------------------------------------------------------------
    def _connect(
        self, request_iterator: Iterator[bytes], context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        """The stream handler: reads on a thread of its own, sends from the outbox here."""
        session = _Session(peer=context.peer(), context=context)
        with self._lock:
            self._all.add(session)
            self._connections += 1
        context.add_callback(lambda: self._end(session, "the connection ended"))
        reader = threading.Thread(
            target=self._read, args=(session, request_iterator), name="fp-read", daemon=True
        )
        reader.start()
        try:
            goodbye = self._goodbye
            if goodbye is None and self._stop_reason is not None:
                goodbye = Bye(ByeCode.SHUTDOWN, self._stop_reason)
            if goodbye is not None:  # a node that connects while the server stops: only BYE
                session.close(_Close(goodbye.reason, bye=goodbye))
            else:
                frame = Challenge(session.id).encode()  # a HELLO must answer this connection
                session.bytes_sent += len(frame)
                yield frame
            while True:
                item = session.outbox.get()
                if isinstance(item, _Close):
                    if item.bye is not None:
                        frame = item.bye.encode()
                        session.bytes_sent += len(frame)
                        yield frame
                    if item.status is not None:
                        context.abort(item.status, item.reason)
                    return
                if session.ended.is_set():
                    return
                if isinstance(item, _Ping):
                    item = Heartbeat(next(session.downlink_seq), int(time.time() * 1000)).encode()
                if isinstance(item, bytes):
                    session.bytes_sent += len(item)
                    yield item
                    continue
                for frame in self._frames_of(session, item):
                    session.bytes_sent += len(frame)
                    yield frame
        finally:
            session.finished.set()
            self._end(session, "the connection ended")
            _drain(session.outbox)  # what was queued for a node that is gone (a model, say)

    def _frames_of(self, session: _Session, outgoing: _Outgoing) -> Iterator[bytes]:
        """HEAD and CHUNKs of a message, unless its exchange gave up on it before it left."""
        message = outgoing.message
        with self._lock:
            route = self._routes.get(message.metadata.message_id)
        if route is None or route.session is not session:
            return
        try:
            content = outgoing.content.get() if outgoing.content is not None else None
            limits = CodecLimits(max_message_bytes=session.max_message)
            parts = envelope_parts(message, content, limits)
        except CodecError as exc:
            log.error("cannot send a message to %s: %s", session.name(), _label(exc))
            reply = message.error_reply(
                Error(ErrorCode.UNKNOWN, f"the server could not send this message: {_label(exc)}")
            )
            self._resolve(session, reply, trusted=True)
            return
        seq = next(session.downlink_seq)
        total = sum(len(part) for part in parts)
        yield Head(seq, total, bytes(DIGEST_BYTES)).encode()  # TLS covers what we send
        yield from chunk_frames(seq, parts, session.max_chunk)
        session.messages_sent += 1

    def _read(self, session: _Session, frames: Iterator[bytes]) -> None:
        """Everything a connection receives, on its own thread; any violation closes it."""
        try:
            for raw in frames:
                session.last_seen = time.monotonic()
                session.bytes_received += len(raw)
                self._on_frame(session, decode_frame(raw, max_frame=self._max_frame))
                if session.closing:
                    return
        except grpc.RpcError as exc:  # the stream was cancelled or broke: the node is gone
            # gRPC keeps this error in the call's state; its traceback holds this frame, and
            # so the session: a cycle that only the cycle collector would free. Cut it.
            exc.__traceback__ = None
        except (AuthenticationError, CodecError) as exc:
            if not session.ended.is_set():  # else: what was left of a message already released
                self._refuse(session, exc)
            return
        except Exception as exc:  # a bug here must cost one connection, never the server
            log.exception("internal error on %s", session.name())
            session.close(_Close(f"internal error: {_label(exc)}", grpc.StatusCode.INTERNAL))
            return
        self._end(session, "the node closed its connection")

    def _refuse(self, session: _Session, exc: BaseException) -> None:
        status = _status_of(exc)
        if session.authenticated:
            log.error("closing the connection of %s: %s", session.name(), _label(exc))
        else:
            log.warning("refused the %s: %s", session.name(), _label(exc))
        with self._lock:
            self._refused += 1
        session.close(_Close(_label(exc), status))
        self._end(session, f"refused: {_label(exc)}")

    def _on_frame(self, session: _Session, frame: Frame) -> None:
        if isinstance(frame, Hello):
            if session.authenticated:
                raise FrameError("a second HELLO on one connection")
            self._on_hello(session, frame)
            return
        if not session.authenticated:
            raise AuthenticationError(
                f"a {type(frame).__name__.upper()} frame before an accepted HELLO"
            )
        if isinstance(frame, Head | Heartbeat):
            if frame.seq <= session.uplink_seq:
                raise ReplayError(
                    f"{type(frame).__name__.upper()} frame {frame.seq} after frame "
                    f"{session.uplink_seq}: a replayed or reordered request"
                )
            assert session.public_key is not None
            verify_frame(session.public_key, session.id, frame)
            session.uplink_seq = frame.seq
            if isinstance(frame, Head):
                assert session.reassembler is not None
                session.reassembler.head(frame)
            return
        if isinstance(frame, Chunk):
            assert session.reassembler is not None
            data = session.reassembler.chunk(frame)
            if data is not None:
                limits = CodecLimits(max_message_bytes=self.settings.max_message_bytes)
                reply = open_envelope(data, limits)
                session.messages_received += 1
                self._resolve(session, reply, trusted=False)
            return
        raise FrameError(f"a node may not send a {type(frame).__name__.upper()} frame")

    def _on_hello(self, session: _Session, hello: Hello) -> None:
        public = self._auth.verify_hello(hello, challenge=session.id)
        if hello.max_chunk < 1024 or hello.max_message < 1024:
            raise FrameError(
                f"the node accepts chunks of {hello.max_chunk} and messages of "
                f"{hello.max_message} bytes; both must be at least 1024"
            )
        if self._welcome_bytes > hello.max_chunk + FRAME_ROOM:
            raise FrameError(
                f"the run config makes a WELCOME frame of {self._welcome_bytes} bytes, and this "
                f"node accepts frames of {hello.max_chunk + FRAME_ROOM} bytes at most: give it "
                "a larger max-chunk"
            )
        node_id = node_id_of(hello.public_key)
        session.public_key = public
        session.label = self._auth.label(hello.public_key)
        session.max_chunk = min(self.settings.max_chunk_bytes, hello.max_chunk)
        session.max_message = hello.max_message
        session.reassembler = Reassembler(self.settings.max_message_bytes)
        welcome = Welcome(
            node_id=node_id,
            run_id=self.run_id,
            session=session.id,
            heartbeat_interval_ms=int(self.settings.heartbeat_interval * 1000),
            heartbeat_timeout_ms=int(self.settings.heartbeat_timeout * 1000),
            max_chunk=self.settings.max_chunk_bytes,
            max_message=self.settings.max_message_bytes,
            run_config=self.run_config,
        )
        session.outbox.put(welcome.encode())  # before any message can be routed to it
        with self._lock:
            if session.ended.is_set():
                return
            previous = self._sessions.get(node_id)
            session.node_id = node_id
            self._sessions[node_id] = session
        log.info("%s joined", session.name())
        if previous is not None:
            reason = "a newer connection with the same node key replaced this one"
            log.warning("%s reconnected; closing its previous connection", session.name())
            previous.close(_Close(reason, bye=Bye(ByeCode.REPLACED, reason)))
            self._end(previous, reason)

    def _resolve(self, session: _Session, reply: Message, *, trusted: bool) -> None:
        """Hand ``reply`` to the exchange that waits for it, after checking who sent it.

        A node may answer only requests that were sent to it over this very
        connection, as itself, in this run; anything else closes the connection
        (the request then counts as unanswered).
        """
        md = reply.metadata
        if not trusted and (
            md.src_node_id != session.node_id or md.dst_node_id != 0 or md.run_id != self.run_id
        ):
            raise AuthenticationError(
                f"a message from node {session.node_id} claims to be from node {md.src_node_id} "
                f"to node {md.dst_node_id} in run {md.run_id} (this is run {self.run_id})"
            )
        with self._lock:
            route = self._routes.get(md.reply_to_message_id)
        if route is None or route.session is not session:
            log.info(
                "%s: dropping a reply to %s, which no exchange waits for (late, or unknown)",
                session.name(),
                md.reply_to_message_id or "nothing",
            )
            return
        if not trusted and not reply.is_reply_to(route.request):
            raise AuthenticationError(
                f"a message from node {session.node_id} does not answer the request it names "
                f"(round {md.round}, type {md.message_type!r})"
            )
        with self._lock:
            if self._routes.get(md.reply_to_message_id) is not route:
                return  # the exchange gave up on it meanwhile
            del self._routes[md.reply_to_message_id]
        route.exchange.arrived.put(reply)

    def _end(self, session: _Session, reason: str) -> None:
        """The session is over: unlist it and tell its exchanges (idempotent)."""
        with self._lock:
            if session.ended.is_set():
                return
            session.ended.set()
            session.closing = True
            self._all.discard(session)
            if session.authenticated and self._sessions.get(session.node_id) is session:
                del self._sessions[session.node_id]
            lost = [mid for mid, route in self._routes.items() if route.session is session]
            routes = [self._routes.pop(mid) for mid in lost]
            self._totals["bytes_sent"] += session.bytes_sent
            self._totals["bytes_received"] += session.bytes_received
            self._totals["sent"] += session.messages_sent
            self._totals["received"] += session.messages_received
        if session.reassembler is not None:
            session.reassembler.release()  # a partial message must not outlive its connection
        session.outbox.put(_Close(reason))  # wake the sender if it waits
        if session.authenticated:  # logged before the waiting exchanges learn of it
            level = logging.WARNING if routes else logging.INFO
            log.log(
                level,
                "%s left: %s%s",
                session.name(),
                reason,
                f" ({len(routes)} message(s) unanswered)" if routes else "",
            )
        for mid, route in zip(lost, routes, strict=True):
            route.exchange.arrived.put(_Gone(mid))

    def _watch(self) -> None:
        """Pings idle nodes, and ends connections that went silent or never authenticated."""
        settings = self.settings
        last_tick = time.monotonic()
        while not self._stopped.wait(_TICK):
            now = time.monotonic()
            stalled, last_tick = now - last_tick - _TICK, now
            with self._lock:
                sessions = list(self._all)
            if stalled > _STALL:
                # This process did not run (SIGSTOP, a suspended VM, a starved machine): the
                # nodes' frames wait unread in its buffers. Their silence is the server's own.
                log.warning(
                    "the server did not run for %.1f s; that time does not count as its "
                    "nodes' silence",
                    stalled,
                )
                for session in sessions:
                    session.last_seen = min(now, session.last_seen + stalled)
                    session.started = min(now, session.started + stalled)
            with self._lock:
                dying = [s for s, at in self._dying.items() if s.finished.is_set() or now >= at]
                for session in dying:
                    del self._dying[session]
            for session in dying:
                if not session.finished.is_set():
                    session.context.cancel()
            for session in sessions:
                if session.ended.is_set():
                    continue
                if not session.authenticated:
                    if now - session.started > settings.hello_timeout:
                        self._kill(session, f"no HELLO within {settings.hello_timeout:g} s")
                    continue
                silent = now - session.last_seen
                if silent > settings.heartbeat_timeout:
                    self._kill(
                        session,
                        f"nothing received for {silent:.1f} s (heartbeat timeout "
                        f"{settings.heartbeat_timeout:g} s): the node died or hangs",
                    )
                elif now - session.last_ping >= settings.heartbeat_interval:
                    session.last_ping = now
                    session.outbox.put(_PING)

    def _kill(self, session: _Session, reason: str) -> None:
        """End a session at once; its RPC is cancelled if its sender cannot say why in time.

        The exchanges stop waiting for the node now. The sender gets a moment to
        close the stream with ``reason``; if it is stuck (sending to a stopped
        peer whose window is full), the watch cancels the RPC under it.
        """
        log.warning("dropping the %s: %s", session.name(), reason)
        session.close(_Close(reason, grpc.StatusCode.UNAVAILABLE))
        self._end(session, reason)
        with self._lock:
            self._dying[session] = time.monotonic() + _CANCEL_AFTER

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


class TransportGrid:
    """The :class:`~flowerpets.core.Grid` of a :class:`TransportServer`.

    :meth:`node_ids` lists the connected nodes (sorted by id). A message to a
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

    def node_ids(self) -> list[int]:
        """The connected nodes, once ``settings.min_nodes`` are (waiting for them, bounded).

        A round asks for its nodes here: after an outage (every node missed its
        heartbeats, or the server was paused and they reconnect) it waits up to
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
