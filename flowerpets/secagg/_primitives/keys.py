"""X25519 key agreement with HKDF-SHA256, from ``cryptography``.

Keys are fresh for every round and every purpose. A shared secret is never used
as a key directly: HKDF derives the key, with the round's session id as salt
and an ``info`` string naming the purpose, so the same X25519 output can never
serve two purposes.
"""

from __future__ import annotations

from collections.abc import Callable

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from flowerpets.exceptions import DecryptionError, KeyMaterialError

__all__ = [
    "KEY_BYTES",
    "agree",
    "generate_private_key",
    "load_private_key",
    "private_bytes",
    "public_bytes",
    "public_key_of",
]

KEY_BYTES = 32


def generate_private_key(randomness: Callable[[int], bytes]) -> X25519PrivateKey:
    """A new private key from 32 bytes of ``randomness`` (``os.urandom`` in production)."""
    return load_private_key(randomness(KEY_BYTES))


def load_private_key(raw: bytes) -> X25519PrivateKey:
    if not isinstance(raw, bytes | bytearray) or len(raw) != KEY_BYTES:
        raise KeyMaterialError(f"an X25519 private key is {KEY_BYTES} bytes")
    return X25519PrivateKey.from_private_bytes(bytes(raw))


def private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes_raw()


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def public_key_of(raw_private: bytes) -> bytes:
    """The public key (raw 32 bytes) of a raw private key."""
    return public_bytes(load_private_key(raw_private))


def agree(private: X25519PrivateKey, peer_public: bytes, *, salt: bytes, info: bytes) -> bytes:
    """``HKDF-SHA256(X25519(private, peer_public), salt, info)``: 32 bytes.

    A peer key that is malformed or of low order (whose shared secret would be
    all zeros) raises :class:`~flowerpets.exceptions.DecryptionError`.
    """
    if not isinstance(peer_public, bytes | bytearray) or len(peer_public) != KEY_BYTES:
        raise DecryptionError(f"an X25519 public key is {KEY_BYTES} bytes")
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(bytes(peer_public)))
    except ValueError as exc:  # low-order point: OpenSSL refuses the all-zero secret
        raise DecryptionError(f"key agreement failed: {exc}") from None
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=salt, info=info).derive(shared)
