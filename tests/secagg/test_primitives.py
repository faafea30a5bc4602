"""SecAgg+'s raw primitives against known answers and independent implementations."""

from __future__ import annotations

import itertools
import math
import os
import struct

import numpy as np
import pytest
from Crypto.Cipher import AES
from Crypto.Hash import SHA256
from Crypto.Protocol.KDF import HKDF
from hypothesis import given, settings
from hypothesis import strategies as st

from flowerpets.exceptions import DecryptionError, InfeasibleParametersError, InvalidUpdateError
from flowerpets.secagg._primitives import aead, keys, prg, quantize, shamir
from tests.vectors import (
    AES256_CTR_CIPHERTEXT,
    AES256_CTR_COUNTER,
    AES256_CTR_KEY,
    AES256_CTR_OUTPUT_BLOCKS,
    AES256_CTR_PLAINTEXT,
    X25519_ALICE_PRIVATE,
    X25519_ALICE_PUBLIC,
    X25519_BOB_PRIVATE,
    X25519_BOB_PUBLIC,
    X25519_SHARED,
)


def randomness(seed: int):  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(seed)
    return lambda n: rng.bytes(n)


# -- the PRG -----------------------------------------------------------------------------
# NIST SP 800-38A, F.5.5 CTR-AES256.Encrypt (tests/vectors.py).
def test_prg_matches_nist_sp800_38a_ctr_aes256() -> None:
    stream = prg.keystream(AES256_CTR_KEY, len(AES256_CTR_PLAINTEXT), counter=AES256_CTR_COUNTER)
    assert (
        bytes(a ^ b for a, b in zip(stream, AES256_CTR_PLAINTEXT, strict=True))
        == AES256_CTR_CIPHERTEXT
    )
    # The output blocks are AES_K(counter), AES_K(counter + 1), as the standard lists them.
    assert stream[:32] == AES256_CTR_OUTPUT_BLOCKS


@pytest.mark.parametrize("nbytes", [1, 16, 17, 4096, 100_003])
def test_prg_matches_pycryptodome_with_a_zero_counter(nbytes: int) -> None:
    seed = os.urandom(32)
    reference = AES.new(seed, AES.MODE_CTR, nonce=b"", initial_value=0)
    assert prg.keystream(seed, nbytes) == reference.encrypt(bytes(nbytes))


def test_expand_is_the_keystream_as_little_endian_words() -> None:
    seed = os.urandom(32)
    words = prg.expand(seed, 1001)
    assert words.dtype == np.uint32 and words.shape == (1001,)
    raw = prg.keystream(seed, 4 * 1001)
    assert words.tolist() == list(struct.unpack("<1001I", raw))
    assert prg.expand(seed, 0).size == 0


def test_the_whole_seed_matters() -> None:
    seed = bytearray(os.urandom(32))
    base = prg.expand(bytes(seed), 8)
    for i in (0, 15, 16, 31):  # a flipped bit anywhere in the 256 bits changes the stream
        flipped = bytearray(seed)
        flipped[i] ^= 0x80
        assert not np.array_equal(prg.expand(bytes(flipped), 8), base)


@pytest.mark.parametrize("bad", [b"", bytes(16), bytes(31), bytes(33), "x" * 32])
def test_prg_refuses_a_seed_of_the_wrong_size(bad: object) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        prg.expand(bad, 4)  # type: ignore[arg-type]


