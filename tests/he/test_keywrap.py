"""Key transport (X25519 + HKDF-SHA256 + AES-256-GCM): known answers, binding, tampering."""

from __future__ import annotations

import dataclasses

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from flowerpets.exceptions import DecryptionError
from flowerpets.he._primitives.keywrap import LABEL, KeyBinding, TransportKeys, unwrap, wrap
from tests.vectors import X25519_ALICE_PRIVATE as ALICE_PRIVATE  # RFC 7748, section 6.1
from tests.vectors import X25519_ALICE_PUBLIC as ALICE_PUBLIC
from tests.vectors import X25519_BOB_PRIVATE as BOB_PRIVATE
from tests.vectors import X25519_BOB_PUBLIC as BOB_PUBLIC
from tests.vectors import X25519_SHARED as SHARED

BINDING = KeyBinding(
    run_id=7, sender=11, recipient=22, key_id=bytes(range(16)), context_digest=bytes(32)
)
SECRET = b"a CKKS secret context"


def test_transport_keys_match_rfc_7748() -> None:
    assert TransportKeys.from_private(ALICE_PRIVATE).public == ALICE_PUBLIC
    assert TransportKeys.from_private(BOB_PRIVATE).public == BOB_PUBLIC
    alice = X25519PrivateKey.from_private_bytes(ALICE_PRIVATE)
    assert alice.exchange(X25519PublicKey.from_public_bytes(BOB_PUBLIC)) == SHARED


def test_wrap_is_the_documented_construction() -> None:
    # Recomputed here step by step from the module docstring, with RFC 7748's keys:
    # Alice's key as the ephemeral one, Bob as the recipient.
    blob = wrap(SECRET, BOB_PUBLIC, BINDING, ephemeral_private=ALICE_PRIVATE)
    aad = (7).to_bytes(8, "big") + (11).to_bytes(8, "big") + (22).to_bytes(8, "big")
    aad += bytes(range(16)) + bytes(32)
    assert BINDING.encode() == aad
    okm = HKDF(
        algorithm=hashes.SHA256(), length=44, salt=ALICE_PUBLIC + BOB_PUBLIC, info=LABEL + aad
    ).derive(SHARED)
    expected = b"\x01" + ALICE_PUBLIC + AESGCM(okm[:32]).encrypt(okm[32:], SECRET, aad)
    assert blob == expected
    # Pinned, so a change of the wire format cannot go unnoticed.
    assert blob.hex() == PINNED
    assert unwrap(blob, BOB_PRIVATE, BINDING) == SECRET


PINNED = (
    "018520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
    "8bb7efeaef675e7b09808f7684307ac26f547a1b4eb364b7a892c5b46265d16ef9e4e97d5a"
)


def test_fresh_ephemeral_keys_make_every_wrap_different() -> None:
    bob = TransportKeys.generate()
    first, second = wrap(SECRET, bob.public, BINDING), wrap(SECRET, bob.public, BINDING)
    assert first != second
    assert unwrap(first, bob.private, BINDING) == unwrap(second, bob.private, BINDING) == SECRET


@pytest.mark.parametrize(
    "change",
    [
        {"recipient": 23},  # rerouted to another node
        {"run_id": 8},  # replayed in another run
        {"sender": 12},  # attributed to another sender
        {"key_id": bytes(16)},  # presented as another key
        {"context_digest": bytes([1]) + bytes(31)},  # with other parameters
    ],
)
def test_a_blob_bound_elsewhere_fails(change: dict[str, object]) -> None:
    blob = wrap(SECRET, BOB_PUBLIC, BINDING)
    with pytest.raises(DecryptionError, match="authentication"):
        unwrap(blob, BOB_PRIVATE, dataclasses.replace(BINDING, **change))


def test_tampering_and_the_wrong_recipient_fail() -> None:
    blob = wrap(SECRET, BOB_PUBLIC, BINDING)
    with pytest.raises(DecryptionError):
        unwrap(blob, ALICE_PRIVATE, BINDING)  # not the recipient
    for index in (1, 40, len(blob) - 1):  # the ephemeral key, the ciphertext, the tag
        bad = bytearray(blob)
        bad[index] ^= 0x01
        with pytest.raises(DecryptionError):
            unwrap(bytes(bad), BOB_PRIVATE, BINDING)
    with pytest.raises(DecryptionError, match="version"):
        unwrap(b"\x02" + blob[1:], BOB_PRIVATE, BINDING)
    with pytest.raises(DecryptionError, match="length"):
        unwrap(blob[:40], BOB_PRIVATE, BINDING)
    # A small-order point makes the shared secret all zero: refused, not used.
    zero_point = b"\x01" + bytes(32) + blob[33:]
    with pytest.raises(DecryptionError):
        unwrap(zero_point, BOB_PRIVATE, BINDING)


def test_bindings_are_validated() -> None:
    with pytest.raises(ValueError, match="run_id"):
        dataclasses.replace(BINDING, run_id=-1)
    with pytest.raises(ValueError, match="key_id"):
        dataclasses.replace(BINDING, key_id=b"short")
    with pytest.raises(ValueError, match="context_digest"):
        dataclasses.replace(BINDING, context_digest=b"")
