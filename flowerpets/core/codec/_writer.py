"""Encoding: the frame writer and the encoders of Messages, RecordDicts and Arrays."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from typing import Any, Final, NoReturn

import numpy as np

from flowerpets._validation import is_integer, is_real
from flowerpets.core.codec._format import (
    _CONTENT_ERROR,
    _CONTENT_RECORDS,
    _CRC_SIZE,
    _DATA_ALIGNMENT,
    _DTYPES,
    _F64,
    _HEADER,
    _HEADER_SIZE,
    _I64,
    _I64_MAX,
    _I64_MIN,
    _KIND_ARRAYS,
    _KIND_CONFIG,
    _KIND_METRICS,
    _MAGIC_ARRAY,
    _MAGIC_MESSAGE,
    _MAGIC_RECORD_DICT,
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
    _U8,
    _U32,
    _U64,
    _U64_MAX,
    DEFAULT_LIMITS,
    FORMAT_VERSION,
    CodecLimits,
)
from flowerpets.core.message import ErrorCode, Message, Metadata
from flowerpets.core.records import (
    Array,
    ArrayRecord,
    ConfigRecord,
    MetricRecord,
    RecordDict,
)
from flowerpets.exceptions import (
    CodecError,
    MessageTooLargeError,
)


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
        if not is_integer(value) or not 0 <= value <= _U64_MAX:
            raise CodecError(f"{what} must be an int in [0, 2**64), got {value!r}")
        self.raw(_U64.pack(value))

    def i64(self, value: int, what: str) -> None:
        if not _I64_MIN <= value <= _I64_MAX:
            raise CodecError(f"{what} = {value} does not fit in a signed 64-bit integer")
        self.raw(_I64.pack(value))

    def f64(self, value: float, what: str) -> None:
        if not is_real(value):
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

    def finish_parts(
        self, before_crc: Callable[[list[bytes | memoryview]], None] | None = None
    ) -> list[bytes | memoryview]:
        """The frame as parts to concatenate, header and CRC filled in (nothing joined);
        ``before_crc`` sees every part but the CRC before the CRC pass."""
        total = self.size + _CRC_SIZE
        self.parts[0] = _HEADER.pack(self.magic, FORMAT_VERSION, total)
        if before_crc is not None:
            before_crc(list(self.parts))
        crc = 0
        for part in self.parts:
            crc = zlib.crc32(part, crc)
        self.parts.append(_U32.pack(crc))
        return self.parts

    def finish(self) -> bytes:
        return b"".join(self.finish_parts())


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


def encode_record_dict_parts(
    records: RecordDict,
    *,
    limits: CodecLimits = DEFAULT_LIMITS,
    before_crc: Callable[[list[bytes | memoryview]], None] | None = None,
) -> list[bytes | memoryview]:
    """:func:`encode_record_dict`'s frame as parts whose concatenation is the frame.

    The arrays' data parts are views of the arrays' own buffers, not copies: a
    writer that gathers them into a file (``os.writev``) copies each byte once.
    The arrays must not change until the parts are written. ``before_crc`` is
    called with every part but the last (the CRC) before the CRC is computed,
    so a caller can start on the bytes (hash them on another thread) meanwhile.
    """
    w = _Writer(_MAGIC_RECORD_DICT, limits)
    _write_record_dict(w, records)
    return w.finish_parts(before_crc)


def encode_array(array: Array, *, limits: CodecLimits = DEFAULT_LIMITS) -> bytes:
    """Encode one Array as one frame (magic ``FPAR``)."""
    if not isinstance(array, Array):
        raise CodecError(f"expected an Array, got {type(array).__name__}")
    w = _Writer(_MAGIC_ARRAY, limits)
    _write_array(w, array, "array")
    return w.finish()
