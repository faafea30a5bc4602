"""Encrypting chunk by chunk, the wire form, and loading hostile ciphertexts safely."""

from __future__ import annotations

import contextlib
import json
import math
import struct
import tracemalloc

import numpy as np
import pytest
import tenseal as ts
from hypothesis import given, settings
from hypothesis import strategies as st

from flowerpets.core import Array, ArrayLayout, ArrayRecord
from flowerpets.exceptions import CiphertextError
from flowerpets.he import COMPACT, WIDE, CKKSParameters
from flowerpets.he._primitives.ciphertexts import (
    HEADER_NAME,
    Header,
    chunk_name,
    decrypt_vectors,
    encrypt_flat,
    load_vector,
    load_vectors,
    split_wire,
    tenseal_scale,
    wire_arrays,
)
from flowerpets.he._primitives.packing import Layout
from flowerpets.he._primitives.params import (
    new_secret_context,
)

KEY = "0123456789abcdef0123456789abcdef"


def _layout(size: int) -> Layout:
    return Layout.of({"w": np.zeros(size, np.float32)}, ["w"])


def test_encrypt_flat_round_trip_over_chunks(secret: ts.Context, public: ts.Context) -> None:
    rng = np.random.default_rng(1)
    flat = rng.standard_normal(2 * COMPACT.slots + 5)
    chunks = encrypt_flat(secret, flat, COMPACT.slots)
    assert len(chunks) == 3
    header = Header(key_id=KEY, params=COMPACT, layout=_layout(flat.size))
    vectors = load_vectors(public, chunks, header)  # the server's checks pass
    with pytest.raises(ValueError, match="secret_key"):
        decrypt_vectors(vectors, flat.size)  # ... but it cannot decrypt
    mine = load_vectors(secret, chunks, header)
    # SEAL's unseeded encryption noise: per-slot sd 1.3e-10 (200 runs, worst 6.5e-10), so
    # atol 1e-8 is 74 sd: P(fail) < 1e-100 with Gaussian tails, over all slots.
    np.testing.assert_allclose(decrypt_vectors(mine, flat.size), flat, atol=1e-8)
    with pytest.raises(CiphertextError, match="more than the 8"):
        decrypt_vectors(mine, 8)
    with pytest.raises(CiphertextError, match="expected"):
        decrypt_vectors(mine, flat.size + 1)


def test_header_round_trip_and_wire_split() -> None:
    header = Header(key_id=KEY, params=COMPACT, layout=_layout(5000), order=("b", "w"))
    assert Header.decode(header.encode()) == header
    assert header.chunks == 3
    record = wire_arrays(header, [b"x", b"y", b"z"])
    assert list(record) == [HEADER_NAME, chunk_name(0), chunk_name(1), chunk_name(2)]
    record["b"] = np.ones(2)
    plain, parsed, chunks = split_wire(record)
    assert list(plain) == ["b"] and parsed == header
    assert [c.numpy().tobytes() for c in chunks] == [b"x", b"y", b"z"]
    assert split_wire(ArrayRecord({"b": np.ones(2)})) == ({"b": record["b"]}, None, [])
    with pytest.raises(ValueError, match="3"):
        wire_arrays(header, [b"x"])


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda r: r.pop(chunk_name(2)), "missing"),
        (lambda r: r.__setitem__("he.extra", np.ones(1, np.uint8)), "unexpected"),
        (lambda r: r.pop(HEADER_NAME), "without a he.header"),
        (lambda r: r.__setitem__(HEADER_NAME, np.ones(3)), "uint8"),
        (lambda r: r.__setitem__(HEADER_NAME, np.frombuffer(b"{", np.uint8)), "malformed"),
    ],
)
def test_split_wire_refuses_what_does_not_match(mutate: object, match: str) -> None:
    header = Header(key_id=KEY, params=COMPACT, layout=_layout(5000))
    record = wire_arrays(header, [b"x", b"y", b"z"])
    mutate(record)  # type: ignore[operator]
    with pytest.raises(CiphertextError, match=match):
        split_wire(record)


@pytest.mark.parametrize("claimed", [2**30, 2**40])
def test_a_header_claiming_huge_sizes_fails_fast_without_allocating(claimed: int) -> None:
    """A few bytes of header claim ``claimed`` values (``claimed / 2048`` ciphertexts).

    Before the fix ``split_wire`` named every claimed chunk first (2^35 values: 113 s, 2.8 GB).
    """
    forged = Header(
        key_id=KEY,
        params=COMPACT,
        layout=Layout(ArrayLayout(("w",), ((claimed >> 10, 1 << 10),), ("<f8",))),
    )
    record = ArrayRecord({HEADER_NAME: forged.encode(), chunk_name(0): np.zeros(8, np.uint8)})
    round_header = Header(key_id=KEY, params=COMPACT, layout=_layout(5000), order=("w",))
    tracemalloc.start()
    try:
        with pytest.raises(CiphertextError, match="the round 5000 values"):
            split_wire(record, expected=round_header)  # the server: compared with the round's
        with pytest.raises(CiphertextError, match=f"of the {claimed // COMPACT.slots} ciphertexts"):
            split_wire(record)  # a node opening a model: bounded by what the record holds
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 256 << 10, f"{peak} bytes allocated for a forged header"


def test_split_wire_bounds_the_header_by_the_rounds() -> None:
    header = Header(key_id=KEY, params=COMPACT, layout=_layout(5000))
    record = wire_arrays(header, [b"x", b"y", b"z"])
    padded = json.dumps(json.loads(record[HEADER_NAME].numpy().tobytes()), indent=40_000)
    record[HEADER_NAME] = np.frombuffer(padded.encode(), np.uint8)
    assert split_wire(record)[1] == header  # valid JSON, within the absolute bound
    with pytest.raises(CiphertextError, match="at most"):
        split_wire(record, expected=header)


