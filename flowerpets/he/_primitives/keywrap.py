"""Key transport: a secret context encrypted for one recipient alone.

An ECIES-style construction from ``cryptography`` primitives, nothing
hand-rolled:

1. the sender draws a fresh X25519 key pair for this one message and agrees
   ``Z = X25519(ephemeral, recipient)``;
2. ``HKDF-SHA256(Z, salt = ephemeral_public || recipient_public,
   info = LABEL || binding)`` gives 44 bytes: an AES-256 key and a 96-bit nonce
   (each ephemeral key is used once, so the nonce never repeats under a key);
3. ``AES-256-GCM`` encrypts the secret with the binding as associated data.

The *binding* names the run, the sender, the recipient, the key id and the
digest of the public context: a blob rerouted to another node, replayed in
another run, or presented with other parameters fails authentication
(:class:`~flowerpets.exceptions.DecryptionError`).

Wire form: ``version (1) || ephemeral_public (32) || ciphertext || tag (16)``.

Against an *active* server this is not enough: with no authenticated node
identities, a server can impersonate a node and hand out a key of its own
(see ``docs/he.md``). It stops an honest-but-curious server, which relays but
only reads.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from flowerpets._validation import instance, integer
from flowerpets.exceptions import DecryptionError, KeyMaterialError, ParameterValueError

__all__ = [
    "KEY_ID_BYTES",
    "KeyBinding",
    "TransportKeys",
    "unwrap",
    "wrap",
]

VERSION = 1
LABEL = b"flowerpets/he/key-transport/v1"
KEY_ID_BYTES = 16
_DIGEST_BYTES = 32
_PUBLIC_BYTES = 32
_TAG_BYTES = 16
_HEADER = 1 + _PUBLIC_BYTES
MAX_WRAPPED_BYTES = 64 << 20  # a secret context is tens of KB; refuse absurd blobs unread


@dataclass(frozen=True, slots=True)
class KeyBinding:
    """What a wrapped key is bound to: run, sender, recipient, key id, parameters."""

    run_id: int
    sender: int
    recipient: int
    key_id: bytes
    context_digest: bytes

    def __post_init__(self) -> None:
        for name in ("run_id", "sender", "recipient"):
            integer(f"KeyBinding.{name}", getattr(self, name), at_least=0, below=2**64)
        for name, size in (("key_id", KEY_ID_BYTES), ("context_digest", _DIGEST_BYTES)):
            if len(instance(f"KeyBinding.{name}", getattr(self, name), bytes)) != size:
                raise ParameterValueError(f"KeyBinding.{name} must be {size} bytes")

    def encode(self) -> bytes:
        """Fixed-length encoding: no two bindings share one."""
        return (
            struct.pack(">QQQ", self.run_id, self.sender, self.recipient)
            + self.key_id
            + self.context_digest
        )


@dataclass(frozen=True, slots=True)
class TransportKeys:
    """A node's X25519 key pair for receiving keys, as raw 32-byte strings."""

    private: bytes
    public: bytes

    @classmethod
    def generate(cls) -> TransportKeys:
        """A fresh pair from the OS's secure source (OpenSSL)."""
        return cls.from_private(_raw_private(X25519PrivateKey.generate()))

    @classmethod
    def from_private(cls, private: bytes) -> TransportKeys:
        key = _private_key(private)
        return cls(private=private, public=_raw_public(key.public_key()))


def _private_key(raw: bytes) -> X25519PrivateKey:
    if not isinstance(raw, bytes) or len(raw) != _PUBLIC_BYTES:
        raise KeyMaterialError("an X25519 private key is 32 bytes")
    return X25519PrivateKey.from_private_bytes(raw)


def _public_key(raw: bytes) -> X25519PublicKey:
    if not isinstance(raw, bytes) or len(raw) != _PUBLIC_BYTES:
        raise KeyMaterialError("an X25519 public key is 32 bytes")
    return X25519PublicKey.from_public_bytes(raw)


def _raw_private(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def _raw_public(key: X25519PublicKey) -> bytes:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def _derive(shared: bytes, ephemeral: bytes, recipient: bytes, aad: bytes) -> tuple[AESGCM, bytes]:
    okm = HKDF(
        algorithm=hashes.SHA256(), length=32 + 12, salt=ephemeral + recipient, info=LABEL + aad
    ).derive(shared)
    return AESGCM(okm[:32]), okm[32:]


def wrap(
    secret: bytes,
    recipient_public: bytes,
    binding: KeyBinding,
    *,
    ephemeral_private: bytes | None = None,
) -> bytes:
    """Encrypt ``secret`` for the holder of ``recipient_public``, bound to ``binding``.

    A public key that is not 32 bytes, or a small-order point (which would make the
    shared secret all zero), raises :class:`~flowerpets.exceptions.KeyMaterialError`.

    ``ephemeral_private`` exists for known-answer tests only; by default a fresh
    key comes from the OS's secure source.
    """
    recipient = _public_key(recipient_public)
    ephemeral = (
        X25519PrivateKey.generate()
        if ephemeral_private is None
        else _private_key(ephemeral_private)
    )
    ephemeral_public = _raw_public(ephemeral.public_key())
    try:
        shared = ephemeral.exchange(recipient)
    except ValueError:  # cryptography's refusal of an all-zero shared secret
        raise KeyMaterialError("the recipient's public key is a small-order point") from None
    aad = binding.encode()
    cipher, nonce = _derive(shared, ephemeral_public, recipient_public, aad)
    return bytes([VERSION]) + ephemeral_public + cipher.encrypt(nonce, secret, aad)


def unwrap(blob: bytes, recipient_private: bytes, binding: KeyBinding) -> bytes:
    """The secret :func:`wrap` sealed, or :class:`DecryptionError` if anything does not match."""
    if not isinstance(blob, bytes) or not _HEADER + _TAG_BYTES <= len(blob) <= MAX_WRAPPED_BYTES:
        raise DecryptionError("a wrapped key has the wrong length")
    if blob[0] != VERSION:
        raise DecryptionError(f"wrapped key version {blob[0]} is not {VERSION}")
    ephemeral_public = blob[1:_HEADER]
    me = _private_key(recipient_private)
    try:
        shared = me.exchange(_public_key(ephemeral_public))
    except ValueError as exc:  # an all-zero shared secret (small-order point)
        raise DecryptionError(f"wrapped key carries an invalid public key: {exc}") from None
    aad = binding.encode()
    cipher, nonce = _derive(shared, ephemeral_public, _raw_public(me.public_key()), aad)
    try:
        return cipher.decrypt(nonce, blob[_HEADER:], aad)
    except InvalidTag:
        raise DecryptionError(
            "wrapped key failed authentication: tampered with, or meant for another node, run, "
            "sender, key or parameters"
        ) from None
