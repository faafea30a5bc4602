"""The transport's frames: what one gRPC stream message carries (version 2).

A node keeps one bidirectional gRPC stream open to the server. Every stream
message is one *frame*, raw bytes (no protobuf), laid out as below; all integers
are little-endian and fixed-width. A :class:`~flowerpets.core.Message` travels
as one HEAD frame announcing its length and SHA-256 digest, then CHUNK frames of
at most ``max_chunk`` bytes each, in order; the message's bytes are the core
codec's Message frame (:func:`~flowerpets.core.codec.encode_message`), never
pickle.

Frame::

    0   4  magic b"FPTX"
    4   1  version u8 = 2
    5   1  kind u8 (Kind)
    6   .. body

Bodies::

    CHALLENGE  (server -> node, the first frame of every connection)
               session 16: the random id the server chose for this connection
    HELLO      (node -> server, signed)
               public_key 32 | timestamp_ms i64 | nonce 16 | max_chunk u32 |
               max_message u64 | challenge 16 (the CHALLENGE's session) |
               signature 64
    WELCOME    (server -> node)
               node_id u64 | run_id u64 | session 16 | heartbeat_interval_ms u32 |
               heartbeat_timeout_ms u32 | max_chunk u32 | max_message u64 |
               run_config: u32 n | n bytes (a codec RecordDict frame holding one
               ConfigRecord "run-config")
    HEAD       seq u64 | total u64 | digest 32 | signature 64
               node -> server: the SHA-256 of the message's bytes, and the
               signature, which so covers every chunk; server -> node: both
               zeros (TLS authenticates the server's bytes, and the codec's CRC
               still catches damage)
    CHUNK      seq u64 (the HEAD's) | offset u64 | data (the rest of the frame)
    HEARTBEAT  seq u64 | timestamp_ms i64 | signature 64 (zeros server -> node)
    BYE        (server -> node) code u8 (ByeCode) | reason: u32 n | n bytes UTF-8

The bytes a HEAD announces (a message's *envelope*)::

    n u32 | n bytes: a codec Message frame holding the metadata, and either the
            error or an empty RecordDict | the rest: a codec RecordDict frame
            holding the content (nothing for an error message)

The content travels in a frame of its own so that a server sending one model to
a whole cohort encodes it once, not once per node: only the small metadata
frame differs from node to node (see :func:`envelope_parts`).

A signed frame's signature is an Ed25519 signature over a domain string, the
session id (HEAD and HEARTBEAT only) and the frame's bytes before the signature
(see :mod:`flowerpets.transport._auth`). A HELLO signs the connection's session
id too, as its ``challenge``: a HELLO answers one connection of one server's
life, so a HELLO recorded anywhere is refused by every other connection, also
by a restarted server. HEAD and HEARTBEAT share one sequence counter per
direction, which must strictly increase.

:func:`decode_frame` checks the frame against ``max_frame`` first
(:class:`~flowerpets.exceptions.MessageTooLargeError`) and raises
:class:`~flowerpets.exceptions.FrameError` for anything malformed, naming what
and where; it never raises anything else on bad bytes.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Final

from flowerpets.core.codec import (
    CodecLimits,
    decode_message,
    decode_record_dict,
    encode_message,
    encode_record_dict,
)
from flowerpets.core.message import Message
from flowerpets.core.records import ConfigRecord, RecordDict
from flowerpets.exceptions import (
    CodecError,
    CorruptMessageError,
    FrameError,
    MessageTooLargeError,
    RecordTypeError,
    TruncatedMessageError,
)

__all__ = [
    "CHUNK_OVERHEAD",
    "DIGEST_BYTES",
    "FRAME_ROOM",
    "MAGIC",
    "SIGNATURE_BYTES",
    "VERSION",
    "Bye",
    "ByeCode",
    "Challenge",
    "Chunk",
    "Frame",
    "Head",
    "Heartbeat",
    "Hello",
    "Kind",
    "Reassembler",
    "Welcome",
    "chunk_frames",
    "decode_frame",
    "digest",
    "digest_of",
    "encode_content",
    "envelope_parts",
    "open_envelope",
]

MAGIC: Final = b"FPTX"
VERSION: Final = 2  # 2: the CHALLENGE frame, and HELLO answers it
KEY_BYTES: Final = 32
NONCE_BYTES: Final = 16
SESSION_BYTES: Final = 16
DIGEST_BYTES: Final = 32
SIGNATURE_BYTES: Final = 64
MAX_REASON_BYTES: Final = 4096
NO_SIGNATURE: Final = bytes(SIGNATURE_BYTES)

_HEADER: Final = struct.Struct("<4sBB")
_HELLO: Final = struct.Struct(f"<{KEY_BYTES}sq{NONCE_BYTES}sIQ{SESSION_BYTES}s")
_WELCOME: Final = struct.Struct(f"<QQ{SESSION_BYTES}sIIIQI")
_HEAD: Final = struct.Struct(f"<QQ{DIGEST_BYTES}s")
_CHUNK: Final = struct.Struct("<QQ")
_HEARTBEAT: Final = struct.Struct("<Qq")
_BYE: Final = struct.Struct("<BI")
_CHALLENGE: Final = struct.Struct(f"<{SESSION_BYTES}s")

CHUNK_OVERHEAD: Final = _HEADER.size + _CHUNK.size  # 22 bytes around each chunk's data
# The run config in a WELCOME may decode into this many times its bytes (a list of bools
# takes 25 times): the frame itself is bounded by max_chunk, so this bounds the objects.
WELCOME_AMPLIFICATION: Final = 32
# Room for a frame's header on top of max_chunk: every frame but CHUNK and WELCOME is small.
FRAME_ROOM: Final = 4096


class Kind(IntEnum):
    HELLO = 1
    WELCOME = 2
    HEAD = 3
    CHUNK = 4
    HEARTBEAT = 5
    BYE = 6
    CHALLENGE = 7


class ByeCode(IntEnum):
    """Why the server ends a node's connection in an orderly way."""

    RUN_FINISHED = 1  # the run is over: the node exits
    SHUTDOWN = 2  # the server is shutting down (for example on SIGTERM): the node exits
    REPLACED = 3  # a newer connection with the same node key took this one's place


