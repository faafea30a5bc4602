"""A node's runtime: connect to the server, run the ClientApp on each message, reply.

.. code-block:: python

    client = NodeClient(client_app, "server.example.org:9092",
                        key=NodeKey.load("node-0.key"),
                        tls=ClientTls.from_file("ca.pem"),
                        node_config={"partition-id": 0, "num-partitions": 5})
    outcome = client.run()       # returns when the run is over (or the node gives up)

The node keeps one :class:`~flowerpets.core.Context` per run, so its state
persists across rounds and across reconnections. It handles one message at a
time, on a worker thread, while its connection thread keeps receiving and its
heartbeats keep flowing, so a long local training does not look like a dead
node. When the connection breaks it reconnects with exponential backoff and
jitter; the server lists it again and it joins the next round (a reply to a
message that came over a broken connection is dropped: the server has already
counted it as a dropout).

``app`` is a :class:`~flowerpets.core.ClientApp`, or a function that builds
one from the node's Context (called once per run, when the node first joins it:
the run config the server sent is then known).

:meth:`NodeClient.run` returns a :class:`ClientExit`; the exit codes are
:class:`ExitCode`.
"""

from __future__ import annotations

import itertools
import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import Final

import grpc

from flowerpets.core import ClientApp, ConfigRecord, ConfigValue, Context, Error, ErrorCode, Message
from flowerpets.core.client_app import failure_reason
from flowerpets.core.codec import CodecLimits
from flowerpets.exceptions import CodecError, FrameError, ParameterTypeError, ParameterValueError
from flowerpets.transport._auth import NodeKey, sign_frame
from flowerpets.transport._frames import (
    FRAME_ROOM,
    Bye,
    ByeCode,
    Challenge,
    Chunk,
    Frame,
    Head,
    Heartbeat,
    Reassembler,
    Welcome,
    chunk_frames,
    decode_frame,
    digest_of,
    encode_content,
    envelope_parts,
    open_envelope,
)
from flowerpets.transport.server import METHOD_PATH
from flowerpets.transport.settings import ClientSettings, ClientTls, is_loopback, split_address

__all__ = ["ClientAppSpec", "ClientExit", "ExitCode", "NodeClient"]

log = logging.getLogger("flowerpets.transport.client")

ClientAppSpec = ClientApp | Callable[[Context], ClientApp]

_TICK: Final = 0.1
_CONNECT_TIMEOUT: Final = 30.0  # waiting for the WELCOME, before the server has said more
# Refusals the server explains with a typed error: retrying would only be refused again.
_FATAL: Final = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
_PROTOCOL: Final = (
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.INTERNAL,
)


class ExitCode(IntEnum):
    """How a node's run ended (its process exit code)."""

    FINISHED = 0  # the run is over, the server shut down, or the node was told to stop
    UNREACHABLE = 1  # no connection for ClientSettings.retry_for seconds
    REFUSED = 2  # the server refused this node (unknown key, bad signature, clock)
    PROTOCOL = 3  # the server refused this node's frames or messages
    REPLACED = 4  # another process connected with this node's key


@dataclass(frozen=True, slots=True)
class ClientExit:
    code: ExitCode
    reason: str


@dataclass(frozen=True, slots=True)
class _Outcome:
    """How one connection ended: a final exit, or an error worth reconnecting after."""

    welcomed: bool
    exit: ClientExit | None = None
    error: str = ""


class _Beat:
    """Send a heartbeat now."""


_BEAT: Final = _Beat()


