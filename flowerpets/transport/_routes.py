"""The gRPC service's handlers: one stream per node, from its CHALLENGE to its end.

:class:`_Routes` is mixed into :class:`~flowerpets.transport.server.TransportServer`:
it reads each connection's frames, admits the node, hands replies to the exchange
that waits for them, and watches for silent connections.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import Final

import grpc

from flowerpets.core import ConfigRecord, Error, ErrorCode, Message
from flowerpets.core.codec import CodecLimits
from flowerpets.exceptions import (
    AuthenticationError,
    CodecError,
    FrameError,
    MessageTooLargeError,
    ReplayError,
)
from flowerpets.transport._auth import Authenticator, node_id_of, verify_frame
from flowerpets.transport._frames import (
    DIGEST_BYTES,
    FRAME_ROOM,
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
    envelope_parts,
    open_envelope,
)
from flowerpets.transport._sessions import (
    _PING,
    _TICK,
    _Close,
    _drain,
    _Gone,
    _Outgoing,
    _Ping,
    _Route,
    _Session,
)
from flowerpets.transport.settings import ServerSettings

log = logging.getLogger("flowerpets.transport.server")

_STALL: Final = 1.0  # a longer gap between the monitor's ticks: the process did not run
_CANCEL_AFTER: Final = 1.0  # seconds a killed session's sender has to end its stream itself


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


class _Routes:
    """The stream handler and the monitor, over the state of the server they are mixed into."""

    settings: ServerSettings
    run_id: int
    run_config: ConfigRecord
    _welcome_bytes: int
    _auth: Authenticator
    _max_frame: int
    _lock: threading.Lock
    _all: set[_Session]
    _sessions: dict[int, _Session]  # authenticated, by node id
    _routes: dict[str, _Route]  # by request message id
    _dying: dict[_Session, float]  # killed sessions -> when to cancel their RPC
    _totals: dict[str, int]
    _connections: int
    _refused: int
    _stop_reason: str | None
    _goodbye: Bye | None
    _stopped: threading.Event

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
