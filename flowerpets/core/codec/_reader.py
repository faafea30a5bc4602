"""Decoding: the bounds-checking frame reader and the decoders of what the writer wrote."""

from __future__ import annotations

import math
import struct
import sys
import zlib
from typing import Any, Final

import numpy as np

from flowerpets.core.codec._format import (
    _CONTENT_ERROR,
    _CONTENT_RECORDS,
    _CRC_SIZE,
    _DATA_ALIGNMENT,
    _DTYPES,
    _F64,
    _HEADER_SIZE,
    _I64,
    _INTP_MAX,
    _KIND_ARRAYS,
    _KIND_CONFIG,
    _KIND_METRICS,
    _MAGIC_ARRAY,
    _MAGIC_MESSAGE,
    _MAGIC_RECORD_DICT,
    _MAX_DTYPE_LEN,
    _METRIC_TAGS,
    _TAG_BOOL,
    _TAG_BYTES,
    _TAG_FLOAT,
    _TAG_INT,
    _TAG_LIST_BOOL,
    _TAG_LIST_BYTES,
    _TAG_LIST_FLOAT,
    _TAG_LIST_INT,
    _TAG_LIST_STR,
    _TAG_STR,
    _U32,
    _U64,
    DEFAULT_LIMITS,
    FORMAT_VERSION,
    CodecLimits,
)
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
    CorruptMessageError,
    MessageTooLargeError,
    RecordTypeError,
    TruncatedMessageError,
    UnsupportedVersionError,
)

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
