"""SEAL never inflates a peer's bytes: what reaches TenSEAL is flat, the rest is refused.

A ciphertext whose coefficient array claims to be zstd inside the zstd stream
made SEAL call ``std::terminate`` (an exception from a destructor), killing the
process; the risky loads here run in a child process so that a regression
fails the test instead of ending pytest.
"""

from __future__ import annotations

import contextlib
import os
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import tenseal as ts
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from flowerpets.exceptions import CiphertextError, KeyMaterialError, MissingKeyError
from flowerpets.he import COMPACT, WIDE, CKKSParameters
from flowerpets.he._primitives.canonical import (
    LENGTH,
    VARINT,
    Message,
    canonical_ciphertext,
    canonical_context,
    proto_fields,
    proto_message,
)
from flowerpets.he._primitives.ciphertexts import load_vector
from flowerpets.he._primitives.params import (
    load_public_context,
    load_secret_context,
    new_secret_context,
    public_context_bytes,
    secret_context_bytes,
)

ROOT = Path(__file__).resolve().parents[2]
HEADER = struct.Struct("<HBBBBHQ")  # SEAL's SEALHeader
VECTOR = {1: LENGTH, 2: LENGTH, 3: 1}  # TenSEAL's CKKSVectorProto: sizes, ciphertext, scale
CONTEXT = {1: LENGTH, 2: LENGTH, 3: LENGTH, 4: VARINT}  # TenSEALContextProto
NESTED = 73  # where a SEAL 4 ciphertext's coefficient array (a nested object) starts
# Two bit flips in a COMPACT ciphertext of 2,048 values: they land in the zstd stream, on the
# coefficient array's header, which then claims zstd (and 2^38 bytes). TenSEAL aborts on it.
KNOWN_CRASH = [(112, 1), (119, 6)]


