"""The wire format: an explicit, versioned, bounded binary encoding (never pickle).

A :class:`~flowerpets.core.message.Message`, a bare
:class:`~flowerpets.core.records.RecordDict` and a single
:class:`~flowerpets.core.records.Array` each encode to one *frame*. Decoding
reads only what the layout below allows: every count and length is checked
against :class:`CodecLimits` and against the bytes that remain *before* anything
is allocated, and malformed input of any kind raises a subclass of
:class:`~flowerpets.exceptions.CodecError` naming what was wrong and at which
byte offset. Array data is never copied on decode: each decoded ``Array`` is a
read-only view of the input buffer (which it keeps alive).

Layout (version 1)
==================

All integers are little-endian and fixed-width. ``str`` is ``u32 n`` followed by
``n`` bytes of UTF-8 (strict: no surrogates); ``bytes`` is ``u32 n`` followed by
``n`` raw bytes. Offsets in the frame table are from the first byte of the frame.

Frame::

    offset  size  field
    0       4     magic: b"FPMG" Message | b"FPRD" RecordDict | b"FPAR" Array
    4       1     version, u8 = 1 (any other value: UnsupportedVersionError)
    5       8     total, u64: length of the whole frame, magic and CRC included
    13      ...   body: Message, RecordDict or Array (below)
    total-4 4     crc, u32: zlib.crc32 of bytes [0, total - 4)

Message body::

    run_id               u64
    message_id           str
    src_node_id          u64
    dst_node_id          u64
    round                u64
    message_type         str
    reply_to_message_id  str
    stage                str
    created_at           f64 (IEEE 754 binary64, bit-exact)

    (ids and round are unsigned: the encoder refuses negative values and values
    of 2**64 or more with a CodecError)
    content tag          u8: 1 = a RecordDict body follows, 2 = an Error follows
    Error                code u32 (an ErrorCode value) | reason str

RecordDict body (records and entries in insertion order, keys non-empty and
unique within their mapping)::

    count                u32
    count x record:      key str | kind u8 | n u32 | n x entry
        kind 1 ArrayRecord   entry = key str | Array body
        kind 2 MetricRecord  entry = key str | value (tags 0x01, 0x02, 0x11, 0x12)
        kind 3 ConfigRecord  entry = key str | value (any tag)

Array body::

    dtype_len            u8
    dtype                ASCII numpy ``dtype.str``, one of |b1 |i1 |u1 <i2 <i4 <i8
                         <u2 <u4 <u8 <f2 <f4 <f8 <c8 <c16 (big-endian input is
                         converted to little-endian on encode)
    ndim                 u8
    shape                ndim x u64
    nbytes               u64, must equal prod(shape) * itemsize
    padding              0-7 zero bytes: the data starts at a frame offset that
                         is a multiple of 8 (so decoded views are aligned)
    data                 nbytes, C order; |b1 bytes must be 0 or 1

    The product of the non-zero dimensions times the item size must be below
    2**63 (numpy's own bound; an array with a zero dimension has no data).

Value (a tag byte, then its payload)::

    0x01 int          i64
    0x02 float        f64
    0x03 str          str
    0x04 bytes        bytes
    0x05 bool         u8, 0 or 1
    0x11 list[int]    u32 n | n x i64
    0x12 list[float]  u32 n | n x f64
    0x13 list[str]    u32 n | n x str
    0x14 list[bytes]  u32 n | n x bytes
    0x15 list[bool]   u32 n | n x u8 (0 or 1)

    An empty list is written as 0x11 with n = 0; every list tag with n = 0
    decodes to ``[]``. ``bool`` and ``int`` are distinct tags, so ``True`` and
    ``1`` survive a round trip as themselves.

Bounds (:class:`CodecLimits`, checked on encode and on decode, exceeding one
raises :class:`~flowerpets.exceptions.MessageTooLargeError`): ``total`` <=
``max_message_bytes``; records <= ``max_records``; entries of one record <=
``max_entries_per_record``; keys and the metadata strings <= ``max_key_bytes``;
str/bytes values and the error reason <= ``max_string_bytes``; ``ndim`` <=
``max_ndim``; list items <= ``max_list_items``; on decode, the Python objects
built for strings, bytes, list items, records and their entries <=
``max_decoded_bytes`` (by default ``max_message_bytes`` + 1 MiB), charged at what
CPython takes for each before it is built (arrays are views and cost only their
header), so a message never decodes into much more memory than its limit.

Errors on decode, checked in this order: magic (``CorruptMessageError``),
version (``UnsupportedVersionError``), ``total`` against the limit
(``MessageTooLargeError``) and the input length (fewer bytes:
``TruncatedMessageError``, more: ``CorruptMessageError``), CRC
(``CorruptMessageError``), then the body (lengths running past the body:
``TruncatedMessageError``; anything else malformed, including bytes left over
after the body: ``CorruptMessageError``). The header is read before the CRC can
be checked, so damage to ``total`` itself may show as truncation; damage
anywhere else is caught by the CRC. The encoder is deterministic: equal
inputs give equal bytes, and any change to this layout bumps
:data:`FORMAT_VERSION`.
"""

