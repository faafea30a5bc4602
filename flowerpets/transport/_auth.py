"""Node authentication: Ed25519 node keys, signed requests, replay refusal, node ids.

A node proves who it is by signing, with its Ed25519 private key:

* its HELLO frame (the request to join), which answers the connection's
  CHALLENGE: it signs the random session id the server chose for this very
  connection, with a timestamp in milliseconds and a 16-byte random nonce. The
  server refuses a HELLO whose key it was not given, whose signature does not
  verify, that answers another connection's challenge (a HELLO recorded on
  another connection, also one made to an earlier life of a restarted server:
  :class:`ReplayError`), whose timestamp is more than ``max_clock_skew`` seconds
  from its own clock, or whose nonce it has seen within that window;
* every HEAD and HEARTBEAT frame it sends afterwards, over the session id the
  server chose for this connection and a sequence number that must strictly
  increase. A frame replayed within the connection (same or older sequence
  number) or taken from another connection (other session id) is refused.

Each signature covers a domain string, so a signature made for one purpose
cannot be passed off as another. Ed25519 is from ``cryptography`` (OpenSSL).

A node's id is derived from its public key (:func:`node_id_of`), so a node
that reconnects keeps its id.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from flowerpets.exceptions import (
    AuthenticationError,
    ParameterTypeError,
    ParameterValueError,
    ReplayError,
)
from flowerpets.transport._frames import (
    KEY_BYTES,
    NONCE_BYTES,
    SESSION_BYTES,
    SIGNATURE_BYTES,
    Head,
    Heartbeat,
    Hello,
)

__all__ = [
    "DOMAIN_FRAME",
    "DOMAIN_HELLO",
    "Authenticator",
    "NodeKey",
    "ReplayCache",
    "fingerprint",
    "load_public_keys",
    "node_id_of",
    "public_key_from_bytes",
    "sign_frame",
    "verify_frame",
]

DOMAIN_HELLO: Final = b"flowerpets/transport/v1/hello\x00"
DOMAIN_FRAME: Final = b"flowerpets/transport/v1/frame\x00"
_NODE_ID_DOMAIN: Final = b"flowerpets/transport/v1/node-id\x00"
_ID_MASK: Final = (1 << 63) - 1


def node_id_of(public_key: bytes) -> int:
    """The node id for a public key: 63 bits of its SHA-256, never 0 (0 is the server)."""
    value = int.from_bytes(hashlib.sha256(_NODE_ID_DOMAIN + public_key).digest()[:8], "big")
    return (value & _ID_MASK) or 1


def fingerprint(public_key: bytes) -> str:
    """A short, printable name for a public key (the first 16 hex digits of its SHA-256)."""
    return "SHA256:" + hashlib.sha256(public_key).hexdigest()[:16]


def public_key_from_bytes(raw: bytes) -> Ed25519PublicKey:
    if len(raw) != KEY_BYTES:
        raise AuthenticationError(f"a node public key is {KEY_BYTES} bytes, got {len(raw)}")
    try:
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as exc:
        raise AuthenticationError(f"not an Ed25519 public key: {exc}") from None


class NodeKey:
    """A node's Ed25519 key pair: it signs the node's requests and fixes its id."""

    __slots__ = ("_private", "public_bytes")

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        if not isinstance(private_key, Ed25519PrivateKey):
            raise ParameterTypeError(
                f"a node key is an Ed25519 private key, got {type(private_key)}"
            )
        self._private = private_key
        self.public_bytes = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @classmethod
    def generate(cls) -> NodeKey:
        """A fresh key pair from the OS's secure source."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> NodeKey:
        """Read a PEM (PKCS#8) or OpenSSH Ed25519 private key, without a password."""
        data = Path(path).read_bytes()
        key: object
        try:
            if data.lstrip().startswith(b"-----BEGIN OPENSSH PRIVATE KEY"):
                key = serialization.load_ssh_private_key(data, password=None)
            else:
                key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise ParameterValueError(
                f"{path}: not an unencrypted Ed25519 private key: {exc}"
            ) from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ParameterValueError(f"{path}: node keys are Ed25519, got {type(key).__name__}")
        return cls(key)

    def private_pem(self) -> bytes:
        return self._private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def public_openssh(self, comment: str = "") -> str:
        """The public key as one OpenSSH line (``ssh-ed25519 AAAA... comment``)."""
        line = (
            self._private.public_key()
            .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
            .decode("ascii")
        )
        return f"{line} {comment}".rstrip()

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self._private.public_key()

    @property
    def node_id(self) -> int:
        return node_id_of(self.public_bytes)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public_bytes)

    def sign(self, data: bytes) -> bytes:
        return self._private.sign(data)

    def hello(
        self, *, challenge: bytes, max_chunk: int, max_message: int, now: float | None = None
    ) -> Hello:
        """A signed HELLO answering ``challenge``, with the current time and a fresh nonce."""
        unsigned = Hello(
            public_key=self.public_bytes,
            timestamp_ms=int((time.time() if now is None else now) * 1000),
            nonce=os.urandom(NONCE_BYTES),
            max_chunk=max_chunk,
            max_message=max_message,
            challenge=challenge,
        )
        return replace(unsigned, signature=self.sign(DOMAIN_HELLO + unsigned.prefix()))

    def __repr__(self) -> str:
        return f"NodeKey({self.fingerprint}, node_id={self.node_id})"