def digest(data: bytes | bytearray | memoryview) -> bytes:
    """The SHA-256 digest of ``data`` (see :func:`digest_of` for a message in parts)."""
    return hashlib.sha256(data).digest()


def _header(kind: Kind) -> bytes:
    return _HEADER.pack(MAGIC, VERSION, kind)


@dataclass(frozen=True, slots=True)
class Hello:
    """A node's signed request to join: who it is, when, and what it can receive."""

    public_key: bytes
    timestamp_ms: int
    nonce: bytes
    max_chunk: int
    max_message: int
    challenge: bytes  # the session id of the CHALLENGE this HELLO answers
    signature: bytes = NO_SIGNATURE

    def prefix(self) -> bytes:
        """The frame's bytes before the signature: what the signature covers."""
        return _header(Kind.HELLO) + _HELLO.pack(
            self.public_key,
            self.timestamp_ms,
            self.nonce,
            self.max_chunk,
            self.max_message,
            self.challenge,
        )

    def encode(self) -> bytes:
        return self.prefix() + self.signature


@dataclass(frozen=True, slots=True)
class Challenge:
    """The server's first frame on a connection: the session id a HELLO must sign."""

    session: bytes

    def encode(self) -> bytes:
        return _header(Kind.CHALLENGE) + _CHALLENGE.pack(self.session)


@dataclass(frozen=True, slots=True)
class Welcome:
    """The server's answer to an accepted HELLO: the node's id, the run, and the rules."""

    node_id: int
    run_id: int
    session: bytes
    heartbeat_interval_ms: int
    heartbeat_timeout_ms: int
    max_chunk: int
    max_message: int
    run_config: ConfigRecord = field(default_factory=ConfigRecord)

    def encode(self) -> bytes:
        config = encode_record_dict(RecordDict({"run-config": self.run_config}))
        return (
            _header(Kind.WELCOME)
            + _WELCOME.pack(
                self.node_id,
                self.run_id,
                self.session,
                self.heartbeat_interval_ms,
                self.heartbeat_timeout_ms,
                self.max_chunk,
                self.max_message,
                len(config),
            )
            + config
        )


