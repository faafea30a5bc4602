"""SHA-256 digests of stored rows, each bound to the keys that place the row.

A digest covers a domain tag (the table), the row's keys and its fields, each
length-prefixed, so no two different rows share the bytes that are hashed: a
row copied to another run or round, or two fields swapped, fails its check.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Iterable

from flowerpets.exceptions import CorruptStoreError

__all__ = ["Field", "check_digest", "row_digest", "row_hasher"]

Field = bytes | str | int | float | None

_LENGTH = struct.Struct("<Q")


def _field_bytes(value: Field) -> bytes:
    if value is None:
        return b"n"
    if isinstance(value, bytes):
        return b"b" + value
    if isinstance(value, str):
        return b"s" + value.encode("utf-8")
    if isinstance(value, bool):  # a bool is an int; never hash the two alike
        return b"t" if value else b"f"
    if isinstance(value, int):
        return b"i" + str(value).encode("ascii")
    return b"d" + struct.pack("<d", value)


def row_hasher(table: str, keys: Iterable[Field]) -> hashlib._Hash:
    """A SHA-256 already fed the table's tag and the row's keys; feed it the payload."""
    hasher = hashlib.sha256()
    for value in (f"flowerpets-store/{table}", *keys):
        data = _field_bytes(value)
        hasher.update(_LENGTH.pack(len(data)))
        hasher.update(data)
    return hasher


def row_digest(table: str, *fields: Field) -> bytes:
    """The digest of a row of ``table`` made of ``fields`` (keys first)."""
    return row_hasher(table, fields).digest()


def check_digest(stored: object, computed: bytes, where: str) -> None:
    """Refuse with :class:`CorruptStoreError` unless ``stored`` equals ``computed``."""
    if not isinstance(stored, bytes) or not hmac.compare_digest(stored, computed):
        raise CorruptStoreError(f"{where} does not match its SHA-256: the row was damaged")