from __future__ import annotations

import math
import struct
import sys
import zlib
from dataclasses import dataclass, fields
from typing import Any, Final, NoReturn

import numpy as np

from flowerpets.core.message import Error, ErrorCode, Message, Metadata
from flowerpets.core.records import (
    Array,
    ArrayRecord,
    ConfigRecord,
    ConfigValue,
    MetricRecord,
    MetricValue,
    RecordDict,
)
from flowerpets.exceptions import (
    CodecError,
    CorruptMessageError,
    MessageTooLargeError,
    RecordTypeError,
    TruncatedMessageError,
    UnsupportedVersionError,
)

__all__ = [
    "DEFAULT_LIMITS",
    "FORMAT_VERSION",
    "CodecLimits",
    "decode_array",
    "decode_message",
    "decode_record_dict",
    "encode_array",
    "encode_message",
    "encode_record_dict",
]

FORMAT_VERSION: Final = 1

_MAGIC_MESSAGE: Final = b"FPMG"
_MAGIC_RECORD_DICT: Final = b"FPRD"
_MAGIC_ARRAY: Final = b"FPAR"

_U8: Final = struct.Struct("<B")
_U32: Final = struct.Struct("<I")
_U64: Final = struct.Struct("<Q")
_I64: Final = struct.Struct("<q")
_F64: Final = struct.Struct("<d")
_HEADER: Final = struct.Struct("<4sBQ")  # magic, version, total
_HEADER_SIZE: Final = _HEADER.size  # 13
_CRC_SIZE: Final = 4
_DATA_ALIGNMENT: Final = 8

_U32_MAX: Final = 2**32 - 1
_U64_MAX: Final = 2**64 - 1
_I64_MIN: Final = -(2**63)
_I64_MAX: Final = 2**63 - 1
_INTP_MAX: Final = 2**63 - 1
_NUMPY_MAX_DIMS: Final = 64

_CONTENT_RECORDS: Final = 1
_CONTENT_ERROR: Final = 2

_KIND_ARRAYS: Final = 1
_KIND_METRICS: Final = 2
_KIND_CONFIG: Final = 3

_TAG_INT: Final = 0x01
_TAG_FLOAT: Final = 0x02
_TAG_STR: Final = 0x03
_TAG_BYTES: Final = 0x04
_TAG_BOOL: Final = 0x05
_TAG_LIST_INT: Final = 0x11
_TAG_LIST_FLOAT: Final = 0x12
_TAG_LIST_STR: Final = 0x13
_TAG_LIST_BYTES: Final = 0x14
_TAG_LIST_BOOL: Final = 0x15
_METRIC_TAGS: Final = frozenset({_TAG_INT, _TAG_FLOAT, _TAG_LIST_INT, _TAG_LIST_FLOAT})

# The dtypes with a platform-independent byte layout (long double is not one).
_DTYPES: Final[dict[str, np.dtype[Any]]] = {
    s: np.dtype(s)
    for s in (
        "|b1",
        "|i1",
        "|u1",
        "<i2",
        "<i4",
        "<i8",
        "<u2",
        "<u4",
        "<u8",
        "<f2",
        "<f4",
        "<f8",
        "<c8",
        "<c16",
    )
}
_MAX_DTYPE_LEN: Final = max(len(s) for s in _DTYPES)


_DECODE_ALLOWANCE: Final = 1 << 20  # object headers of small messages, on top of their bytes


@dataclass(frozen=True, slots=True)
class CodecLimits:
    """Bounds on what :func:`encode_message` writes and :func:`decode_message` accepts.

    Both sides check every bound, so anything the encoder writes the decoder
    (with the same limits) reads back. ``max_message_bytes`` is the main
    defence; the others bound how much work and how many objects one message
    can ask for. The Python objects a decoder builds (a list of small values
    takes 4-24 times its encoded bytes) are bounded by ``max_decoded_bytes``
    (None: ``max_message_bytes`` plus 1 MiB for small messages' object
    headers), checked before each is built: a message
    that would decode into more raises
    :class:`~flowerpets.exceptions.MessageTooLargeError`, so decoding never
    needs much more memory than the input's limit. Encoding does not check it.
    """

    max_message_bytes: int = 1 << 31
    max_records: int = 4096
    max_entries_per_record: int = 100_000
    max_key_bytes: int = 1024
    max_string_bytes: int = 16 << 20
    max_ndim: int = 32
    max_list_items: int = 10_000_000
    max_decoded_bytes: int | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.name == "max_decoded_bytes":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"CodecLimits.{f.name} must be a positive int, got {value!r}")
        # These are written as u32 counts/lengths (max_ndim as a u8 and numpy's bound).
        for name in (
            "max_records",
            "max_entries_per_record",
            "max_key_bytes",
            "max_string_bytes",
            "max_list_items",
        ):
            if getattr(self, name) > _U32_MAX:
                raise ValueError(f"CodecLimits.{name} must be at most {_U32_MAX}")
        if self.max_ndim > _NUMPY_MAX_DIMS:
            raise ValueError(
                f"CodecLimits.max_ndim must be at most {_NUMPY_MAX_DIMS} (numpy's limit), "
                f"got {self.max_ndim}"
            )

    def decoded_bytes(self) -> int:
        """The bound on the Python objects one decode builds (see the class docstring)."""
        if self.max_decoded_bytes is not None:
            return self.max_decoded_bytes
        return self.max_message_bytes + _DECODE_ALLOWANCE