@dataclass(frozen=True, slots=True)
class Head:
    """The start of a message: its sequence number, length and digest."""

    seq: int
    total: int
    digest: bytes
    signature: bytes = NO_SIGNATURE

    def prefix(self) -> bytes:
        return _header(Kind.HEAD) + _HEAD.pack(self.seq, self.total, self.digest)

    def encode(self) -> bytes:
        return self.prefix() + self.signature


@dataclass(frozen=True, slots=True)
class Chunk:
    """``data`` at ``offset`` of the message announced by HEAD ``seq``."""

    seq: int
    offset: int
    data: bytes | memoryview

    def encode(self) -> bytes:
        return b"".join((_header(Kind.CHUNK), _CHUNK.pack(self.seq, self.offset), self.data))


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """I am alive (node -> server: signed; server -> node: a ping)."""

    seq: int
    timestamp_ms: int
    signature: bytes = NO_SIGNATURE

    def prefix(self) -> bytes:
        return _header(Kind.HEARTBEAT) + _HEARTBEAT.pack(self.seq, self.timestamp_ms)

    def encode(self) -> bytes:
        return self.prefix() + self.signature


@dataclass(frozen=True, slots=True)
class Bye:
    """The server ends the connection in an orderly way, saying why."""

    code: ByeCode
    reason: str = ""

    def encode(self) -> bytes:
        reason = self.reason.encode("utf-8", "replace")[:MAX_REASON_BYTES]
        return _header(Kind.BYE) + _BYE.pack(self.code, len(reason)) + reason


Frame = Challenge | Hello | Welcome | Head | Chunk | Heartbeat | Bye


# -- decoding -------------------------------------------------------------------------------------
def _exact(body: memoryview, size: int, kind: Kind) -> None:
    if len(body) != size:
        raise FrameError(f"{kind.name} frame body is {len(body)} bytes, expected {size}")


def _at_least(body: memoryview, size: int, kind: Kind) -> None:
    if len(body) < size:
        raise FrameError(f"{kind.name} frame body is {len(body)} bytes, needs at least {size}")


def _hello(body: memoryview) -> Hello:
    _exact(body, _HELLO.size + SIGNATURE_BYTES, Kind.HELLO)
    key, ts, nonce, max_chunk, max_message, challenge = _HELLO.unpack_from(body)
    return Hello(key, ts, nonce, max_chunk, max_message, challenge, bytes(body[_HELLO.size :]))


def _challenge(body: memoryview) -> Challenge:
    _exact(body, _CHALLENGE.size, Kind.CHALLENGE)
    return Challenge(bytes(body))


def _welcome(body: memoryview) -> Welcome:
    _at_least(body, _WELCOME.size, Kind.WELCOME)
    node, run, session, interval, timeout, max_chunk, max_message, n = _WELCOME.unpack_from(body)
    _exact(body, _WELCOME.size + n, Kind.WELCOME)
    try:
        limits = CodecLimits(
            max_message_bytes=max(n, 1), max_decoded_bytes=WELCOME_AMPLIFICATION * n + (1 << 20)
        )
        records = decode_record_dict(body[_WELCOME.size :], limits=limits)
        config = records.get_typed("run-config", ConfigRecord)
    except (CodecError, KeyError, RecordTypeError) as exc:
        raise FrameError(f"WELCOME frame: the run config does not decode: {exc}") from None
    return Welcome(node, run, session, interval, timeout, max_chunk, max_message, config)


def _head(body: memoryview) -> Head:
    _exact(body, _HEAD.size + SIGNATURE_BYTES, Kind.HEAD)
    seq, total, dig = _HEAD.unpack_from(body)
    return Head(seq, total, dig, bytes(body[_HEAD.size :]))


def _chunk(body: memoryview) -> Chunk:
    _at_least(body, _CHUNK.size, Kind.CHUNK)
    seq, offset = _CHUNK.unpack_from(body)
    return Chunk(seq, offset, body[_CHUNK.size :])


def _heartbeat(body: memoryview) -> Heartbeat:
    _exact(body, _HEARTBEAT.size + SIGNATURE_BYTES, Kind.HEARTBEAT)
    seq, ts = _HEARTBEAT.unpack_from(body)
    return Heartbeat(seq, ts, bytes(body[_HEARTBEAT.size :]))


