"""Node keys, signed requests, replay refusal and key files."""

from __future__ import annotations

import hashlib
import time
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from flowerpets.exceptions import AuthenticationError, ReplayError
from flowerpets.transport._auth import (
    DOMAIN_FRAME,
    DOMAIN_HELLO,
    Authenticator,
    NodeKey,
    ReplayCache,
    fingerprint,
    load_public_keys,
    node_id_of,
    sign_frame,
    verify_frame,
)
from flowerpets.transport._frames import Head, Heartbeat, decode_frame

RFC8032_SECRET = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
RFC8032_PUBLIC = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")


C = b"c" * 16  # a connection's challenge (the session id the server chose)


def rfc_key() -> NodeKey:
    return NodeKey(Ed25519PrivateKey.from_private_bytes(RFC8032_SECRET))


def test_signatures_are_ed25519_over_the_domain_and_the_frame() -> None:
    # RFC 8032, test 1: the empty message's known signature, from the same key.
    key = rfc_key()
    assert key.public_bytes == RFC8032_PUBLIC
    assert key.sign(b"").hex().startswith("e5564300c360ac729086e2cc806e828a")
    hello = key.hello(challenge=C, max_chunk=1024, max_message=2048, now=1000.0)
    assert hello.timestamp_ms == 1_000_000 and len(hello.nonce) == 16
    public = Ed25519PrivateKey.from_private_bytes(RFC8032_SECRET).public_key()
    public.verify(hello.signature, DOMAIN_HELLO + hello.prefix())
    head = Head(4, 10, b"d" * 32)
    raw = sign_frame(key, b"s" * 16, head)
    decoded = decode_frame(raw, max_frame=1000)
    assert isinstance(decoded, Head)
    public.verify(decoded.signature, DOMAIN_FRAME + b"s" * 16 + head.prefix())
    verify_frame(public, b"s" * 16, decoded)


def test_node_ids_are_stable_63_bit_and_derived_from_the_key() -> None:
    key = rfc_key()
    expected = int.from_bytes(
        hashlib.sha256(b"flowerpets/transport/v1/node-id\x00" + RFC8032_PUBLIC).digest()[:8], "big"
    ) & ((1 << 63) - 1)
    assert key.node_id == node_id_of(RFC8032_PUBLIC) == expected
    ids = {NodeKey.generate().node_id for _ in range(50)}
    assert len(ids) == 50 and all(0 < i < 2**63 for i in ids)
    assert (
        fingerprint(RFC8032_PUBLIC) == "SHA256:" + hashlib.sha256(RFC8032_PUBLIC).hexdigest()[:16]
    )


def test_a_frame_signed_for_another_session_or_altered_is_refused() -> None:
    key = NodeKey.generate()
    public = Ed25519PrivateKey.generate().public_key()
    mine = key.public_key
    beat = decode_frame(sign_frame(key, b"A" * 16, Heartbeat(1, 5)), max_frame=1000)
    assert isinstance(beat, Heartbeat)
    verify_frame(mine, b"A" * 16, beat)
    with pytest.raises(AuthenticationError, match="does not verify for this connection"):
        verify_frame(mine, b"B" * 16, beat)
    with pytest.raises(AuthenticationError, match="does not verify"):
        verify_frame(mine, b"A" * 16, replace(beat, seq=2))
    with pytest.raises(AuthenticationError, match="does not verify"):
        verify_frame(public, b"A" * 16, beat)


def test_the_authenticator_accepts_a_known_fresh_hello_once() -> None:
    key = NodeKey.generate()
    auth = Authenticator({key.public_bytes: "node-0"}, max_clock_skew=30)
    now = time.time()
    hello = key.hello(challenge=C, max_chunk=1024, max_message=1024, now=now)
    auth.verify_hello(hello, challenge=C, now=now + 1)
    assert auth.label(key.public_bytes) == "node-0"
    with pytest.raises(ReplayError, match="seen before: a replayed request"):
        auth.verify_hello(hello, challenge=C, now=now + 2)
    stranger = NodeKey.generate()
    with pytest.raises(AuthenticationError, match=f"unknown node key {stranger.fingerprint}"):
        auth.verify_hello(
            stranger.hello(challenge=C, max_chunk=1024, max_message=1024), challenge=C, now=now
        )
    forged = replace(
        key.hello(challenge=C, max_chunk=1024, max_message=1024, now=now), max_chunk=4096
    )
    with pytest.raises(AuthenticationError, match=r"signature .* does not verify"):
        auth.verify_hello(forged, challenge=C, now=now)
    stale = key.hello(challenge=C, max_chunk=1024, max_message=1024, now=now - 31)
    with pytest.raises(AuthenticationError, match=r"timestamped -31\.0 s .* \(allowed: \+-30 s\)"):
        auth.verify_hello(stale, challenge=C, now=now)
    early = key.hello(challenge=C, max_chunk=1024, max_message=1024, now=now + 40)
    with pytest.raises(AuthenticationError, match=r"\+40\.0 s"):
        auth.verify_hello(early, challenge=C, now=now)
    # A stale HELLO is not remembered: nothing an attacker sends can fill the cache for later.
    assert len(auth.replays) == 1