DEFAULT_LIMITS: Final = CodecLimits()


# =============================================================================
# Encoding
# =============================================================================


def _too_large(what: str, size: int, limit_name: str, limit: int) -> NoReturn:
    raise MessageTooLargeError(f"{what} is {size}, more than {limit_name}={limit}")


class _Writer:
    """Collects the parts of one frame, checking the size bound as it grows."""

    __slots__ = ("limits", "magic", "parts", "size")

    def __init__(self, magic: bytes, limits: CodecLimits) -> None:
        self.limits = limits
        self.magic = magic
        # The header's ``total`` is filled in by finish().
        self.parts: list[bytes | memoryview] = [_HEADER.pack(magic, FORMAT_VERSION, 0)]
        self.size = _HEADER_SIZE

    def reserve(self, n: int) -> None:
        """Account for ``n`` more bytes, failing before they are built if too many."""
        self.size += n
        if self.size + _CRC_SIZE > self.limits.max_message_bytes:
            raise MessageTooLargeError(
                f"the encoding needs at least {self.size + _CRC_SIZE} bytes, more than "
                f"max_message_bytes={self.limits.max_message_bytes}"
            )

    def raw(self, data: bytes | memoryview) -> None:
        self.reserve(len(data))
        self.parts.append(data)

    def u8(self, value: int) -> None:
        self.raw(_U8.pack(value))

    def u32(self, value: int) -> None:
        self.raw(_U32.pack(value))

    def u64(self, value: int, what: str) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _U64_MAX:
            raise CodecError(f"{what} must be an int in [0, 2**64), got {value!r}")
        self.raw(_U64.pack(value))

    def i64(self, value: int, what: str) -> None:
        if not _I64_MIN <= value <= _I64_MAX:
            raise CodecError(f"{what} = {value} does not fit in a signed 64-bit integer")
        self.raw(_I64.pack(value))

    def f64(self, value: float, what: str) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise CodecError(f"{what} must be a float, got {value!r}")
        try:
            self.raw(_F64.pack(float(value)))
        except OverflowError:
            raise CodecError(f"{what} = {value} does not fit in a float64") from None

    def count(self, n: int, what: str, limit_name: str, limit: int) -> None:
        if n > limit:
            _too_large(what, n, limit_name, limit)
        self.u32(n)

    def blob(self, data: bytes, what: str, limit_name: str, limit: int) -> None:
        if len(data) > limit:
            raise MessageTooLargeError(
                f"{what} is {len(data)} bytes, more than {limit_name}={limit}"
            )
        self.u32(len(data))
        self.raw(data)

    def text(self, value: str, what: str, limit_name: str, limit: int) -> None:
        if not isinstance(value, str):
            raise CodecError(f"{what} must be a str, got {type(value).__name__}")
        try:
            data = value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise CodecError(f"{what} cannot be encoded as UTF-8: {exc.reason}") from None
        self.blob(data, what, limit_name, limit)

    def key(self, key: str, what: str) -> None:
        self.text(key, what, "max_key_bytes", self.limits.max_key_bytes)

    def padding(self) -> None:
        pad = -self.size % _DATA_ALIGNMENT
        if pad:
            self.raw(bytes(pad))

    def finish(self) -> bytes:
        total = self.size + _CRC_SIZE
        self.parts[0] = _HEADER.pack(self.magic, FORMAT_VERSION, total)
        crc = 0
        for part in self.parts:
            crc = zlib.crc32(part, crc)
        self.parts.append(_U32.pack(crc))
        return b"".join(self.parts)


def _write_array(w: _Writer, array: Array, what: str) -> None:
    data = array.numpy()
    dtype = data.dtype.newbyteorder("<")
    dtype_str = dtype.str
    if dtype_str not in _DTYPES:
        raise CodecError(
            f"{what}: dtype {data.dtype.str!r} has no portable encoding "
            f"(allowed: {', '.join(_DTYPES)})"
        )
    limits = w.limits
    if data.ndim > limits.max_ndim:
        _too_large(f"{what}: ndim", data.ndim, "max_ndim", limits.max_ndim)
    w.u8(len(dtype_str))
    w.raw(dtype_str.encode("ascii"))
    w.u8(data.ndim)
    if data.ndim:
        w.raw(struct.pack(f"<{data.ndim}Q", *data.shape))
    w.raw(_U64.pack(data.nbytes))
    w.padding()
    w.reserve(data.nbytes)  # fails before any conversion or copy of a too-large array
    if data.dtype != dtype:  # big-endian (or native '=' on a big-endian machine)
        data = data.astype(dtype)
    data = np.ascontiguousarray(data)
    w.parts.append(data.reshape(-1).view(np.uint8).data)