def _bye(body: memoryview) -> Bye:
    _at_least(body, _BYE.size, Kind.BYE)
    code, n = _BYE.unpack_from(body)
    if n > MAX_REASON_BYTES:
        raise FrameError(f"BYE frame reason is {n} bytes, more than {MAX_REASON_BYTES}")
    _exact(body, _BYE.size + n, Kind.BYE)
    try:
        bye_code = ByeCode(code)
    except ValueError:
        raise FrameError(f"BYE frame has an unknown code {code}") from None
    return Bye(bye_code, str(body[_BYE.size :], "utf-8", "replace"))


_DECODERS: Final[dict[Kind, Callable[[memoryview], Frame]]] = {
    Kind.HELLO: _hello,
    Kind.WELCOME: _welcome,
    Kind.HEAD: _head,
    Kind.CHUNK: _chunk,
    Kind.HEARTBEAT: _heartbeat,
    Kind.BYE: _bye,
    Kind.CHALLENGE: _challenge,
}


def decode_frame(data: bytes | memoryview, *, max_frame: int) -> Frame:
    """Decode one frame of at most ``max_frame`` bytes (a CHUNK's data is a view of ``data``)."""
    if len(data) > max_frame:
        raise MessageTooLargeError(
            f"a frame of {len(data)} bytes is more than the limit of {max_frame} bytes "
            "(max-chunk plus the frame header)"
        )
    view = memoryview(data)
    if len(view) < _HEADER.size:
        raise FrameError(f"a frame of {len(view)} bytes is shorter than the 6-byte header")
    magic, version, kind = _HEADER.unpack_from(view)
    if magic != MAGIC:
        raise FrameError(f"bad magic {bytes(magic)!r} at byte offset 0, expected {MAGIC!r}")
    if version != VERSION:
        raise FrameError(f"frame version {version}; this build speaks version {VERSION} only")
    try:
        decoder = _DECODERS[Kind(kind)]
    except ValueError:
        raise FrameError(f"unknown frame kind {kind} at byte offset 5") from None
    return decoder(view[_HEADER.size :])


# -- messages as envelopes and chunks -------------------------------------------------------------
_ENVELOPE: Final = struct.Struct("<I")


def encode_content(message: Message, limits: CodecLimits) -> bytes | None:
    """The content frame of ``message``'s envelope (None for an error message)."""
    return None if message.content is None else encode_record_dict(message.content, limits=limits)


def envelope_parts(message: Message, content: bytes | None, limits: CodecLimits) -> list[bytes]:
    """``message``'s envelope, in parts; ``content`` is :func:`encode_content`'s, maybe shared.

    The parts are not joined: :func:`chunk_frames` cuts chunks across them, so
    a large content frame is never copied into a per-node buffer.
    """
    shell = message if message.content is None else replace_content(message, RecordDict())
    meta = encode_message(shell, limits=limits)
    parts = [_ENVELOPE.pack(len(meta)), meta]
    if content is not None:
        parts.append(content)
    size = sum(len(p) for p in parts)
    if size > limits.max_message_bytes:
        raise MessageTooLargeError(
            f"the message is {size} bytes, more than max_message_bytes={limits.max_message_bytes}"
        )
    return parts


def replace_content(message: Message, content: RecordDict) -> Message:
    return Message(metadata=message.metadata, content=content)


def open_envelope(data: bytes | bytearray, limits: CodecLimits) -> Message:
    """The message in an envelope; a :class:`CodecError` subclass if it is malformed.

    Arrays in the content are read-only views of ``data`` (no copy).
    """
    view = memoryview(data)
    if len(view) < _ENVELOPE.size:
        raise TruncatedMessageError(f"an envelope of {len(view)} bytes ends inside its header")
    (n,) = _ENVELOPE.unpack_from(view)
    if _ENVELOPE.size + n > len(view):
        raise TruncatedMessageError(
            f"the envelope's metadata frame of {n} bytes runs past its {len(view)} bytes"
        )
    shell = decode_message(view[_ENVELOPE.size : _ENVELOPE.size + n], limits=limits)
    rest = view[_ENVELOPE.size + n :]
    if shell.error is not None:
        if len(rest):
            raise CorruptMessageError(
                f"an error message carries {len(rest)} bytes of content after its metadata"
            )
        return shell
    if len(shell.require_content()):
        raise CorruptMessageError("the envelope's metadata frame carries records itself")
    return replace_content(shell, decode_record_dict(rest, limits=limits))


