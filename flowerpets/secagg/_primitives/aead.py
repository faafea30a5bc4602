"""AES-256-GCM for the encrypted shares, with associated data that binds their context.

The associated data is the protocol label, the session id, the round, the
sender and the receiver: a ciphertext decrypts only where and when it was
meant to. A server that replays one from another round or session, hands it to
another receiver, or claims another sender gets a
:class:`~flowerpets.exceptions.DecryptionError`. (The pair key alone would not
catch a *reflected* ciphertext: X25519 keys are symmetric, so i->j and j->i
share one key; the sender/receiver order in the associated data does.)

A ciphertext is ``nonce (12 bytes) | AES-GCM output (plaintext + 16-byte tag)``,
with a random nonce from the caller's randomness.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from flowerpets.exceptions import DecryptionError, ParameterValueError

__all__ = ["NONCE_BYTES", "OVERHEAD", "TAG_BYTES", "associated_data", "decrypt", "encrypt"]

NONCE_BYTES = 12
TAG_BYTES = 16
OVERHEAD = NONCE_BYTES + TAG_BYTES
_LABEL = b"flowerpets/secagg+/v1/share"
_CONTEXT = struct.Struct("<QQQ")  # round, sender, receiver


def associated_data(*, session: bytes, round: int, sender: int, receiver: int) -> bytes:
    """The bytes a share ciphertext is bound to."""
    return (
        _LABEL + struct.pack("<B", len(session)) + session + _CONTEXT.pack(round, sender, receiver)
    )


def encrypt(
    key: bytes, plaintext: bytes, associated: bytes, randomness: Callable[[int], bytes]
) -> bytes:
    nonce = randomness(NONCE_BYTES)
    if len(nonce) != NONCE_BYTES:
        raise ParameterValueError("the randomness source returned too few bytes")
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated)


def decrypt(key: bytes, ciphertext: bytes, associated: bytes) -> bytes:
    """The plaintext, or :class:`~flowerpets.exceptions.DecryptionError` if anything is off."""
    if not isinstance(ciphertext, bytes | bytearray) or len(ciphertext) < OVERHEAD:
        raise DecryptionError("a share ciphertext is too short")
    nonce, body = bytes(ciphertext[:NONCE_BYTES]), bytes(ciphertext[NONCE_BYTES:])
    try:
        return AESGCM(key).decrypt(nonce, body, associated)
    except InvalidTag:
        raise DecryptionError(
            "a share ciphertext failed authentication (tampered, replayed, rerouted or "
            "from another sender)"
        ) from None