def sign_frame(key: NodeKey, session: bytes, frame: Head | Heartbeat) -> bytes:
    """``frame``'s bytes with its signature over the session id and the bytes before it."""
    prefix = frame.prefix()
    return prefix + key.sign(DOMAIN_FRAME + session + prefix)


def verify_frame(public_key: Ed25519PublicKey, session: bytes, frame: Head | Heartbeat) -> None:
    """Raise :class:`AuthenticationError` unless ``frame`` is signed for this session."""
    if len(session) != SESSION_BYTES or len(frame.signature) != SIGNATURE_BYTES:
        raise AuthenticationError("malformed session or signature")
    try:
        public_key.verify(frame.signature, DOMAIN_FRAME + session + frame.prefix())
    except InvalidSignature:
        raise AuthenticationError(
            f"the signature of {type(frame).__name__.upper()} frame {frame.seq} does not verify "
            "for this connection"
        ) from None


class ReplayCache:
    """Nonces seen within the clock-skew window, so a replayed HELLO is refused.

    A second line of defence: the challenge already binds a HELLO to one
    connection. This cache lives in memory, so it alone could not refuse a
    HELLO replayed to a restarted server; the challenge does.

    Entries older than ``window`` seconds are dropped: a HELLO that old is refused
    for its timestamp anyway. ``max_entries`` bounds the memory; when the cache is
    full of live entries it refuses new HELLOs (fail closed) rather than forget.
    """

    def __init__(self, window: float, *, max_entries: int = 1_000_000) -> None:
        self.window = window
        self.max_entries = max_entries
        self._seen: OrderedDict[bytes, float] = OrderedDict()
        self._lock = threading.Lock()

    def check_and_add(self, nonce: bytes, now: float) -> None:
        with self._lock:
            while self._seen:
                oldest, at = next(iter(self._seen.items()))
                if now - at <= self.window:
                    break
                del self._seen[oldest]
            if nonce in self._seen:
                raise ReplayError("this HELLO (its nonce) was seen before: a replayed request")
            if len(self._seen) >= self.max_entries:
                raise AuthenticationError("too many HELLOs within the clock-skew window")
            self._seen[nonce] = now

    def __len__(self) -> int:
        return len(self._seen)


