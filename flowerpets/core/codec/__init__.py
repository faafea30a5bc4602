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

from flowerpets.core.codec._format import DEFAULT_LIMITS, FORMAT_VERSION, CodecLimits
from flowerpets.core.codec._reader import decode_array, decode_message, decode_record_dict
from flowerpets.core.codec._writer import (
    encode_array,
    encode_message,
    encode_record_dict,
    encode_record_dict_parts,
)

__all__ = [
    "CodecLimits",
    "DEFAULT_LIMITS",
    "FORMAT_VERSION",
    "decode_array",
    "decode_message",
    "decode_record_dict",
    "encode_array",
    "encode_message",
    "encode_record_dict",
    "encode_record_dict_parts",
]