class NodeClient:
    """One node: its key, its app, its contexts, and the loop that keeps it connected.

    ``tls`` is required unless ``server`` is a loopback address or ``insecure``
    is set (then a warning is logged). Without ``key`` the node makes an
    ephemeral one (its id then changes with every process); a server that
    checks node keys refuses it.
    """

    def __init__(
        self,
        app: ClientAppSpec,
        server: str,
        *,
        key: NodeKey | None = None,
        tls: ClientTls | None = None,
        node_config: Mapping[str, ConfigValue] | None = None,
        settings: ClientSettings | None = None,
        insecure: bool = False,
    ) -> None:
        if not isinstance(app, ClientApp) and not callable(app):
            raise ParameterTypeError(
                f"app must be a ClientApp or a function of a Context, got {app!r}"
            )
        split_address(server)
        if tls is None and not is_loopback(server):
            if not insecure:
                raise ParameterValueError(
                    f"refusing to connect in plain text to {server}, which is not a loopback "
                    "address: give the CA certificate (--root-cert), or pass insecure=True "
                    "(--insecure) to accept eavesdropping"
                )
            log.warning(
                "INSECURE: connecting in PLAIN TEXT to %s; anyone on the network can read and "
                "alter this node's updates",
                server,
            )
        self.server = server
        self.settings = settings or ClientSettings()
        if key is None:
            key = NodeKey.generate()
            log.info("no node key given: using an ephemeral one (%s)", key.fingerprint)
        self.key = key
        self.tls = tls
        self.node_config = ConfigRecord(dict(node_config or {}))
        self._spec = app
        self._apps: dict[int, ClientApp] = {}
        self._contexts: dict[int, Context] = {}
        self._inbox: queue.SimpleQueue[tuple[Message, _Connection] | None] = queue.SimpleQueue()
        self._stop_reason: str | None = None
        self._worker: threading.Thread | None = None

    @property
    def node_id(self) -> int:
        return self.key.node_id

    def context(self, run_id: int) -> Context:
        """The node's context in run ``run_id`` (KeyError before it joined that run)."""
        return self._contexts[run_id]

    def stop(self, reason: str = "stopped") -> None:
        """Leave: the current connection is closed and :meth:`run` returns (signal-safe)."""
        if self._stop_reason is None:
            self._stop_reason = reason

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> ClientExit:
        """Connect, serve, reconnect, until the run is over or the node gives up."""
        self._worker = threading.Thread(target=self._work, name="fp-node-app", daemon=True)
        self._worker.start()
        try:
            return self._loop()
        finally:
            self._inbox.put(None)

    def _loop(self) -> ClientExit:
        settings = self.settings
        attempt = 0
        since = time.monotonic()  # the last time the node was connected (or started)
        while True:
            if self._stop_reason is not None:
                return ClientExit(ExitCode.FINISHED, f"stopped: {self._stop_reason}")
            outcome = self._connect_once()
            if outcome.exit is not None:
                return outcome.exit
            if self._stop_reason is not None:
                continue
            now = time.monotonic()
            if outcome.welcomed:
                attempt, since = 0, now
            if settings.retry_for is not None and now - since >= settings.retry_for:
                return ClientExit(
                    ExitCode.UNREACHABLE,
                    f"no connection to {self.server} for {settings.retry_for:g} s; giving up "
                    f"(last error: {outcome.error})",
                )
            wait = min(settings.retry_max, settings.retry_initial * 2**attempt)
            wait = random.uniform(wait / 2, wait)  # jitter: nodes do not return in lockstep
            attempt += 1
            log.warning(
                "connection to %s: %s; retrying in %.1f s", self.server, outcome.error, wait
            )
            end = time.monotonic() + wait
            while time.monotonic() < end and self._stop_reason is None:
                time.sleep(_TICK)

    def _channel(self) -> grpc.Channel:
        limit = 2 * (max(self.settings.max_chunk_bytes, 1 << 20) + FRAME_ROOM)
        options: list[tuple[str, int | str]] = [
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.enable_retries", 0),
        ]
        if self.tls is None:
            return grpc.insecure_channel(self.server, options=options)
        if self.tls.server_name:
            options.append(("grpc.ssl_target_name_override", self.tls.server_name))
        credentials = grpc.ssl_channel_credentials(root_certificates=self.tls.root_certificates)
        return grpc.secure_channel(self.server, credentials, options=options)

    def _connect_once(self) -> _Outcome:
        channel = self._channel()
        try:
            return _Connection(self, channel).run()
        finally:
            channel.close()

    # -- the app -------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            item = self._inbox.get()
            if item is None:
                return
            message, connection = item
            if connection.gone:
                log.info(
                    "skipping %s %r of round %d: its connection is gone",
                    message.message_type,
                    message.metadata.stage or message.message_type,
                    message.round,
                )
                continue
            reply = self._handle(message, connection)
            if connection.gone:
                log.info("dropping the reply to round %d: its connection is gone", message.round)
                continue
            connection.outbox.put(reply)

    def _handle(self, message: Message, connection: _Connection) -> Message:
        welcome = connection.welcome
        assert welcome is not None
        context = self._contexts.get(welcome.run_id)
        if context is None:
            context = Context(
                welcome.node_id,
                run_id=welcome.run_id,
                node_config=self.node_config,
                run_config=welcome.run_config,
            )
            self._contexts[welcome.run_id] = context
        try:
            app = self._app(context)
        except Exception as exc:  # the app's factory: report it, never crash the node
            log.exception("building the ClientApp failed")
            return message.error_reply(
                Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, failure_reason(exc))
            )
        return app(message, context)

    def _app(self, context: Context) -> ClientApp:
        if isinstance(self._spec, ClientApp):
            return self._spec
        app = self._apps.get(context.run_id)
        if app is None:
            app = self._spec(context)
            if not isinstance(app, ClientApp):
                raise ParameterTypeError(
                    f"the app factory returned {type(app).__name__}, not a ClientApp"
                )
            self._apps[context.run_id] = app
        return app