class Authenticator:
    """The server's check of a HELLO: known key, valid signature, this connection's
    challenge, fresh time, unseen nonce.

    ``allowed`` maps public keys (32 raw bytes) to a label for the logs; None
    accepts any key (open enrolment: for loopback development only).
    """

    def __init__(self, allowed: Mapping[bytes, str] | None, *, max_clock_skew: float) -> None:
        self.allowed = dict(allowed) if allowed is not None else None
        self.max_clock_skew = max_clock_skew
        # A HELLO is refused outside [now - skew, now + skew], so a nonce must be
        # remembered for 2 * skew to cover the whole span its timestamp may claim.
        self.replays = ReplayCache(2 * max_clock_skew)

    def verify_hello(
        self, hello: Hello, *, challenge: bytes, now: float | None = None
    ) -> Ed25519PublicKey:
        """The node's public key if ``hello`` answers ``challenge`` and is acceptable.

        Otherwise :class:`AuthenticationError` (:class:`ReplayError` for a HELLO
        that answers another connection's challenge, or whose nonce was seen).
        """
        now = time.time() if now is None else now
        key = hello.public_key
        if self.allowed is not None and key not in self.allowed:
            raise AuthenticationError(
                f"unknown node key {fingerprint(key)}: it is not among the server's node keys"
            )
        public = public_key_from_bytes(key)
        try:
            public.verify(hello.signature, DOMAIN_HELLO + hello.prefix())
        except InvalidSignature:
            raise AuthenticationError(
                f"the HELLO signature of node key {fingerprint(key)} does not verify"
            ) from None
        if len(challenge) != SESSION_BYTES or not hmac.compare_digest(hello.challenge, challenge):
            raise ReplayError(
                f"node key {fingerprint(key)}: this HELLO answers the challenge of another "
                "connection (or of an earlier life of this server): a replayed request"
            )
        skew = hello.timestamp_ms / 1000 - now
        if abs(skew) > self.max_clock_skew:
            raise AuthenticationError(
                f"the HELLO of node key {fingerprint(key)} is timestamped {skew:+.1f} s from the "
                f"server's clock (allowed: +-{self.max_clock_skew:g} s): a stale or replayed "
                "request, or a node whose clock is wrong"
            )
        try:
            self.replays.check_and_add(hello.nonce, now)
        except ReplayError as exc:
            raise ReplayError(f"node key {fingerprint(key)}: {exc}") from None
        return public

    def label(self, public_key: bytes) -> str:
        if self.allowed is not None and self.allowed.get(public_key):
            return self.allowed[public_key]
        return fingerprint(public_key)


# -- public key files -----------------------------------------------------------------------------
def _public_raw(key: object, where: str) -> bytes:
    if not isinstance(key, Ed25519PublicKey):
        raise ParameterValueError(f"{where}: node keys are Ed25519, got {type(key).__name__}")
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _keys_in_file(path: Path) -> dict[bytes, str]:
    text = path.read_text(encoding="utf-8")
    keys: dict[bytes, str] = {}
    if "-----BEGIN PUBLIC KEY-----" in text:
        blocks = text.split("-----END PUBLIC KEY-----")
        for index, block in enumerate(blocks[:-1]):
            pem = block[block.index("-----BEGIN PUBLIC KEY-----") :] + "-----END PUBLIC KEY-----\n"
            where = f"{path} (PEM block {index + 1})"
            try:
                key = serialization.load_pem_public_key(pem.encode("ascii"))
            except ValueError as exc:
                raise ParameterValueError(f"{where}: not a public key: {exc}") from None
            keys[_public_raw(key, where)] = f"{path.name}#{index + 1}"
        return keys
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{path}:{number}"
        try:
            key = serialization.load_ssh_public_key(line.encode("ascii"))
        except (ValueError, UnicodeEncodeError) as exc:
            raise ParameterValueError(f"{where}: not an OpenSSH public key line: {exc}") from None
        parts = line.split(maxsplit=2)
        keys[_public_raw(key, where)] = parts[2] if len(parts) == 3 else f"{path.name}:{number}"
    return keys


def load_public_keys(paths: Iterable[str | os.PathLike[str]]) -> dict[bytes, str]:
    """The node public keys in files and directories (every ``*.pub`` file of a directory).

    A file holds OpenSSH lines (``ssh-ed25519 AAAA... label``, one per line, ``#``
    comments allowed) or PEM ``PUBLIC KEY`` blocks. Returns raw key -> label. A
    file that cannot be read as keys, or no keys at all, is a ``ValueError``
    naming the file.
    """
    keys: dict[bytes, str] = {}
    for entry in paths:
        path = Path(entry)
        if path.is_dir():
            files = sorted(path.glob("*.pub"))
            if not files:
                raise ParameterValueError(f"{path}: the directory holds no *.pub node key files")
        elif path.is_file():
            files = [path]
        else:
            raise ParameterValueError(f"{path}: no such node key file or directory")
        for file in files:
            found = _keys_in_file(file)
            if not found:
                raise ParameterValueError(f"{file}: holds no node public keys")
            keys.update(found)
    return keys
