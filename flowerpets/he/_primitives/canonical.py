"""A peer's TenSEAL bytes, re-encoded so that SEAL never inflates a compressed byte of theirs.

Why: SEAL 4.3 (inside TenSEAL 0.3.18) inflates a compressed object on demand
through a stream buffer whose destructor restores the exception mask of the
stream it reads from. An object compressed *inside* a compressed one (one
crafted ciphertext: two bit flips turn its coefficient array's header to zstd)
reads past the end of what its parent inflated, the restore throws from a
destructor, and C++ calls ``std::terminate``: the process dies, uncatchable.

So every SEAL object a peer sends is read here first. Its ``SEALHeader``
(SEAL's ``serialization.h``: magic ``0xA15E``, header size 16, version,
``compr_mode`` 0 none / 1 zlib / 2 zstd, reserved, total size) is checked, its
payload inflated with Python's ``zlib`` or ``zstandard`` into exactly the size
our parameters give (never more in memory), its members checked to be the one
layout SEAL 4 writes for our parameters (nested objects uncompressed, a
ciphertext's coefficients in full rather than as a seed), and it is handed on
as the equivalent uncompressed object (``compr_mode`` none, size fixed up),
inside TenSEAL's protobuf re-encoded from exactly the fields read. SEAL then
parses flat bytes of a size known in advance, and runs its own checks
(parameters id, coefficient ranges) on them.
"""

from __future__ import annotations

import struct
import threading
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import zstandard

from flowerpets.exceptions import CiphertextError, FlowerpetsError, KeyMaterialError

if TYPE_CHECKING:  # annotations only: params.py loads its contexts through this module
    from flowerpets.he._primitives.params import CKKSParameters

__all__ = [
    "LENGTH",
    "VARINT",
    "WORD",
    "Message",
    "canonical_ciphertext",
    "canonical_context",
    "proto_fields",
    "proto_message",
]

VARINT, WORD, LENGTH = 0, 1, 2  # protobuf wire types (WORD: 64 bits, a double here)
SEAL_MAGIC = 0xA15E
SEAL_MAJOR = 4  # the layouts below are SEAL 4's (3.x wrote no correction factor)
_HEADER = struct.Struct("<HBBBBHQ")  # magic, header size, major, minor, compr_mode, reserved, size
_NONE, _ZLIB, _ZSTD = 0, 1, 2
_CKKS = 2  # seal::scheme_type::ckks
_PARMS_ID = 32  # four uint64
_CIPHERTEXT_META = _PARMS_ID + 1 + 5 * 8  # parms_id, is_ntt_form, size, N, k, scale, correction
_PLAINTEXT_META = _PARMS_ID + 2 * 8  # parms_id, coeff_count, scale
_PARAMETERS_META = 1 + 2 * 8  # scheme, N, number of primes
_MODULUS = _HEADER.size + 8  # a nested Modulus object: a header and one uint64
# The largest window a zstd frame may ask of the decoder (the format's recommended decoder
# limit): it bounds what libzstd allocates, whatever a frame claims.
_ZSTD_MAX_WINDOW = 8 << 20
_PER_THREAD = threading.local()


@dataclass(slots=True)
class Message:
    """A protobuf message's fields by number: varints, and the bytes of the others."""

    varints: dict[int, int] = field(default_factory=dict)
    blobs: dict[int, bytes] = field(default_factory=dict)

    def numbers(self) -> set[int]:
        return set(self.varints) | set(self.blobs)


# -- protobuf: the three wire types TenSEAL's messages use --------------------------------------
def _varint(data: bytes, pos: int, error: type[FlowerpetsError], what: str) -> tuple[int, int]:
    """A protobuf base-128 varint at ``pos``: its value and the position after it."""
    value = 0
    for shift in range(0, 64, 7):
        if pos >= len(data):
            break
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if value >> 64:  # ten bytes can carry 70 bits; protobuf's varints have 64
                break
            return value, pos
    raise error(f"{what}: a bad varint in TenSEAL's serialization")


def proto_fields(
    data: bytes, shape: Mapping[int, int], error: type[FlowerpetsError], what: str
) -> Message:
    """A protobuf message whose fields are those ``shape`` names, of the wire types it gives.

    Only what TenSEAL writes is accepted: known fields, each at most once, in
    increasing order (protobuf itself would let a repeated field's last copy win).
    """
    message = Message()
    pos, last = 0, 0
    while pos < len(data):
        key, pos = _varint(data, pos, error, what)
        number, wire = key >> 3, key & 7
        if shape.get(number) != wire or number <= last:
            raise error(f"{what}: field {number} (wire type {wire}) unexpected in TenSEAL's form")
        last = number
        if wire == VARINT:
            message.varints[number], pos = _varint(data, pos, error, what)
            continue
        length = 8
        if wire == LENGTH:
            length, pos = _varint(data, pos, error, what)
        if pos + length > len(data):
            raise error(f"{what}: field {number} runs past the end of TenSEAL's serialization")
        message.blobs[number] = data[pos : pos + length]
        pos += length
    return message