# Scalar types in the order they are tried (bool before int: a bool is an int).
_SCALAR_TAGS: Final = (
    (bool, _TAG_BOOL),
    (int, _TAG_INT),
    (float, _TAG_FLOAT),
    (str, _TAG_STR),
    (bytes, _TAG_BYTES),
)
_LIST_OF: Final = {
    _TAG_BOOL: _TAG_LIST_BOOL,
    _TAG_INT: _TAG_LIST_INT,
    _TAG_FLOAT: _TAG_LIST_FLOAT,
    _TAG_STR: _TAG_LIST_STR,
    _TAG_BYTES: _TAG_LIST_BYTES,
}


def _tag_of(value: Any) -> int | None:
    for cls, tag in _SCALAR_TAGS:
        if isinstance(value, cls):
            return tag
    return None


def _list_tag(items: list[Any]) -> int:
    if not items:
        return _TAG_LIST_INT
    tag = _tag_of(items[0])
    if tag is None:
        raise CodecError(f"list items of type {type(items[0]).__name__} cannot be encoded")
    return _LIST_OF[tag]


def _scalar_tag(value: Any) -> int:
    tag = _tag_of(value)
    if tag is None:
        raise CodecError(f"a value of type {type(value).__name__} cannot be encoded")
    return tag


def _pack_list(fmt: str, items: list[Any], what: str) -> bytes:
    try:
        return struct.pack(f"<{len(items)}{fmt}", *items)
    except struct.error as exc:
        raise CodecError(f"{what}: a list item cannot be encoded as {fmt!r}: {exc}") from None


def _write_value(w: _Writer, value: Any, what: str, allowed: frozenset[int] | None) -> None:
    tag = _list_tag(value) if isinstance(value, list) else _scalar_tag(value)
    if allowed is not None and tag not in allowed:
        raise CodecError(f"{what}: a {type(value).__name__} cannot be encoded in this record")
    limits = w.limits
    w.u8(tag)
    if tag == _TAG_INT:
        w.i64(value, what)
    elif tag == _TAG_FLOAT:
        w.raw(_F64.pack(value))
    elif tag == _TAG_STR:
        w.text(value, what, "max_string_bytes", limits.max_string_bytes)
    elif tag == _TAG_BYTES:
        w.blob(value, what, "max_string_bytes", limits.max_string_bytes)
    elif tag == _TAG_BOOL:
        w.u8(1 if value else 0)
    else:
        items: list[Any] = value
        w.count(len(items), f"{what}: list length", "max_list_items", limits.max_list_items)
        item_type = {
            _TAG_LIST_INT: int,
            _TAG_LIST_FLOAT: float,
            _TAG_LIST_STR: str,
            _TAG_LIST_BYTES: bytes,
            _TAG_LIST_BOOL: bool,
        }[tag]
        if tag != _TAG_LIST_BOOL and any(isinstance(item, bool) for item in items):
            raise CodecError(f"{what}: a list mixes bool with {item_type.__name__}")
        if not all(isinstance(item, item_type) for item in items):
            raise CodecError(f"{what}: every list item must be a {item_type.__name__}")
        if tag == _TAG_LIST_INT:
            w.raw(_pack_list("q", items, what))
        elif tag == _TAG_LIST_FLOAT:
            w.raw(_pack_list("d", items, what))
        elif tag == _TAG_LIST_BOOL:
            w.raw(bytes(items))
        elif tag == _TAG_LIST_STR:
            for item in items:
                w.text(item, what, "max_string_bytes", limits.max_string_bytes)
        else:
            for item in items:
                w.blob(item, what, "max_string_bytes", limits.max_string_bytes)


def _write_record_dict(w: _Writer, records: RecordDict) -> None:
    if not isinstance(records, RecordDict):
        raise CodecError(f"expected a RecordDict, got {type(records).__name__}")
    limits = w.limits
    w.count(len(records), "the number of records", "max_records", limits.max_records)
    for name, record in records.items():
        w.key(name, "a record key")
        if isinstance(record, ArrayRecord):
            kind = _KIND_ARRAYS
        elif isinstance(record, MetricRecord):
            kind = _KIND_METRICS
        elif isinstance(record, ConfigRecord):
            kind = _KIND_CONFIG
        else:  # pragma: no cover - RecordDict refuses anything else on write
            raise CodecError(f"record {name!r} is a {type(record).__name__}")
        w.u8(kind)
        w.count(
            len(record),
            f"the number of entries of record {name!r}",
            "max_entries_per_record",
            limits.max_entries_per_record,
        )
        if isinstance(record, ArrayRecord):
            for key, array in record.items():
                w.key(key, f"a key of record {name!r}")
                _write_array(w, array, f"record {name!r} entry {key!r}")
        else:
            allowed = _METRIC_TAGS if kind == _KIND_METRICS else None
            for key, value in record.items():
                w.key(key, f"a key of record {name!r}")
                _write_value(w, value, f"record {name!r} entry {key!r}", allowed)


