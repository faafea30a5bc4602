"""The format's tables: magic, version, fixed-width layouts, tags, kinds and the limits.

The layout they describe is documented in :mod:`flowerpets.core.codec`; the writer
(:mod:`._writer`) and the reader (:mod:`._reader`) share these and nothing else.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, fields
from typing import Any, Final

import numpy as np

from flowerpets._validation import integer
from flowerpets.exceptions import ParameterValueError

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
            integer(f"CodecLimits.{f.name}", value, above=0)
        # These are written as u32 counts/lengths (max_ndim as a u8 and numpy's bound).
        for name in (
            "max_records",
            "max_entries_per_record",
            "max_key_bytes",
            "max_string_bytes",
            "max_list_items",
        ):
            if getattr(self, name) > _U32_MAX:
                raise ParameterValueError(f"CodecLimits.{name} must be at most {_U32_MAX}")
        if self.max_ndim > _NUMPY_MAX_DIMS:
            raise ParameterValueError(
                f"CodecLimits.max_ndim must be at most {_NUMPY_MAX_DIMS} (numpy's limit), "
                f"got {self.max_ndim}"
            )

    def decoded_bytes(self) -> int:
        """The bound on the Python objects one decode builds (see the class docstring)."""
        if self.max_decoded_bytes is not None:
            return self.max_decoded_bytes
        return self.max_message_bytes + _DECODE_ALLOWANCE


DEFAULT_LIMITS: Final = CodecLimits()