def chunk_frames(seq: int, parts: Sequence[bytes], max_chunk: int) -> Iterator[bytes]:
    """The CHUNK frames carrying ``parts`` back to back (one chunk is built at a time)."""
    offset, size = 0, 0
    pending: list[bytes | memoryview] = []
    for part in parts:
        view = memoryview(part)
        while len(view):
            take = min(len(view), max_chunk - size)
            pending.append(view[:take])
            view = view[take:]
            size += take
            if size == max_chunk:
                yield b"".join([_header(Kind.CHUNK), _CHUNK.pack(seq, offset), *pending])
                offset, size, pending = offset + size, 0, []
    if size:
        yield b"".join([_header(Kind.CHUNK), _CHUNK.pack(seq, offset), *pending])


def digest_of(parts: Sequence[bytes]) -> bytes:
    """The SHA-256 digest of ``parts`` back to back (what a node's HEAD announces and signs)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part)
    return h.digest()


class Reassembler:
    """Rebuilds messages from HEAD and CHUNK frames, with a bound on their size.

    A new HEAD before the previous message is complete, a chunk of another
    message, a chunk at the wrong offset or past the announced length, and
    (with ``check_digest``) a digest that does not match the bytes all raise
    :class:`FrameError`; a HEAD announcing more than ``max_message`` bytes
    raises :class:`MessageTooLargeError` before anything is allocated.
    """

    __slots__ = ("_buffer", "_hash", "_head", "check_digest", "max_message")

    def __init__(self, max_message: int, *, check_digest: bool = True) -> None:
        self.max_message = max_message
        self.check_digest = check_digest
        self._head: Head | None = None
        self._buffer = bytearray()
        self._hash = hashlib.sha256()

    def release(self) -> None:
        """Drop a partial message (the connection ended): its memory is freed now."""
        self._head = None
        self._buffer = bytearray()
        self._hash = hashlib.sha256()

    @property
    def busy(self) -> bool:
        """True while a message has been announced and not completed."""
        return self._head is not None

    def head(self, head: Head) -> None:
        if self._head is not None:
            raise FrameError(
                f"message {head.seq} began before message {self._head.seq} was complete"
            )
        if head.total > self.max_message:
            raise MessageTooLargeError(
                f"a message of {head.total} bytes was announced, more than "
                f"max-message={self.max_message} bytes"
            )
        if head.total == 0:
            raise FrameError(f"message {head.seq} announces 0 bytes")
        self._head = head
        self._buffer = bytearray()
        self._hash = hashlib.sha256()

    def chunk(self, chunk: Chunk) -> bytearray | None:
        """Add ``chunk``; the message's bytes once the last chunk is in, else None."""
        head = self._head
        if head is None:
            raise FrameError(f"a chunk of message {chunk.seq} arrived without its HEAD frame")
        if chunk.seq != head.seq:
            raise FrameError(f"a chunk of message {chunk.seq} arrived inside message {head.seq}")
        received = len(self._buffer)
        if chunk.offset != received:
            raise FrameError(
                f"message {head.seq}: a chunk at offset {chunk.offset}, expected {received}"
            )
        if not chunk.data:
            raise FrameError(f"message {head.seq}: an empty chunk at offset {received}")
        if received + len(chunk.data) > head.total:
            raise FrameError(
                f"message {head.seq}: chunks run past the announced {head.total} bytes"
            )
        self._buffer += chunk.data
        if self.check_digest:
            self._hash.update(chunk.data)
        if len(self._buffer) < head.total:
            return None
        if self.check_digest and self._hash.digest() != head.digest:
            raise FrameError(f"message {head.seq}: the bytes do not match the announced digest")
        done, self._buffer, self._head = self._buffer, bytearray(), None
        return done
