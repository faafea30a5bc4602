"""The global arrays as one frame of the core's codec (never pickle).

An :class:`~flowerpets.core.records.ArrayRecord` is written as a RecordDict
frame holding it under one key: the codec is versioned and bounded, keeps
dtypes, shapes and bytes exactly, and carries its own CRC on top of the row's
SHA-256. Decoded arrays are copied out of the stored bytes, so they stay valid
after the row is gone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from flowerpets.core.codec import decode_record_dict, encode_record_dict, encode_record_dict_parts
from flowerpets.core.records import ArrayRecord, RecordDict
from flowerpets.exceptions import CodecError, CorruptStoreError

__all__ = ["decode_arrays", "encode_arrays", "encode_arrays_parts"]

_KEY: Final = "arrays"


def encode_arrays(arrays: ArrayRecord) -> bytes:
    """``arrays`` as one codec frame."""
    return encode_record_dict(RecordDict({_KEY: arrays}))


def encode_arrays_parts(
    arrays: ArrayRecord,
    *,
    before_crc: Callable[[list[bytes | memoryview]], None] | None = None,
) -> list[bytes | memoryview]:
    """The same frame as parts to concatenate; the arrays' data are views, not copies.

    ``before_crc`` sees every part but the CRC (the last) before the CRC pass.
    """
    return encode_record_dict_parts(RecordDict({_KEY: arrays}), before_crc=before_crc)


def decode_arrays(frame: bytes, where: str) -> ArrayRecord:
    """The ArrayRecord a frame holds, copied (a frame that does not decode: a damaged store)."""
    try:
        records = decode_record_dict(frame)
        stored = records.get_typed(_KEY, ArrayRecord)
    except (CodecError, KeyError, TypeError) as exc:
        raise CorruptStoreError(f"{where} does not decode: {type(exc).__name__}") from None
    return ArrayRecord.from_numpy(stored.to_numpy(), copy=True)