def _header_bytes(**changes: object) -> Array:
    body = {"v": 1, "key": KEY, "params": COMPACT.to_list(), "layout": [["w", "<f4", [3]]]}
    body["chunks"] = 1
    body.update(changes)
    return Array(np.frombuffer(json.dumps(body).encode(), np.uint8))


@pytest.mark.parametrize(
    "changes",
    [
        {"v": 2},
        {"key": "ABC"},
        {"params": [4096, 40, 60, 50]},  # 110 bits: insecure, refused
        {"chunks": 2},
        {"layout": [["w", "<i4", [3]]]},
        {"extra": 1},
        {"order": "w"},
        {"order": ["b"]},  # does not name the encrypted array
    ],
)
def test_malformed_headers_are_ciphertext_errors(changes: dict[str, object]) -> None:
    Header.decode(_header_bytes())  # the unchanged one parses
    with pytest.raises(CiphertextError):
        Header.decode(_header_bytes(**changes))


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=1, max_size=300))
def test_random_header_bytes_never_escape_as_another_error(data: bytes) -> None:
    with contextlib.suppress(CiphertextError):
        Header.decode(Array(np.frombuffer(data, np.uint8)))


def test_load_vector_checks(secret: ts.Context, public: ts.Context, blob: bytes) -> None:
    assert load_vector(public, blob, COMPACT, COMPACT.slots).size() == COMPACT.slots
    cases: list[tuple[bytes, str]] = [
        (b"", "0 bytes"),
        (b"garbage" * 10, "not a ciphertext"),
        (blob[:-100], "not a ciphertext"),
        (blob + bytes(COMPACT.ciphertext_bytes), "at most"),
    ]
    for data, match in cases:
        with pytest.raises(CiphertextError, match=match):
            load_vector(public, data, COMPACT, COMPACT.slots)
    with pytest.raises(CiphertextError, match="expected 5"):
        load_vector(public, blob, COMPACT, 5)
    # Another parameter set: SEAL refuses the parameters id.
    wide = ts.ckks_vector(new_secret_context(WIDE), np.ones(4)).serialize()
    with pytest.raises(CiphertextError):
        load_vector(public, wide, COMPACT, 4)
    # Same ring and primes, another scale.
    other = new_secret_context(CKKSParameters(4096, (60, 49), 30))
    with pytest.raises(CiphertextError, match="scale"):
        load_vector(public, ts.ckks_vector(other, np.ones(4)).serialize(), COMPACT, 4)
    # One "chunk" holding many ciphertexts (TenSEAL splits big vectors itself).
    many = ts.ckks_vector(secret, np.ones(3 * COMPACT.slots)).serialize()
    with pytest.raises(CiphertextError):
        load_vector(public, many, COMPACT, 3 * COMPACT.slots)
    with pytest.raises(CiphertextError, match="uint8"):
        load_vector(public, Array(np.ones(4)), COMPACT, 4)


def _with_scale(blob: bytes, scale: float) -> bytes:
    assert blob[-9] == 0x19  # CKKSVectorProto field 3 (the scale), a double, serialized last
    return blob[:-8] + struct.pack("<d", scale)


def test_tenseal_scale_is_read_and_checked(public: ts.Context, blob: bytes) -> None:
    """TenSEAL's own scale field, which SEAL's ``ct.scale`` check does not see (issue 9, item 3)."""
    assert tenseal_scale(blob) == COMPACT.scale
    wide = ts.ckks_vector(new_secret_context(WIDE), np.ones(4)).serialize()
    assert tenseal_scale(wide) == WIDE.scale
    for forged in (2.0**41, math.nextafter(2.0**40, math.inf), 0.0, -(2.0**40), math.nan):
        data = _with_scale(blob, forged)
        # TenSEAL itself takes it: SEAL's scale is untouched.
        assert ts.ckks_vector_from(public, data).ciphertext()[0].scale == COMPACT.scale
        with pytest.raises(CiphertextError, match="TenSEAL scale"):
            load_vector(public, data, COMPACT, COMPACT.slots)
    scale_field = blob[-9:]
    for data in (
        blob + scale_field,  # the field twice (the last one would win)
        blob[:-9] + _with_scale(blob, 2.0**41)[-9:] + scale_field,
        blob + b"\x20\x01",  # an unknown field after it
        blob[:-9],  # no scale
        b"\x12" + blob[1:],  # fields out of order
        blob[:-1],
        b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",  # an overlong varint
    ):
        with pytest.raises(CiphertextError, match="not a ciphertext"):
            load_vector(public, data, COMPACT, COMPACT.slots)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_tenseal_scale_never_escapes_as_another_error(data: bytes) -> None:
    with contextlib.suppress(CiphertextError):
        tenseal_scale(data)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 65_000), st.integers(0, 7)), min_size=1, max_size=8))
def test_bit_flipped_ciphertexts_load_or_fail_typed(
    blob: bytes, public: ts.Context, flips: list[tuple[int, int]]
) -> None:
    data = bytearray(blob)
    for position, bit in flips:
        data[position % len(data)] ^= 1 << bit
    # CKKS has no integrity: flips in the coefficients load fine; the rest must not crash.
    with contextlib.suppress(CiphertextError):
        load_vector(public, bytes(data), COMPACT, COMPACT.slots)