@settings(max_examples=40, deadline=None)
@given(
    length=st.integers(0, 3000),
    block=st.integers(1, 700),
    adds=st.integers(0, 3),
    subs=st.integers(0, 3),
    seed=st.integers(0, 2**32 - 1),
)
def test_apply_masks_is_the_sum_of_expansions_whatever_the_block_size(
    length: int, block: int, adds: int, subs: int, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    add = [rng.bytes(32) for _ in range(adds)]
    sub = [rng.bytes(32) for _ in range(subs)]
    start = rng.integers(0, 2**32, size=length, dtype=np.uint32)
    expected = start.astype(np.int64)
    for s in add:
        expected += prg.expand(s, length)
    for s in sub:
        expected -= prg.expand(s, length)
    vector = start.copy()
    prg.apply_masks(vector, add=add, subtract=sub, block_words=block)
    assert np.array_equal(vector, (expected % 2**32).astype(np.uint32))


def test_uniform_stream_hands_out_the_stream_in_order() -> None:
    seed = os.urandom(32)
    stream = prg.UniformStream(seed, block_words=10)
    got = np.concatenate([stream.next(n).copy() for n in (10, 3, 0, 7, 10)])
    assert np.array_equal(got, prg.expand(seed, 30))
    with pytest.raises(ValueError):
        stream.next(11)


# -- Shamir ------------------------------------------------------------------------------
def fixed_randomness(*values: int):  # type: ignore[no-untyped-def]
    data = struct.pack(f"<{len(values)}Q", *values)
    return lambda n: data[:n]


def test_shamir_hand_computed_in_gf11() -> None:
    # f(x) = 7 + 3x + 5x^2 over GF(11): f(1..5) = 15, 33, 61, 99, 147 = 4, 0, 6, 0, 4 (mod 11).
    field = shamir.Shamir(11)
    shares = field.split([7], 3, [1, 2, 3, 4, 5], fixed_randomness(3, 5))
    assert shares[:, 0].tolist() == [4, 0, 6, 0, 4]
    # Lagrange at 0 for points 1, 2, 3: 6/2 = 3, 3/(-1) = -3 = 8, 2/2 = 1.
    assert field.lagrange_at_zero([1, 2, 3]) == (3, 8, 1)
    assert field.combine([1, 2, 3], [[4], [0], [6]]).tolist() == [7]
    # Points 2, 4, 5: 20/6 = 9 * 2 = 7, 10/(-2) = -5 = 6, 8/3 = 8 * 4 = 10; 10 * 4 = 40 = 7.
    assert field.lagrange_at_zero([2, 4, 5]) == (7, 6, 10)
    assert field.combine([2, 4, 5], [[0], [0], [4]]).tolist() == [7]


@pytest.mark.parametrize("threshold", [2, 3])
def test_fewer_than_t_shares_are_consistent_with_every_secret(threshold: int) -> None:
    """Information-theoretic hiding, by counting over GF(11): for any t-1 observed shares,
    every candidate secret has exactly one polynomial through it and the shares, so the
    shares carry no information about which secret was dealt."""
    p = 11
    field = shamir.Shamir(p)
    points = list(range(1, threshold + 1))
    counts: dict[tuple[int, ...], dict[int, int]] = {}
    for secret in range(p):
        for coefficients in itertools.product(range(p), repeat=threshold - 1):
            shares = field.split([secret], threshold, points, fixed_randomness(*coefficients))
            observed = tuple(shares[: threshold - 1, 0].tolist())  # what t-1 holders see
            per_secret = counts.setdefault(observed, dict.fromkeys(range(p), 0))
            per_secret[secret] += 1
    assert len(counts) == p ** (threshold - 1)  # every view occurs...
    for per_secret in counts.values():  # ...and with every secret exactly once
        assert set(per_secret.values()) == {1}


@settings(max_examples=40, deadline=None)
@given(
    secret=st.binary(min_size=32, max_size=32),
    threshold=st.integers(1, 8),
    extra=st.integers(0, 6),
    seed=st.integers(0, 2**32 - 1),
)
def test_any_t_shares_reconstruct_a_32_byte_secret(
    secret: bytes, threshold: int, extra: int, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    field = shamir.Shamir()
    points = [int(x) for x in rng.choice(np.arange(1, 200), size=threshold + extra, replace=False)]
    shares = field.split(shamir.bytes_to_elements(secret), threshold, points, randomness(seed))
    assert shares.shape == (threshold + extra, 16) and int(shares.max()) < field.prime
    pick = rng.choice(len(points), size=threshold, replace=False)
    rebuilt = field.combine([points[i] for i in pick], shares[pick])
    assert shamir.elements_to_bytes(rebuilt) == secret


def test_combine_many_matches_combine_and_caches_lagrange() -> None:
    field = shamir.Shamir()
    secrets_ = [os.urandom(32) for _ in range(5)]
    points = [3, 1, 4]
    stacked = np.stack(
        [field.split(shamir.bytes_to_elements(s), 3, points, os.urandom) for s in secrets_]
    )
    many = field.combine_many(points, stacked)
    assert [shamir.elements_to_bytes(e) for e in many] == secrets_
    field.lagrange_at_zero(points)
    hits = field._lagrange.cache_info().hits
    field.combine_many(points, stacked)
    assert field._lagrange.cache_info().hits == hits + 1


def test_t_minus_one_shares_rebuild_garbage_not_the_secret() -> None:
    field = shamir.Shamir()
    secret = os.urandom(32)
    shares = field.split(shamir.bytes_to_elements(secret), 3, [1, 2, 3], os.urandom)
    rebuilt = field.combine([1, 2], shares[:2])
    assert not np.array_equal(rebuilt, shamir.bytes_to_elements(secret))
    with pytest.raises(ValueError, match="inconsistent"):  # almost surely not 16-bit chunks
        shamir.elements_to_bytes(np.full(16, 2**20, dtype=np.uint64))


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (([1], 3, [1, 2]), "exceeds"),
        (([1], 0, [1, 2]), "threshold"),
        (([1], 2, [1, 1]), "distinct"),
        (([1], 2, [0, 1]), r"\[1,"),
        (([2**31], 2, [1, 2]), "GF"),
    ],
)
def test_shamir_refuses_bad_input(args: tuple[object, ...], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        shamir.Shamir().split(*args, os.urandom)  # type: ignore[arg-type]


def test_shamir_needs_a_prime_below_2_31() -> None:
    for bad in (12, 2**31 + 11, 1):
        with pytest.raises(ValueError):
            shamir.Shamir(bad)


# -- key agreement -------------------------------------------------------------------------
def test_key_agreement_is_x25519_then_hkdf_sha256() -> None:
    assert keys.public_key_of(X25519_ALICE_PRIVATE) == X25519_ALICE_PUBLIC  # RFC 7748, 6.1
    assert keys.public_key_of(X25519_BOB_PRIVATE) == X25519_BOB_PUBLIC
    salt, info = b"session-0123456", b"purpose"
    ours = keys.agree(
        keys.load_private_key(X25519_ALICE_PRIVATE), X25519_BOB_PUBLIC, salt=salt, info=info
    )
    theirs = keys.agree(
        keys.load_private_key(X25519_BOB_PRIVATE), X25519_ALICE_PUBLIC, salt=salt, info=info
    )
    independent = HKDF(X25519_SHARED, 32, salt, SHA256, context=info)
    assert ours == theirs == independent
    other = keys.agree(
        keys.load_private_key(X25519_ALICE_PRIVATE), X25519_BOB_PUBLIC, salt=salt, info=b"x"
    )
    assert other != ours  # one X25519 output, one key per purpose


@pytest.mark.parametrize("peer", [bytes(32), b"\x01" + bytes(31), bytes(31), b"x" * 33])
def test_key_agreement_refuses_low_order_or_malformed_keys(peer: bytes) -> None:
    with pytest.raises(DecryptionError):
        keys.agree(keys.generate_private_key(os.urandom), peer, salt=b"s", info=b"i")


# -- share encryption ------------------------------------------------------------------------
def _context(**changes: object) -> bytes:
    fields = {"session": b"s" * 16, "round": 3, "sender": 11, "receiver": 22, **changes}
    return aead.associated_data(**fields)  # type: ignore[arg-type]


def test_share_encryption_round_trip_and_layout() -> None:
    key = os.urandom(32)
    ciphertext = aead.encrypt(key, b"share" * 10, _context(), os.urandom)
    assert len(ciphertext) == 50 + aead.OVERHEAD
    assert aead.decrypt(key, ciphertext, _context()) == b"share" * 10


@pytest.mark.parametrize(
    "changes",
    [
        {"session": b"t" * 16},  # another session (replayed across runs)
        {"round": 4},  # replayed in a later round
        {"sender": 12},  # claimed to come from someone else
        {"receiver": 23},  # rerouted
        {"sender": 22, "receiver": 11},  # reflected: same pair key, directions swapped
    ],
)
def test_associated_data_binds_session_round_sender_and_receiver(
    changes: dict[str, object],
) -> None:
    key = os.urandom(32)
    ciphertext = aead.encrypt(key, b"share", _context(), os.urandom)
    with pytest.raises(DecryptionError):
        aead.decrypt(key, ciphertext, _context(**changes))


def test_tampered_truncated_or_foreign_ciphertexts_fail() -> None:
    key = os.urandom(32)
    ciphertext = bytearray(aead.encrypt(key, b"share", _context(), os.urandom))
    for i in (0, 12, len(ciphertext) - 1):
        bad = bytearray(ciphertext)
        bad[i] ^= 1
        with pytest.raises(DecryptionError):
            aead.decrypt(key, bytes(bad), _context())
    with pytest.raises(DecryptionError, match="too short"):
        aead.decrypt(key, bytes(ciphertext[:20]), _context())
    with pytest.raises(DecryptionError):
        aead.decrypt(os.urandom(32), bytes(ciphertext), _context())


# -- quantization --------------------------------------------------------------------------
def test_quantization_sizes_the_sum_so_it_cannot_wrap() -> None:
    q = quantize.Quantization(cohort_size=100, clipping_range=8.0, max_weight=10_000)
    assert q.level == (2**31 - 1) // 100
    assert 100 * q.level <= quantize.SUM_BOUND
    assert q.scale == pytest.approx((q.level - 1) / 80_000)
    assert q.integer_limit(7) == q.level // 7
    with pytest.raises(InfeasibleParametersError, match="max_weight=10000 is too large"):
        quantize.Quantization(cohort_size=300_000, clipping_range=8.0, max_weight=10_000)
    with pytest.raises(InfeasibleParametersError):
        quantize.Quantization(cohort_size=2**31, clipping_range=1.0, max_weight=1)
    for bad in ({"clipping_range": 0.0}, {"clipping_range": math.inf}, {"max_weight": 0}):
        with pytest.raises(ValueError):
            quantize.Quantization(
                **{"cohort_size": 3, "clipping_range": 1.0, "max_weight": 1, **bad}
            )  # type: ignore[arg-type]


def _quantize(
    values: np.ndarray, factor: float, limit: float, seed: int = 0, block: int = 64
) -> tuple[np.ndarray, int]:
    out = np.zeros(values.size, dtype=np.uint32)
    stream = prg.UniformStream(randomness(seed)(32), block_words=block)
    clipped = quantize.quantize_into(out, values, factor=factor, limit=limit, uniform=stream)
    return quantize.to_signed(out), clipped


@settings(max_examples=50, deadline=None)
@given(
    n=st.integers(1, 1000),
    weight_fraction=st.floats(0, 1),
    values=st.lists(st.floats(-100, 100, allow_nan=False), min_size=1, max_size=50),
    seed=st.integers(0, 2**16),
)
def test_worst_case_sums_of_n_nodes_never_wrap(
    n: int, weight_fraction: float, values: list[float], seed: int
) -> None:
    q = quantize.Quantization(cohort_size=n, clipping_range=8.0, max_weight=1000)
    weight = round(weight_fraction * 1000)
    x = np.asarray(values, dtype=np.float64)
    signed, clipped = _quantize(x, q.float_factor(weight), q.float_limit(weight), seed)
    assert np.all(np.abs(signed) <= q.level)
    assert clipped == int(
        np.count_nonzero(np.abs(x * q.float_factor(weight)) > q.float_limit(weight))
    )
    # Rounding error below one step, outside the clipped values.
    inside = np.abs(x) <= 8.0
    assert np.all(np.abs(signed[inside] - x[inside] * q.float_factor(weight)) < 1.0)
    # n nodes at the worst case sum without wrapping: the decoded total is exact.
    worst = np.full(3, q.level, dtype=np.int64)
    total = np.zeros(3, dtype=np.uint32)
    for _ in range(min(n, 50)):
        total += worst.astype(np.uint32)
    total += (worst * (n - min(n, 50))).astype(np.uint32)
    assert quantize.to_signed(total).tolist() == [n * q.level] * 3
    assert quantize.to_signed((-worst * n).astype(np.uint32)).tolist() == [-n * q.level] * 3


def test_stochastic_rounding_is_unbiased() -> None:
    values = np.full(200_000, 0.3, dtype=np.float32)
    signed, _ = _quantize(values, 1.0, 10.0, seed=1, block=4096)
    assert set(np.unique(signed).tolist()) == {0, 1}
    sigma = math.sqrt(0.3 * 0.7 / values.size)
    assert abs(signed.mean() - float(np.float32(0.3))) < 5 * sigma
    negative, _ = _quantize(-values, 1.0, 10.0, seed=2, block=4096)
    assert abs(negative.mean() + float(np.float32(0.3))) < 5 * sigma


def test_quantization_does_not_depend_on_the_block_size() -> None:
    x = np.random.default_rng(0).normal(size=5000)
    a, _ = _quantize(x, 1000.0, 2**20, seed=7, block=16)
    b, _ = _quantize(x, 1000.0, 2**20, seed=7, block=4096)
    assert np.array_equal(a, b)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_refused_not_clipped(bad: float) -> None:
    x = np.array([0.1, bad, 0.2])
    with pytest.raises(InvalidUpdateError, match="NaN or infinite"):
        _quantize(x, 10.0, 100.0)


def test_integers_are_exact_or_refused() -> None:
    out = np.zeros(4, dtype=np.uint32)
    quantize.encode_integers_into(out, np.array([0, 3, -2, 7]), weight=3, limit=10)
    assert quantize.to_signed(out).tolist() == [0, 9, -6, 21]
    quantize.encode_integers_into(out[:2], np.array([True, False]), weight=1, limit=1)
    assert out[:2].tolist() == [1, 0]
    with pytest.raises(InvalidUpdateError, match="sum could wrap") as refused:
        quantize.encode_integers_into(out, np.array([0, 11, 0, 0]), weight=1, limit=10)
    assert not any(c.isdigit() for c in str(refused.value))  # no value, weight or limit