def _flip(data: bytes, flips: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for position, bit in flips:
        out[position % len(out)] ^= 1 << bit
    return bytes(out)


def _seal_object(members: bytes, mode: int) -> bytes:
    """A SEAL 4.3 object of ``members``, stored (0), zlib (1) or zstd (2) as SEAL writes them."""
    payload = {0: members, 1: zlib.compress(members), 2: zstandard.compress(members)}[mode]
    return HEADER.pack(0xA15E, 16, 4, 3, mode, 0, 16 + len(payload)) + payload


def _members(obj: bytes) -> bytes:
    mode, payload = HEADER.unpack_from(obj)[4], obj[16:]
    if mode == 0:
        return payload
    return zlib.decompress(payload) if mode == 1 else zstandard.decompress(payload)


def _vector(blob: bytes, ciphertext: bytes) -> bytes:
    """``blob`` (a one-ciphertext TenSEAL vector) with its SEAL ciphertext replaced."""
    fields = proto_fields(blob, VECTOR, CiphertextError, "test")
    fields.blobs[2] = ciphertext
    return proto_message(VECTOR, fields)


def _ciphertext(blob: bytes) -> bytes:
    return proto_fields(blob, VECTOR, CiphertextError, "test").blobs[2]


def _with_nested_header(members: bytes, mode: int, size: int) -> bytes:
    """Ciphertext members whose coefficient array's header claims ``mode`` and ``size``."""
    magic, hsize, major, minor, _, reserved, _ = HEADER.unpack_from(members, NESTED)
    header = HEADER.pack(magic, hsize, major, minor, mode, reserved, size)
    return members[:NESTED] + header + members[NESTED + 16 :]


def _nested_in(blob: bytes, outer: int, inner: int, size: int) -> bytes:
    """``blob`` stored in mode ``outer``, its coefficient array claiming ``inner`` and ``size``."""
    members = _with_nested_header(_members(_ciphertext(blob)), inner, size)
    return _vector(blob, _seal_object(members, outer))


def _with_nested_prime(public: bytes, mode: int, size: int) -> bytes:
    """A public context whose first prime (a nested object) claims ``mode`` and ``size``."""
    fields = proto_fields(public, CONTEXT, KeyMaterialError, "test")
    members = _members(fields.blobs[1])
    start = 17  # scheme, degree, number of primes; then the primes' Modulus objects
    magic, hsize, major, minor, _, reserved, _ = HEADER.unpack_from(members, start)
    header = HEADER.pack(magic, hsize, major, minor, mode, reserved, size)
    forged = members[:start] + header + members[start + 16 :]
    fields.blobs[1] = _seal_object(forged, mode)
    return proto_message(CONTEXT, fields)


# -- the regression: the known crashing inputs, in a child process --------------------------------
_CHILD = r"""
import sys
import numpy as np, tenseal as ts
from flowerpets.exceptions import FlowerpetsError
from flowerpets.he import COMPACT
from flowerpets.he._primitives.ciphertexts import load_vector
from flowerpets.he._primitives.params import (
    load_public_context, new_secret_context, public_context_bytes,
)
sys.path.insert(0, sys.argv[1])
import test_canonical as t

secret = new_secret_context(COMPACT)
public_bytes = public_context_bytes(secret)
public = ts.context_from(public_bytes)
blob = ts.ckks_vector(secret, np.linspace(-1, 1, COMPACT.slots)).serialize()
huge = 1 << 38


def vector(data):
    load_vector(public, data, COMPACT, COMPACT.slots)


def context(data):
    load_public_context(data, COMPACT)


cases = {
    "known flips": (vector, t._flip(blob, t.KNOWN_CRASH)),
    "zstd in zstd": (vector, t._nested_in(blob, 2, 2, huge)),
    "zlib in zlib": (vector, t._nested_in(blob, 1, 1, huge)),
    "zstd in flat": (vector, t._nested_in(blob, 0, 2, 999)),
    "context zlib in zlib": (context, t._with_nested_prime(public_bytes, 1, huge)),
    "context zstd in zstd": (context, t._with_nested_prime(public_bytes, 2, huge)),
}
for name, (load, data) in cases.items():
    try:
        load(data)
        print(name, "loaded", flush=True)
    except FlowerpetsError as exc:
        print(name, type(exc).__name__, flush=True)
print("control", flush=True)  # TenSEAL itself, unguarded: this ends the process
ts.ckks_vector_from(public, cases["known flips"][1])
print("control survived", flush=True)
"""


def test_crafted_objects_are_refused_where_tenseal_aborts() -> None:
    """A ciphertext or a public context with an object compressed inside a compressed one."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    run = subprocess.run(
        [sys.executable, "-c", _CHILD, str(Path(__file__).parent)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = run.stdout.splitlines()
    assert lines[:6] == [
        "known flips CiphertextError",
        "zstd in zstd CiphertextError",
        "zlib in zlib CiphertextError",
        "zstd in flat CiphertextError",
        "context zlib in zlib KeyMaterialError",
        "context zstd in zstd KeyMaterialError",
    ], run.stdout + run.stderr  # a guard that lets one through: the child aborts first
    # The control: the same ciphertext given to TenSEAL directly still ends the process, so
    # the input above is the crashing one (if TenSEAL ever stops aborting, this says so).
    assert lines[6:] == ["control"] and run.returncode == -signal.SIGABRT, run.stderr


# -- what reaches TenSEAL ----------------------------------------------------------------------
def _assert_flat_ciphertext(obj: bytes, params: CKKSParameters) -> None:
    count = 2 * params.poly_modulus_degree * params.data_primes
    magic, _, major, _, mode, _, size = HEADER.unpack_from(obj)
    assert (magic, major, mode, size) == (0xA15E, 4, 0, len(obj))
    nested = HEADER.unpack_from(obj, 16 + NESTED)
    assert nested[4] == 0 and nested[6] == 16 + 8 + 8 * count
    assert len(obj) == 16 + NESTED + nested[6]


@pytest.mark.parametrize("params", [COMPACT, WIDE], ids=["compact", "wide"])
@pytest.mark.parametrize("mode", [0, 1, 2], ids=["stored", "zlib", "zstd"])
def test_every_compression_seal_writes_loads_to_the_same_values(
    params: CKKSParameters, mode: int
) -> None:
    secret = new_secret_context(params)
    public = ts.context_from(public_context_bytes(secret))
    values = np.linspace(-1, 1, params.slots)
    blob = ts.ckks_vector(secret, values).serialize()
    members = _members(_ciphertext(blob))
    sent = _vector(blob, _seal_object(members, mode))
    expected = ts.ckks_vector_from(secret, sent).decrypt()  # TenSEAL itself reads this form
    flat = canonical_ciphertext(_ciphertext(sent), params)
    _assert_flat_ciphertext(flat, params)
    assert flat[16:] == members
    loaded = load_vector(public, sent, params, params.slots)
    loaded.link_context(secret)
    assert loaded.decrypt() == expected
    np.testing.assert_allclose(expected, values, atol=1e-6)


def test_zstd_frames_without_a_content_size_are_read_too(blob: bytes) -> None:
    members = _members(_ciphertext(blob))
    payload = zstandard.ZstdCompressor(write_content_size=False).compress(members)
    sent = HEADER.pack(0xA15E, 16, 4, 3, 2, 0, 16 + len(payload)) + payload
    assert canonical_ciphertext(sent, COMPACT)[16:] == members


def _zstd_claiming(members: bytes, claimed: int) -> bytes:
    """A zstd frame of ``members`` whose header claims ``claimed`` bytes of content."""
    frame = zstandard.ZstdCompressor(write_content_size=False).compress(members)
    params = zstandard.get_frame_parameters(frame)
    assert params.content_size == zstandard.CONTENTSIZE_UNKNOWN
    # Frame header descriptor: set Frame_Content_Size_flag to 3 (8 bytes) and insert the size.
    descriptor = frame[4] | 0xC0
    window = frame[5:6] if not descriptor & 0x20 else b""
    rest = frame[5 + len(window) :]
    return frame[:4] + bytes([descriptor]) + window + struct.pack("<Q", claimed) + rest


@pytest.mark.parametrize(
    ("forge", "match"),
    [
        (lambda m: _zstd_claiming(m, 1 << 40), "claims 1099511627776 bytes"),  # no 1 TB buffer
        (lambda m: zstandard.ZstdCompressor(write_content_size=False).compress(m + b"\0"), "one"),
        (lambda m: zstandard.compress(m) + zstandard.compress(b"x"), "one frame"),
        (lambda m: zstandard.compress(m)[:-5], "one frame"),
        (lambda m: zstandard.compress(m[:-8]), "expected"),
        (lambda m: b"\0" * 64, "not one frame"),
    ],
)
def test_zstd_bombs_and_trailers_are_refused(blob: bytes, forge: object, match: str) -> None:
    payload = forge(_members(_ciphertext(blob)))  # type: ignore[operator]
    sent = HEADER.pack(0xA15E, 16, 4, 3, 2, 0, 16 + len(payload)) + payload
    with pytest.raises(CiphertextError, match=match):
        canonical_ciphertext(sent, COMPACT)


@pytest.mark.parametrize(
    "forge",
    [
        lambda m: zlib.compress(m + bytes(1 << 20)),  # a bomb: refused after size + 1 bytes
        lambda m: zlib.compress(m) + b"more",
        lambda m: zlib.compress(m)[:-4],
        lambda m: zlib.compress(m[:-8]),
        lambda m: zlib.compress(m, wbits=-15),  # raw deflate: not the zlib SEAL writes
    ],
)
def test_zlib_bombs_and_trailers_are_refused(blob: bytes, forge: object) -> None:
    payload = forge(_members(_ciphertext(blob)))  # type: ignore[operator]
    sent = HEADER.pack(0xA15E, 16, 4, 3, 1, 0, 16 + len(payload)) + payload
    with pytest.raises(CiphertextError, match="zlib"):
        canonical_ciphertext(sent, COMPACT)


@pytest.mark.parametrize(
    ("header", "match"),
    [
        ((0xA15F, 16, 4, 3, 2, 0), "header"),
        ((0xA15E, 17, 4, 3, 2, 0), "header"),
        ((0xA15E, 16, 3, 7, 2, 0), "header"),  # SEAL 3.x: another layout of the members
        ((0xA15E, 16, 4, 3, 2, 1), "header"),
        ((0xA15E, 16, 4, 3, 3, 0), "compression mode 3"),
    ],
)
def test_seal_headers_other_than_seal_4s_are_refused(
    blob: bytes, header: tuple[int, ...], match: str
) -> None:
    obj = _ciphertext(blob)
    forged = HEADER.pack(*header, len(obj)) + obj[16:]
    with pytest.raises(CiphertextError, match=match):
        canonical_ciphertext(forged, COMPACT)


def test_a_seal_object_is_exactly_as_long_as_its_header_says(blob: bytes) -> None:
    obj = _ciphertext(blob)
    for forged in (obj + b"\0", obj[:-1], obj[:10]):
        with pytest.raises(CiphertextError, match=r"says|shorter"):
            canonical_ciphertext(forged, COMPACT)


def test_members_must_be_a_full_fresh_ciphertext(blob: bytes) -> None:
    members = _members(_ciphertext(blob))
    count = 2 * COMPACT.poly_modulus_degree
    # Seeded (SEAL's compact form of a fresh symmetric ciphertext): half the coefficients,
    # then a seed object, padded here to the same length.
    seeded = _with_nested_header(members, 0, 16 + 8 + 4 * count)
    seeded = seeded[: NESTED + 16] + struct.pack("<Q", count // 2) + seeded[NESTED + 24 :]
    cases = [
        (_with_nested_header(members, 2, 16 + 8 + 8 * count), "compression mode 2"),
        (_with_nested_header(members, 1, 16 + 8 + 8 * count), "compression mode 1"),
        (seeded, "says"),  # a seed-expanded half: its own header and length disagree
        (
            members[: NESTED + 16] + struct.pack("<Q", count // 2) + members[NESTED + 24 :],
            "of 8192",
        ),
        (members[:33] + struct.pack("<Q", 3) + members[41:], r"\(3, 4096, 1\)"),
        (members[:-8], "expected"),
    ]
    for forged, match in cases:
        with pytest.raises(CiphertextError, match=match):
            canonical_ciphertext(_seal_object(forged, 2), COMPACT)


def _is_flat_or_refused(obj: bytes) -> None:
    with contextlib.suppress(CiphertextError):
        _assert_flat_ciphertext(canonical_ciphertext(obj, COMPACT), COMPACT)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 65_700), st.integers(0, 7)), min_size=1, max_size=8))
def test_bit_flipped_ciphertexts_reach_tenseal_flat_or_not_at_all(
    blob: bytes, flips: list[tuple[int, int]]
) -> None:
    """The invariant that keeps SEAL from aborting, checked without SEAL: no compression left."""
    obj = _ciphertext(blob)
    _is_flat_or_refused(_flip(obj, flips))
    _is_flat_or_refused(_flip(_seal_object(_members(obj), 0), flips))  # sent uncompressed


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_escape_the_guard_as_another_error(data: bytes) -> None:
    with contextlib.suppress(CiphertextError):
        canonical_ciphertext(data, COMPACT)
    with contextlib.suppress(KeyMaterialError):
        canonical_context(data, COMPACT, "public context")


def test_varints_wider_than_64_bits_are_refused() -> None:
    wide = b"\x20" + b"\xff" * 9 + b"\x7f"  # field 4: a varint of 70 bits
    with pytest.raises(KeyMaterialError, match="bad varint"):
        canonical_context(wide, COMPACT, "public context")


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 65_700), st.integers(0, 7)), min_size=1, max_size=8))
def test_bit_flipped_flat_ciphertexts_load_or_fail_typed(
    blob: bytes, public: ts.Context, flips: list[tuple[int, int]]
) -> None:
    # A peer may send the flat form itself: SEAL's own parsing of it must not crash either.
    flat = _vector(blob, _seal_object(_members(_ciphertext(blob)), 0))
    with contextlib.suppress(CiphertextError):
        load_vector(public, _flip(flat, flips), COMPACT, COMPACT.slots)


# -- contexts -----------------------------------------------------------------------------------


def _context_fields(data: bytes) -> Message:
    return proto_fields(data, CONTEXT, KeyMaterialError, "test")


@pytest.mark.parametrize("params", [COMPACT, WIDE], ids=["compact", "wide"])
def test_contexts_reach_tenseal_flat(params: CKKSParameters) -> None:
    context = new_secret_context(params)
    for data, secret in (
        (public_context_bytes(context), False),
        (secret_context_bytes(context), True),
    ):
        flat = canonical_context(data, params, "a context")
        fields = _context_fields(flat)
        parameters = fields.blobs[1]
        assert HEADER.unpack_from(parameters)[4] == 0
        assert parameters[16:] == _members(_context_fields(data).blobs[1])
        moduli = [
            HEADER.unpack_from(parameters, 16 + 17 + 24 * i)
            for i in range(len(params.coeff_mod_bit_sizes) + 1)
        ]
        assert all(m[4] == 0 and m[6] == 24 for m in moduli)
        if secret:
            key = proto_fields(fields.blobs[3], {1: LENGTH}, KeyMaterialError, "test").blobs[1]
            assert HEADER.unpack_from(key)[4] == 0
            assert HEADER.unpack_from(key, 16 + 48)[4] == 0
        again = [ts.context_from(d).serialize(save_secret_key=secret) for d in (flat, data)]
        assert again[0] == again[1]
    loaded = load_secret_context(secret_context_bytes(context), params)
    ciphertext = ts.ckks_vector(context, [1.5, -2.0]).serialize()
    np.testing.assert_allclose(
        ts.ckks_vector_from(loaded, ciphertext).decrypt(), [1.5, -2.0], atol=1e-6
    )


def test_contexts_with_keys_or_asking_for_them_are_refused() -> None:
    keyed = ts.context(ts.SCHEME_TYPE.CKKS, 4096, coeff_mod_bit_sizes=[60, 49])
    keyed.global_scale = COMPACT.scale
    for data in (
        keyed.serialize(save_secret_key=False),  # public and relinearization keys
        keyed.serialize(save_secret_key=False, save_relin_keys=False),
    ):
        ts.context_from(data)  # TenSEAL would take it
        with pytest.raises(KeyMaterialError, match="holds keys"):
            load_public_context(data, COMPACT)
    secret = secret_context_bytes(new_secret_context(COMPACT))
    fields = _context_fields(secret)
    private = proto_fields(
        fields.blobs[3], {1: LENGTH, 2: VARINT, 3: VARINT}, KeyMaterialError, "t"
    )
    for flag in (2, 3):  # relinearization or Galois keys to be made by the loader
        asking = Message(dict(private.varints) | {flag: 1}, dict(private.blobs))
        fields.blobs[3] = proto_message({1: LENGTH, 2: VARINT, 3: VARINT}, asking)
        with pytest.raises(KeyMaterialError, match="asks for"):
            load_secret_context(proto_message(CONTEXT, fields), COMPACT)
    with pytest.raises(KeyMaterialError, match="holds a secret key"):
        load_public_context(secret, COMPACT)
    with pytest.raises(MissingKeyError):
        load_secret_context(public_context_bytes(new_secret_context(COMPACT)), COMPACT)


def test_context_objects_compressed_inside_are_refused() -> None:
    public = public_context_bytes(new_secret_context(COMPACT))
    for mode in (1, 2):  # refused before SEAL reads it (TenSEAL's own load: in the child above)
        with pytest.raises(KeyMaterialError, match=f"compression mode {mode} where"):
            canonical_context(_with_nested_prime(public, mode, 24), COMPACT, "public context")
    fields = _context_fields(public)
    fields.blobs[1] = _seal_object(_members(fields.blobs[1]), 1)  # zlib, flat inside: fine
    context = load_public_context(proto_message(CONTEXT, fields), COMPACT)
    assert context.global_scale == COMPACT.scale


@settings(max_examples=100, deadline=None)
@given(
    st.booleans(),
    st.lists(st.tuples(st.integers(0, 70_000), st.integers(0, 7)), min_size=1, max_size=6),
)
def test_bit_flipped_contexts_load_or_fail_typed(
    secret: ts.Context, private: bool, flips: list[tuple[int, int]]
) -> None:
    load = load_secret_context if private else load_public_context
    data = secret_context_bytes(secret) if private else public_context_bytes(secret)
    with contextlib.suppress(KeyMaterialError, MissingKeyError):
        load(_flip(data, flips), COMPACT)