class _Connection:
    """One stream to the server: its HELLO, its frames each way, and its heartbeats."""

    def __init__(self, client: NodeClient, channel: grpc.Channel) -> None:
        self.client = client
        self.channel = channel
        self.outbox: queue.SimpleQueue[Message | _Beat | None] = queue.SimpleQueue()
        self.welcome: Welcome | None = None
        self.challenge: bytes | None = None
        self._challenged = threading.Event()
        self.gone = False
        self.last_received = time.monotonic()
        self.watchdog_reason = ""
        self._seq = itertools.count(1)
        settings = client.settings
        self._max_frame = settings.max_chunk_bytes + FRAME_ROOM
        # The server's HEADs carry no digest: TLS authenticates its bytes (the codec's
        # CRC still catches damage); the node's own HEADs are signed over one.
        self._reassembler = Reassembler(settings.max_message_bytes, check_digest=False)
        self._limits = CodecLimits(max_message_bytes=settings.max_message_bytes)

    # -- sending (on gRPC's request thread) ----------------------------------------------------
    def _requests(self) -> Iterator[bytes]:
        settings = self.client.settings
        while not self._challenged.wait(_TICK):  # the HELLO answers the server's challenge
            if self.gone:
                return
        assert self.challenge is not None
        hello = self.client.key.hello(
            challenge=self.challenge,
            max_chunk=settings.max_chunk_bytes,
            max_message=settings.max_message_bytes,
        )
        yield hello.encode()
        while True:
            item = self.outbox.get()
            if item is None:
                return
            if self.welcome is None:  # nothing is queued before the WELCOME; be safe anyway
                continue
            session = self.welcome.session
            if isinstance(item, _Beat):
                beat = Heartbeat(next(self._seq), int(time.time() * 1000))
                yield sign_frame(self.client.key, session, beat)
                continue
            parts = self._encode(item)
            seq = next(self._seq)
            total = sum(len(part) for part in parts)
            yield sign_frame(self.client.key, session, Head(seq, total, digest_of(parts)))
            yield from chunk_frames(seq, parts, self.welcome.max_chunk)

    def _encode(self, reply: Message) -> list[bytes]:
        assert self.welcome is not None
        limits = CodecLimits(max_message_bytes=self.welcome.max_message)
        try:
            return envelope_parts(reply, encode_content(reply, limits), limits)
        except CodecError as exc:
            log.error("the reply to round %d cannot be sent: %s", reply.round, exc)
            error = Error(ErrorCode.INVALID_REPLY, f"the reply cannot be sent: {exc}")
            return envelope_parts(Message(metadata=reply.metadata, error=error), None, limits)

    # -- receiving (on the client's thread) ----------------------------------------------------
    def run(self) -> _Outcome:
        call = self.channel.stream_stream(METHOD_PATH)(self._requests())
        watchdog = threading.Thread(
            target=self._watch, args=(call,), name="fp-node-heartbeat", daemon=True
        )
        watchdog.start()
        try:
            for raw in call:
                self.last_received = time.monotonic()
                outcome = self._on_frame(decode_frame(raw, max_frame=self._max_frame))
                if outcome is not None:
                    return outcome
            return _Outcome(self.welcome is not None, error="the server ended the connection")
        except grpc.RpcError as exc:
            return self._failed(exc)
        except CodecError as exc:  # the server sent something malformed: start afresh
            log.error("malformed data from the server: [%s] %s", type(exc).__name__, exc)
            call.cancel()
            return _Outcome(self.welcome is not None, error=f"[{type(exc).__name__}] {exc}")
        finally:
            self.gone = True
            self.outbox.put(None)
            watchdog.join(timeout=1)

    def _watch(self, call: grpc.Call) -> None:
        """Heartbeats out; cancels the call if the server falls silent or the node stops."""
        last_beat = time.monotonic()
        while not self.gone:
            time.sleep(_TICK)
            if self.client._stop_reason is not None:
                call.cancel()
                return
            now = time.monotonic()
            welcome = self.welcome
            if welcome is None:
                timeout = _CONNECT_TIMEOUT
            else:
                timeout = welcome.heartbeat_timeout_ms / 1000
                if now - last_beat >= welcome.heartbeat_interval_ms / 1000:
                    last_beat = now
                    self.outbox.put(_BEAT)
            if now - self.last_received > timeout:
                self.watchdog_reason = f"nothing from the server for {timeout:g} s"
                call.cancel()
                return

    def _on_frame(self, frame: Frame) -> _Outcome | None:
        if isinstance(frame, Challenge):
            if self.challenge is not None:
                raise FrameError("a second CHALLENGE")
            self.challenge = frame.session
            self._challenged.set()
            return None
        if isinstance(frame, Bye):  # also before the WELCOME: the server is stopping
            return self._on_bye(frame)
        if self.challenge is None:
            raise FrameError(f"a {type(frame).__name__.upper()} frame before the CHALLENGE")
        if isinstance(frame, Welcome):
            if self.welcome is not None:
                raise FrameError("a second WELCOME")
            self._on_welcome(frame)
            return None
        if self.welcome is None:
            raise FrameError(f"a {type(frame).__name__.upper()} frame before the WELCOME")
        if isinstance(frame, Head):
            self._reassembler.head(frame)
        elif isinstance(frame, Chunk):
            data = self._reassembler.chunk(frame)
            if data is not None:
                self._on_message(open_envelope(data, self._limits))
        elif not isinstance(frame, Heartbeat):
            raise FrameError(f"the server may not send a {type(frame).__name__.upper()} frame")
        return None

    def _on_welcome(self, welcome: Welcome) -> None:
        if welcome.node_id != self.client.node_id:
            log.warning(
                "the server calls this node %d; its key gives %d",
                welcome.node_id,
                self.client.node_id,
            )
        if welcome.max_chunk < 1024:
            raise FrameError(f"the server accepts chunks of {welcome.max_chunk} bytes only")
        self.welcome = welcome
        log.info(
            "joined run %d at %s as node %d (%s)",
            welcome.run_id,
            self.client.server,
            welcome.node_id,
            self.client.key.fingerprint,
        )

    def _on_message(self, message: Message) -> None:
        welcome = self.welcome
        assert welcome is not None
        md = message.metadata
        if md.dst_node_id != welcome.node_id or md.run_id != welcome.run_id:
            log.error(
                "dropping a message for node %d in run %d (this is node %d in run %d)",
                md.dst_node_id,
                md.run_id,
                welcome.node_id,
                welcome.run_id,
            )
            return
        self.client._inbox.put((message, self))

    def _on_bye(self, bye: Bye) -> _Outcome:
        if bye.code == ByeCode.REPLACED:
            exit_ = ClientExit(
                ExitCode.REPLACED, f"the server closed this connection: {bye.reason}"
            )
        else:
            exit_ = ClientExit(ExitCode.FINISHED, f"the server let this node go: {bye.reason}")
        return _Outcome(self.welcome is not None, exit=exit_)

    def _failed(self, exc: grpc.RpcError) -> _Outcome:
        code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
        details = (exc.details() if isinstance(exc, grpc.Call) else "") or ""
        welcomed = self.welcome is not None
        if self.client._stop_reason is not None:
            reason = f"stopped: {self.client._stop_reason}"
            return _Outcome(welcomed, exit=ClientExit(ExitCode.FINISHED, reason))
        if self.watchdog_reason:
            return _Outcome(welcomed, error=self.watchdog_reason)
        if code in _FATAL:
            return _Outcome(
                welcomed,
                exit=ClientExit(ExitCode.REFUSED, f"the server refused this node: {details}"),
            )
        if code in _PROTOCOL and details.startswith("["):  # the server's own typed refusal
            return _Outcome(
                welcomed,
                exit=ClientExit(ExitCode.PROTOCOL, f"the server closed the connection: {details}"),
            )
        hint = ""
        if self.client.tls is None and not welcomed and "Socket closed" in details:
            hint = " (if the server uses TLS, give its CA certificate with --root-cert)"
        elif "CERTIFICATE_VERIFY_FAILED" in details:
            hint = " (the server's certificate is not signed by the CA given with --root-cert)"
        elif "not in peer certificate" in details:
            hint = " (the server's certificate is for other names: see --server-name)"
        return _Outcome(welcomed, error=f"{code.name}: {details}{hint}")