def _write_metadata(w: _Writer, md: Metadata) -> None:
    if not isinstance(md, Metadata):
        raise CodecError(f"expected Metadata, got {type(md).__name__}")
    w.u64(md.run_id, "metadata.run_id")
    w.key(md.message_id, "metadata.message_id")
    w.u64(md.src_node_id, "metadata.src_node_id")
    w.u64(md.dst_node_id, "metadata.dst_node_id")
    w.u64(md.round, "metadata.round")
    w.key(md.message_type, "metadata.message_type")
    w.key(md.reply_to_message_id, "metadata.reply_to_message_id")
    w.key(md.stage, "metadata.stage")
    w.f64(md.created_at, "metadata.created_at")


def encode_message(message: Message, *, limits: CodecLimits = DEFAULT_LIMITS) -> bytes:
    """Encode ``message`` as one frame (see the module docstring for the layout).

    Raises :class:`~flowerpets.exceptions.MessageTooLargeError` as soon as the
    encoding would exceed a bound of ``limits`` (before any large copy), and
    :class:`~flowerpets.exceptions.CodecError` for a value the format cannot
    represent (a negative node id, an int beyond 64 bits, a long double array).
    """
    w = _Writer(_MAGIC_MESSAGE, limits)
    _write_metadata(w, message.metadata)
    if message.error is not None:
        w.u8(_CONTENT_ERROR)
        code = message.error.code
        if not isinstance(code, ErrorCode):
            raise CodecError(f"error code must be an ErrorCode, got {code!r}")
        w.u32(int(code))
        w.text(message.error.reason, "error reason", "max_string_bytes", limits.max_string_bytes)
    elif message.content is not None:
        w.u8(_CONTENT_RECORDS)
        _write_record_dict(w, message.content)
    else:  # pragma: no cover - Message refuses this on construction
        raise CodecError("a Message holds exactly one of content or error")
    return w.finish()


def encode_record_dict(records: RecordDict, *, limits: CodecLimits = DEFAULT_LIMITS) -> bytes:
    """Encode a bare RecordDict as one frame (magic ``FPRD``)."""
    w = _Writer(_MAGIC_RECORD_DICT, limits)
    _write_record_dict(w, records)
    return w.finish()


def encode_array(array: Array, *, limits: CodecLimits = DEFAULT_LIMITS) -> bytes:
    """Encode one Array as one frame (magic ``FPAR``)."""
    if not isinstance(array, Array):
        raise CodecError(f"expected an Array, got {type(array).__name__}")
    w = _Writer(_MAGIC_ARRAY, limits)
    _write_array(w, array, "array")
    return w.finish()


# =============================================================================
# Decoding
# =============================================================================


# What decoding builds, in bytes of CPython objects (64-bit), charged before it is built:
_LIST_SLOT: Final = 24  # a list item's pointer, in the decoded list and the two lists a
#                        record's check makes of it (list() and its per-item conversion)
_NUMBER_COST: Final = 36  # an int below 2**63 (a float takes 24)
_STR_COST: Final = 80  # a str's header; its characters take at most its UTF-8 bytes
_BYTES_COST: Final = 40  # 33, rounded up as the allocator does
_ENTRY_COST: Final = 200  # a record entry: its key (charged here with its header) and dict slot
_RECORD_COST: Final = 400  # a record, or an array's header (the data is a view: not charged)