def _varint_bytes(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def proto_message(shape: Mapping[int, int], message: Message) -> bytes:
    """:func:`proto_fields`'s inverse: the fields in increasing order."""
    parts = []
    for number in sorted(message.numbers()):
        wire = shape[number]
        parts.append(_varint_bytes(number << 3 | wire))
        if wire == VARINT:
            parts.append(_varint_bytes(message.varints[number]))
            continue
        blob = message.blobs[number]
        if wire == LENGTH:
            parts.append(_varint_bytes(len(blob)))
        parts.append(blob)
    return b"".join(parts)


# -- SEAL objects --------------------------------------------------------------------------------
def _inflate_zlib(payload: bytes, size: int, error: type[FlowerpetsError], what: str) -> bytes:
    """One zlib stream inflated to exactly ``size`` bytes; never more than that in memory."""
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(payload, size + 1)
    except zlib.error:
        raise error(f"{what}: its zlib stream does not inflate") from None
    if len(raw) != size or not inflater.eof or inflater.unused_data or inflater.unconsumed_tail:
        raise error(f"{what}: its zlib stream is not one stream of {size} bytes")
    return raw


def _zstd() -> zstandard.ZstdDecompressor:
    """This thread's decompressor: making one costs three times inflating a ciphertext, and one
    is not to be used by two threads at once (each ``decompress`` starts afresh)."""
    inflater: zstandard.ZstdDecompressor | None = getattr(_PER_THREAD, "zstd", None)
    if inflater is None:
        inflater = _PER_THREAD.zstd = zstandard.ZstdDecompressor(max_window_size=_ZSTD_MAX_WINDOW)
    return inflater


def _inflate_zstd(payload: bytes, size: int, error: type[FlowerpetsError], what: str) -> bytes:
    """One zstd frame inflated to exactly ``size`` bytes; never more than that in memory."""
    try:
        # decompress() allocates what a frame claims: that is compared with ours first.
        claimed = zstandard.get_frame_parameters(payload).content_size
        if claimed not in (size, zstandard.CONTENTSIZE_UNKNOWN):
            raise error(f"{what}: its zstd frame claims {claimed} bytes, expected {size}")
        raw = _zstd().decompress(payload, max_output_size=size, allow_extra_data=False)
    except zstandard.ZstdError:
        raise error(f"{what}: its zstd stream is not one frame of {size} bytes") from None
    if len(raw) != size:
        raise error(f"{what}: its zstd frame inflates to {len(raw)} bytes, expected {size}")
    return raw


def _members(
    obj: bytes, size: int, error: type[FlowerpetsError], what: str, *, nested: bool = False
) -> tuple[bytes, bytes]:
    """A serialized SEAL object's members (uncompressed, exactly ``size`` bytes) and header.

    The header returned is the object's own, of ``compr_mode`` none and sized
    for the uncompressed object. A ``nested`` object must be uncompressed
    (SEAL writes every nested object so).
    """
    if len(obj) < _HEADER.size:
        raise error(f"{what}: {len(obj)} bytes, shorter than a SEAL header")
    magic, header_size, major, minor, mode, reserved, total = _HEADER.unpack_from(obj)
    if (magic, header_size, major, reserved) != (SEAL_MAGIC, _HEADER.size, SEAL_MAJOR, 0):
        raise error(f"{what}: not a SEAL {SEAL_MAJOR} serialization header")
    if total != len(obj):
        raise error(f"{what}: its SEAL header says {total} bytes, it has {len(obj)}")
    if mode not in ((_NONE,) if nested else (_NONE, _ZLIB, _ZSTD)):
        raise error(f"{what}: compression mode {mode} where it is not accepted")
    raw = obj[_HEADER.size :]
    if mode == _ZLIB:
        raw = _inflate_zlib(raw, size, error, what)
    elif mode == _ZSTD:
        raw = _inflate_zstd(raw, size, error, what)
    elif len(raw) != size:
        raise error(f"{what}: {len(raw)} bytes of SEAL members, expected {size}")
    header = _HEADER.pack(SEAL_MAGIC, _HEADER.size, major, minor, _NONE, 0, _HEADER.size + size)
    return raw, header


def _uint64s(raw: bytes, offset: int, count: int) -> tuple[int, ...]:
    return struct.unpack_from(f"<{count}Q", raw, offset)


def _coefficients(
    raw: bytes, offset: int, count: int, error: type[FlowerpetsError], what: str
) -> None:
    """``raw`` ends with a nested array of exactly ``count`` uint64 (SEAL's ``DynArray``)."""
    members, _ = _members(raw[offset:], 8 + 8 * count, error, what, nested=True)
    if _uint64s(members, 0, 1)[0] != count:
        raise error(f"{what}: a coefficient array that is not of {count} coefficients")


def canonical_ciphertext(obj: bytes, params: CKKSParameters) -> bytes:
    """A SEAL ``Ciphertext`` of ``params`` (two polynomials at the data level), uncompressed.

    Anything else raises :class:`CiphertextError` before SEAL reads a byte.
    """
    what = "not a ciphertext of these parameters"
    degree, primes = params.poly_modulus_degree, params.data_primes
    count = 2 * degree * primes
    raw, header = _members(
        obj, _CIPHERTEXT_META + _HEADER.size + 8 + 8 * count, CiphertextError, what
    )
    shape = _uint64s(raw, _PARMS_ID + 1, 3)
    if shape != (2, degree, primes):
        raise CiphertextError(
            f"{what}: (polynomials, degree, primes) {shape}, expected {(2, degree, primes)}"
        )
    _coefficients(raw, _CIPHERTEXT_META, count, CiphertextError, what)
    return header + raw


def _canonical_parameters(obj: bytes, params: CKKSParameters, what: str) -> bytes:
    """SEAL ``EncryptionParameters``: CKKS, the ring degree, every prime (nested ``Modulus``)."""
    primes = len(params.coeff_mod_bit_sizes)
    moduli = primes + 1  # the plain modulus (zero for CKKS) is written too
    raw, header = _members(obj, _PARAMETERS_META + moduli * _MODULUS, KeyMaterialError, what)
    scheme = raw[0]
    degree, found = _uint64s(raw, 1, 2)
    if (scheme, degree, found) != (_CKKS, params.poly_modulus_degree, primes):
        raise KeyMaterialError(
            f"{what}: (scheme, degree, primes) {(scheme, degree, found)}, "
            f"expected {(_CKKS, params.poly_modulus_degree, primes)}"
        )
    for index in range(moduli):
        start = _PARAMETERS_META + index * _MODULUS
        _members(raw[start : start + _MODULUS], 8, KeyMaterialError, what, nested=True)
    return header + raw


def _canonical_secret_key(obj: bytes, params: CKKSParameters, what: str) -> bytes:
    """A SEAL ``SecretKey`` (a plaintext over every prime, the special one too)."""
    count = params.poly_modulus_degree * len(params.coeff_mod_bit_sizes)
    raw, header = _members(
        obj, _PLAINTEXT_META + _HEADER.size + 8 + 8 * count, KeyMaterialError, what
    )
    if _uint64s(raw, _PARMS_ID, 1)[0] != count:
        raise KeyMaterialError(f"{what}: a secret key that is not of {count} coefficients")
    _coefficients(raw, _PLAINTEXT_META, count, KeyMaterialError, what)
    return header + raw


# TenSEAL's tensealcontext.proto: TenSEALContextProto, TenSEALPublicProto, TenSEALPrivateProto.
_CONTEXT = {1: LENGTH, 2: LENGTH, 3: LENGTH, 4: VARINT}  # parameters, public, private, type
_PUBLIC = {2: VARINT, 3: WORD}  # auto flags, scale (1, 4, 5, the keys, are never ours)
_PRIVATE = {1: LENGTH, 2: VARINT, 3: VARINT}  # secret key, relin/galois keys wanted


def canonical_context(data: bytes, params: CKKSParameters, what: str) -> bytes:
    """A serialized TenSEAL context of ``params``, every SEAL object in it uncompressed.

    It holds the parameters and at most a secret key, as ours do: no public,
    relinearization or Galois key, nor a request to make one. Anything else
    raises :class:`KeyMaterialError`, naming ``what``, before SEAL reads a byte.
    """
    bad = f"{what} is not a TenSEAL context of {params.describe()}"
    context = proto_fields(data, _CONTEXT, KeyMaterialError, bad)
    if 1 not in context.blobs:
        raise KeyMaterialError(f"{bad}: it holds no encryption parameters")
    context.blobs[1] = _canonical_parameters(context.blobs[1], params, bad)
    if 2 in context.blobs:  # read for its shape alone: no keys in it
        proto_fields(context.blobs[2], _PUBLIC, KeyMaterialError, f"{bad} (or holds keys)")
    if 3 in context.blobs:
        private = proto_fields(context.blobs[3], _PRIVATE, KeyMaterialError, bad)
        if any(private.varints.values()):
            raise KeyMaterialError(f"{bad}: it asks for relinearization or Galois keys")
        if 1 in private.blobs:
            private.blobs[1] = _canonical_secret_key(private.blobs[1], params, bad)
        context.blobs[3] = proto_message(_PRIVATE, private)
    return proto_message(_CONTEXT, context)