def test_open_enrolment_accepts_any_key_but_still_refuses_replays() -> None:
    auth = Authenticator(None, max_clock_skew=30)
    hello = NodeKey.generate().hello(challenge=C, max_chunk=1024, max_message=1024)
    auth.verify_hello(hello, challenge=C)
    with pytest.raises(ReplayError):
        auth.verify_hello(hello, challenge=C)


def test_the_replay_cache_forgets_after_its_window_and_fails_closed_when_full() -> None:
    cache = ReplayCache(10.0, max_entries=2)
    cache.check_and_add(b"a", 0.0)
    cache.check_and_add(b"b", 5.0)
    with pytest.raises(AuthenticationError, match="too many HELLOs"):
        cache.check_and_add(b"c", 6.0)
    with pytest.raises(ReplayError):
        cache.check_and_add(b"b", 6.0)
    cache.check_and_add(b"c", 10.5)  # "a" expired
    assert len(cache) == 2


def test_keys_save_and_load_in_pem_and_openssh(tmp_path: Path) -> None:
    key = NodeKey.generate()
    (tmp_path / "k.pem").write_bytes(key.private_pem())
    assert NodeKey.load(tmp_path / "k.pem").public_bytes == key.public_bytes
    ssh = key._private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    (tmp_path / "k.ssh").write_bytes(ssh)
    assert NodeKey.load(tmp_path / "k.ssh").node_id == key.node_id
    (tmp_path / "bad").write_text("not a key")
    with pytest.raises(ValueError, match="bad: not an unencrypted Ed25519 private key"):
        NodeKey.load(tmp_path / "bad")
    from cryptography.hazmat.primitives.asymmetric import ec

    other = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (tmp_path / "ec.pem").write_bytes(other)
    with pytest.raises(ValueError, match="node keys are Ed25519"):
        NodeKey.load(tmp_path / "ec.pem")


def test_public_key_files_directories_and_their_errors(tmp_path: Path) -> None:
    keys = [NodeKey.generate() for _ in range(3)]
    listing = tmp_path / "all.pub"
    listing.write_text(
        "# the federation's nodes\n\n"
        + "\n".join(k.public_openssh(f"node-{i}") for i, k in enumerate(keys[:2]))
        + "\n"
    )
    pem = keys[2].public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    folder = tmp_path / "dir"
    folder.mkdir()
    (folder / "third.pub").write_bytes(pem)
    (folder / "ignored.txt").write_text("garbage")
    loaded = load_public_keys([listing, folder])
    assert loaded == {
        keys[0].public_bytes: "node-0",
        keys[1].public_bytes: "node-1",
        keys[2].public_bytes: "third.pub#1",
    }
    bad = tmp_path / "bad.pub"
    bad.write_text(keys[0].public_openssh() + "\nssh-ed25519 AAAAnot-base64\n")
    with pytest.raises(ValueError, match=r"bad\.pub:2: not an OpenSSH public key line"):
        load_public_keys([bad])
    empty = tmp_path / "empty.pub"
    empty.write_text("# nothing\n")
    with pytest.raises(ValueError, match="holds no node public keys"):
        load_public_keys([empty])
    with pytest.raises(ValueError, match="no such node key file"):
        load_public_keys([tmp_path / "missing"])
    (tmp_path / "none").mkdir()
    with pytest.raises(ValueError, match=r"holds no \*\.pub"):
        load_public_keys([tmp_path / "none"])


def test_a_hello_answers_one_connection_s_challenge_only() -> None:
    """A HELLO recorded anywhere (also by an earlier life of the server) is refused elsewhere."""
    key = NodeKey.generate()
    now = time.time()
    hello = key.hello(challenge=C, max_chunk=1024, max_message=1024, now=now)
    restarted = Authenticator({key.public_bytes: "node-0"}, max_clock_skew=30)  # a fresh cache
    with pytest.raises(ReplayError, match="answers the challenge of another connection"):
        restarted.verify_hello(hello, challenge=b"d" * 16, now=now)
    other = replace(hello, challenge=b"d" * 16)  # the challenge is under the signature
    with pytest.raises(AuthenticationError, match=r"signature .* does not verify"):
        restarted.verify_hello(other, challenge=b"d" * 16, now=now)
    restarted.verify_hello(hello, challenge=C, now=now)
