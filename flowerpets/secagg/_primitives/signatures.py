"""Ed25519 signatures (RFC 8032) from ``cryptography``: the nodes' long-term identity keys.

Raw encodings only: a private key is its 32-byte seed, a public key 32 bytes,
a signature 64 bytes. A malformed public key is a
:class:`~flowerpets.exceptions.KeyMaterialError`; a signature that does not
verify (or has the wrong length) a :class:`~flowerpets.exceptions.SignatureError`.
What is signed is the caller's business: the protocol signs domain-separated
transcripts (``protocol.transcript``), so a signature made for one purpose
never passes for another.
"""

from __future__ import annotations

from collections.abc import Callable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from flowerpets.exceptions import KeyMaterialError, SignatureError

__all__ = [
    "PUBLIC_KEY_BYTES",
    "SEED_BYTES",
    "SIGNATURE_BYTES",
    "generate",
    "load_public_key",
    "public_bytes",
    "verify",
]

SEED_BYTES = 32
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64


def generate(randomness: Callable[[int], bytes]) -> Ed25519PrivateKey:
    """A private key from a 32-byte seed of ``randomness`` (``os.urandom`` in production)."""
    seed = randomness(SEED_BYTES)
    if not isinstance(seed, bytes) or len(seed) != SEED_BYTES:
        raise KeyMaterialError(f"an Ed25519 seed is {SEED_BYTES} bytes")
    return Ed25519PrivateKey.from_private_bytes(seed)


def public_bytes(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(Encoding.Raw, PublicFormat.Raw)


def load_public_key(raw: bytes) -> Ed25519PublicKey:
    if not isinstance(raw, bytes) or len(raw) != PUBLIC_KEY_BYTES:
        raise KeyMaterialError(f"an Ed25519 public key is {PUBLIC_KEY_BYTES} bytes")
    try:
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as exc:
        raise KeyMaterialError(f"not an Ed25519 public key: {exc}") from None


def verify(public: Ed25519PublicKey, signature: bytes, data: bytes, *, what: str) -> None:
    """Return if ``signature`` is ``public``'s over ``data``, else SignatureError (``what``)."""
    if not isinstance(signature, bytes) or len(signature) != SIGNATURE_BYTES:
        raise SignatureError(f"{what}: a signature is {SIGNATURE_BYTES} bytes")
    try:
        public.verify(signature, data)
    except InvalidSignature:
        raise SignatureError(f"{what}: the signature does not verify") from None