class _Reader:
    """Reads a frame's body, bounds-checking every read before it happens."""

    __slots__ = ("_budget", "_end", "buf", "limits", "pos")

    def __init__(self, buf: memoryview, pos: int, end: int, limits: CodecLimits) -> None:
        self.buf = buf
        self.pos = pos
        self._end = end
        self.limits = limits
        self._budget = limits.decoded_bytes()

    def charge(self, n: int, what: str) -> None:
        """Account for ``n`` bytes of Python objects about to be built for ``what``."""
        self._budget -= n
        if self._budget < 0:
            raise MessageTooLargeError(
                f"{what} at byte offset {self.pos}: decoding would build more than "
                f"{self.limits.decoded_bytes()} bytes of Python objects (max_decoded_bytes, "
                "by default max_message_bytes + 1 MiB)"
            )

    @property
    def remaining(self) -> int:
        return self._end - self.pos

    def take(self, n: int, what: str) -> int:
        """Reserve ``n`` bytes and return where they start."""
        pos = self.pos
        if n > self._end - pos:
            raise TruncatedMessageError(
                f"{what} at byte offset {pos} needs {n} bytes, but the body has only "
                f"{self._end - pos} left"
            )
        self.pos = pos + n
        return pos

    def u8(self, what: str) -> int:
        return self.buf[self.take(1, what)]

    def u32(self, what: str) -> int:
        value: int = _U32.unpack_from(self.buf, self.take(4, what))[0]
        return value

    def u64(self, what: str) -> int:
        value: int = _U64.unpack_from(self.buf, self.take(8, what))[0]
        return value

    def i64(self, what: str) -> int:
        value: int = _I64.unpack_from(self.buf, self.take(8, what))[0]
        return value

    def f64(self, what: str) -> float:
        value: float = _F64.unpack_from(self.buf, self.take(8, what))[0]
        return value

    def count(self, what: str, limit_name: str, limit: int, min_item_size: int) -> int:
        """A u32 count, checked against its limit and against the bytes left."""
        at = self.pos
        n = self.u32(what)
        if n > limit:
            raise MessageTooLargeError(
                f"{what} at byte offset {at} is {n}, more than {limit_name}={limit}"
            )
        if n * min_item_size > self.remaining:
            raise TruncatedMessageError(
                f"{what} at byte offset {at} is {n}, but {n} items need at least "
                f"{n * min_item_size} bytes and only {self.remaining} are left"
            )
        return n

    def blob(self, what: str, limit_name: str, limit: int) -> tuple[int, int]:
        """A length-prefixed byte string: (start, length); nothing is copied."""
        at = self.pos
        n = self.u32(f"{what} length")
        if n > limit:
            raise MessageTooLargeError(
                f"{what} at byte offset {at} is {n} bytes, more than {limit_name}={limit}"
            )
        return self.take(n, what), n

    def text(self, what: str, limit_name: str, limit: int, *, charged: bool = False) -> str:
        start, n = self.blob(what, limit_name, limit)
        if charged:  # an ASCII str of n bytes takes _STR_COST + n bytes at most
            self.charge(_STR_COST + n, what)
        try:
            value = str(self.buf[start : start + n], "utf-8")
        except UnicodeDecodeError as exc:
            raise CorruptMessageError(
                f"{what} at byte offset {start + exc.start} is not valid UTF-8 ({exc.reason})"
            ) from None
        if charged and not value.isascii():  # up to 4 bytes a character: charge the rest
            self.charge(max(0, sys.getsizeof(value) - n), what)
        return value

    def key(self, what: str) -> str:
        at = self.pos
        key = self.text(what, "max_key_bytes", self.limits.max_key_bytes)
        if not key:
            raise CorruptMessageError(f"{what} at byte offset {at} is empty")
        return key

    def metadata_text(self, what: str) -> str:
        return self.text(what, "max_key_bytes", self.limits.max_key_bytes)

    def string_value(self, what: str) -> str:
        return self.text(what, "max_string_bytes", self.limits.max_string_bytes, charged=True)

    def bytes_value(self, what: str) -> bytes:
        start, n = self.blob(what, "max_string_bytes", self.limits.max_string_bytes)
        self.charge(_BYTES_COST + n, what)
        return bytes(self.buf[start : start + n])

    def fixed_list(self, fmt: str, n: int, what: str) -> list[Any]:
        self.charge(n * (_LIST_SLOT + _NUMBER_COST), what)
        start = self.take(8 * n, what)
        items: list[Any] = np.frombuffer(self.buf, dtype=fmt, count=n, offset=start).tolist()
        return items

    def bool_byte(self, what: str) -> bool:
        at = self.pos
        byte = self.u8(what)
        if byte > 1:
            raise CorruptMessageError(f"{what} at byte offset {at} is {byte}, not 0 or 1")
        return byte == 1

    def view(self, start: int, n: int) -> memoryview:
        return self.buf[start : start + n]

    def finish(self, what: str) -> None:
        if self.pos != self._end:
            raise CorruptMessageError(
                f"{self._end - self.pos} unexpected bytes after the {what} at byte offset "
                f"{self.pos}"
            )


def _open_frame(
    data: bytes | bytearray | memoryview, magic: bytes, kind: str, limits: CodecLimits
) -> _Reader:
    """Check a frame's header, length and CRC; return a reader positioned at its body."""
    buf = memoryview(data)
    if buf.ndim != 1 or buf.format != "B" or not buf.c_contiguous:
        try:
            buf = buf.cast("B")
        except (TypeError, ValueError):  # a non-contiguous view or an unusual format
            buf = memoryview(buf.tobytes())
    n = len(buf)
    head = bytes(buf[: len(magic)])
    if head != magic[: len(head)]:
        known = {_MAGIC_MESSAGE: "a Message", _MAGIC_RECORD_DICT: "a RecordDict"}
        known[_MAGIC_ARRAY] = "an Array"
        other = known.get(head)
        hint = f" (this is {other} frame)" if other else ""
        raise CorruptMessageError(f"bad magic {head!r} at byte offset 0, expected {magic!r}{hint}")
    if n < len(magic) + 1:
        raise TruncatedMessageError(f"{kind}: input of {n} bytes ends inside the header")
    version = buf[len(magic)]
    if version != FORMAT_VERSION:
        raise UnsupportedVersionError(
            f"{kind} frame has format version {version} at byte offset {len(magic)}; "
            f"this build reads version {FORMAT_VERSION} only"
        )
    if n < _HEADER_SIZE:
        raise TruncatedMessageError(f"{kind}: input of {n} bytes ends inside the header")
    (total,) = _U64.unpack_from(buf, 5)
    if total > limits.max_message_bytes:
        raise MessageTooLargeError(
            f"{kind} frame length {total} (byte offset 5) is more than "
            f"max_message_bytes={limits.max_message_bytes}"
        )
    if total < _HEADER_SIZE + _CRC_SIZE:
        raise CorruptMessageError(f"{kind} frame length {total} (byte offset 5) is too small")
    if n < total:
        raise TruncatedMessageError(
            f"{kind} frame is {total} bytes long but the input ends after {n} bytes"
        )
    if n > total:
        raise CorruptMessageError(
            f"{n - total} unexpected bytes after the {total}-byte {kind} frame"
        )
    end = total - _CRC_SIZE
    (expected,) = _U32.unpack_from(buf, end)
    actual = zlib.crc32(buf[:end])
    if actual != expected:
        raise CorruptMessageError(
            f"{kind} frame CRC mismatch: stored 0x{expected:08x} at byte offset {end}, "
            f"computed 0x{actual:08x}"
        )
    return _Reader(buf, _HEADER_SIZE, end, limits)


def _read_array(r: _Reader, what: str) -> Array:
    r.charge(_RECORD_COST, what)
    at = r.pos
    dtype_len = r.u8(f"{what} dtype length")
    if not 0 < dtype_len <= _MAX_DTYPE_LEN:
        raise CorruptMessageError(f"{what}: dtype length {dtype_len} at byte offset {at}")
    start = r.take(dtype_len, f"{what} dtype")
    dtype = _DTYPES.get(bytes(r.view(start, dtype_len)).decode("ascii", "replace"))
    if dtype is None:
        raise CorruptMessageError(
            f"{what}: dtype {bytes(r.view(start, dtype_len))!r} at byte offset {start} "
            f"is not one of {', '.join(_DTYPES)}"
        )
    at = r.pos
    ndim = r.u8(f"{what} ndim")
    limits = r.limits
    if ndim > limits.max_ndim:
        raise MessageTooLargeError(
            f"{what}: ndim {ndim} at byte offset {at} is more than max_ndim={limits.max_ndim}"
        )
    start = r.take(8 * ndim, f"{what} shape")
    shape: tuple[int, ...] = struct.unpack_from(f"<{ndim}Q", r.buf, start) if ndim else ()
    size = math.prod(shape)
    nonzero = math.prod(d for d in shape if d) * dtype.itemsize
    if nonzero > _INTP_MAX:
        raise CorruptMessageError(f"{what}: shape {shape} at byte offset {start} is too large")
    at = r.pos
    nbytes = r.u64(f"{what} data length")
    if nbytes != size * dtype.itemsize:
        raise CorruptMessageError(
            f"{what}: data length {nbytes} at byte offset {at} does not match shape {shape} "
            f"and dtype {dtype.str} ({size * dtype.itemsize} bytes)"
        )
    pad = -r.pos % _DATA_ALIGNMENT
    if pad:
        start = r.take(pad, f"{what} padding")
        padding = bytes(r.view(start, pad))
        if any(padding):
            first = start + next(i for i, byte in enumerate(padding) if byte)
            raise CorruptMessageError(f"{what}: non-zero padding at byte offset {first}")
    start = r.take(nbytes, f"{what} data")
    view = r.view(start, nbytes)
    if dtype.kind == "b" and nbytes and int(np.frombuffer(view, dtype=np.uint8).max()) > 1:
        raise CorruptMessageError(f"{what}: bool data at byte offset {start} is not all 0 or 1")
    try:
        array = np.frombuffer(view, dtype=dtype).reshape(shape)
    except ValueError as exc:  # pragma: no cover - the checks above rule this out
        raise CorruptMessageError(f"{what} at byte offset {start}: {exc}") from None
    return Array(array, copy=False)


def _read_value(r: _Reader, what: str, metric: bool) -> Any:
    at = r.pos
    tag = r.u8(f"{what} type tag")
    if metric and tag not in _METRIC_TAGS:
        raise CorruptMessageError(
            f"{what}: type tag 0x{tag:02x} at byte offset {at} is not allowed in a MetricRecord"
        )
    limits = r.limits
    if tag == _TAG_INT:
        r.charge(_NUMBER_COST, what)
        return r.i64(what)
    if tag == _TAG_FLOAT:
        r.charge(_NUMBER_COST, what)
        return r.f64(what)
    if tag == _TAG_STR:
        return r.string_value(what)
    if tag == _TAG_BYTES:
        return r.bytes_value(what)
    if tag == _TAG_BOOL:
        return r.bool_byte(what)
    item_size = {
        _TAG_LIST_INT: 8,
        _TAG_LIST_FLOAT: 8,
        _TAG_LIST_STR: 4,
        _TAG_LIST_BYTES: 4,
        _TAG_LIST_BOOL: 1,
    }.get(tag)
    if item_size is None:
        raise CorruptMessageError(f"{what}: unknown type tag 0x{tag:02x} at byte offset {at}")
    n = r.count(f"{what} list length", "max_list_items", limits.max_list_items, item_size)
    if tag == _TAG_LIST_INT:
        return r.fixed_list("<i8", n, what)
    if tag == _TAG_LIST_FLOAT:
        return r.fixed_list("<f8", n, what)
    if tag == _TAG_LIST_BOOL:
        r.charge(n * (_LIST_SLOT + 1), what)  # True and False are shared; the slots are not
        start = r.take(n, what)
        flags = np.frombuffer(r.buf, dtype=np.uint8, count=n, offset=start)
        if n and int(flags.max()) > 1:
            raise CorruptMessageError(f"{what}: a bool at byte offset {start} is not 0 or 1")
        bools: list[bool] = flags.astype(np.bool_).tolist()
        return bools
    r.charge(n * _LIST_SLOT, what)
    if tag == _TAG_LIST_STR:
        return [r.string_value(what) for _ in range(n)]
    return [r.bytes_value(what) for _ in range(n)]


def _read_record_dict(r: _Reader) -> RecordDict:
    limits = r.limits
    n_records = r.count("record count", "max_records", limits.max_records, 10)
    records = RecordDict()
    for _ in range(n_records):
        at = r.pos
        r.charge(_RECORD_COST, "a record")
        name = r.key("record key")
        if name in records:
            raise CorruptMessageError(f"record key {name!r} at byte offset {at} is repeated")
        at = r.pos
        kind = r.u8(f"record {name!r} kind")
        record: ArrayRecord | MetricRecord | ConfigRecord
        if kind == _KIND_ARRAYS:
            record, min_entry = ArrayRecord(), 5 + 4 + 1 + 8  # key, dtype, ndim, nbytes
        elif kind == _KIND_METRICS:
            record, min_entry = MetricRecord(), 5 + 1 + 4  # key, tag, smallest payload
        elif kind == _KIND_CONFIG:
            record, min_entry = ConfigRecord(), 5 + 1 + 1
        else:
            raise CorruptMessageError(f"record {name!r}: unknown kind {kind} at byte offset {at}")
        n_entries = r.count(
            f"record {name!r} entry count",
            "max_entries_per_record",
            limits.max_entries_per_record,
            min_entry,
        )
        for _ in range(n_entries):
            at = r.pos
            key = r.key(f"record {name!r} entry key")
            r.charge(_ENTRY_COST + len(key), f"record {name!r} entry {key!r}")
            if key in record:
                raise CorruptMessageError(
                    f"record {name!r}: entry key {key!r} at byte offset {at} is repeated"
                )
            what = f"record {name!r} entry {key!r}"
            value: Array | MetricValue | ConfigValue
            if kind == _KIND_ARRAYS:
                value = _read_array(r, what)
            else:
                value = _read_value(r, what, metric=kind == _KIND_METRICS)
            try:
                record[key] = value
            except RecordTypeError as exc:  # pragma: no cover - the tags rule this out
                raise CorruptMessageError(f"{what} ending at byte offset {r.pos}: {exc}") from None
        records[name] = record
    return records


def _read_metadata(r: _Reader) -> Metadata:
    return Metadata(
        run_id=r.u64("metadata.run_id"),
        message_id=r.metadata_text("metadata.message_id"),
        src_node_id=r.u64("metadata.src_node_id"),
        dst_node_id=r.u64("metadata.dst_node_id"),
        round=r.u64("metadata.round"),
        message_type=r.metadata_text("metadata.message_type"),
        reply_to_message_id=r.metadata_text("metadata.reply_to_message_id"),
        stage=r.metadata_text("metadata.stage"),
        created_at=r.f64("metadata.created_at"),
    )


def decode_message(
    data: bytes | bytearray | memoryview, *, limits: CodecLimits = DEFAULT_LIMITS
) -> Message:
    """Decode what :func:`encode_message` wrote.

    Raises a :class:`~flowerpets.exceptions.CodecError` subclass, and nothing
    else, for any malformed input. Arrays in the result are read-only views of
    ``data``: do not modify a ``bytearray`` after decoding it.
    """
    r = _open_frame(data, _MAGIC_MESSAGE, "Message", limits)
    metadata = _read_metadata(r)
    at = r.pos
    tag = r.u8("content tag")
    if tag == _CONTENT_RECORDS:
        content = _read_record_dict(r)
        r.finish("message")
        return Message(metadata=metadata, content=content)
    if tag == _CONTENT_ERROR:
        at = r.pos
        code_value = r.u32("error code")
        try:
            code = ErrorCode(code_value)
        except ValueError:
            raise CorruptMessageError(
                f"unknown error code {code_value} at byte offset {at}"
            ) from None
        reason = r.string_value("error reason")
        r.finish("message")
        return Message(metadata=metadata, error=Error(code=code, reason=reason))
    raise CorruptMessageError(f"unknown content tag {tag} at byte offset {at}")


def decode_record_dict(
    data: bytes | bytearray | memoryview, *, limits: CodecLimits = DEFAULT_LIMITS
) -> RecordDict:
    """Decode what :func:`encode_record_dict` wrote (see :func:`decode_message`)."""
    r = _open_frame(data, _MAGIC_RECORD_DICT, "RecordDict", limits)
    records = _read_record_dict(r)
    r.finish("record dict")
    return records


def decode_array(
    data: bytes | bytearray | memoryview, *, limits: CodecLimits = DEFAULT_LIMITS
) -> Array:
    """Decode what :func:`encode_array` wrote: a read-only view of ``data``, not a copy."""
    r = _open_frame(data, _MAGIC_ARRAY, "Array", limits)
    array = _read_array(r, "array")
    r.finish("array")
    return array
