"""JSON in one canonical form: what the store writes for configs, records and events.

Sorted keys, no spaces, ASCII only, finite floats: equal values give equal
text, so a configuration's digest is the digest of its text. Python's float
repr round-trips exactly, so a float read back is the float written.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from typing import Any

from flowerpets.exceptions import CorruptStoreError, ParameterTypeError, ParameterValueError

__all__ = ["canonical_json", "json_digest", "parse_json"]


def _check(value: Any, where: str) -> None:
    if value is None or isinstance(value, bool | int | str):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ParameterValueError(f"{where} must hold finite floats only")
        return
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check(item, f"{where}[{i}]")
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ParameterTypeError(f"{where} must have str keys, got {type(key).__name__}")
            _check(item, f"{where}[{key!r}]")
        return
    raise ParameterTypeError(
        f"{where} must hold JSON values (None, bool, int, float, str, list, dict), "
        f"got {type(value).__name__}"
    )


def canonical_json(value: Any, *, name: str = "value") -> str:
    """``value`` as canonical JSON text; a value JSON cannot hold raises a typed error."""
    _check(value, name)
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )


def json_digest(text: str) -> str:
    """The hex SHA-256 of canonical JSON text."""
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def parse_json(text: object, where: str) -> Any:
    """Stored JSON text read back; text that is not JSON is a damaged store."""
    if not isinstance(text, str):
        raise CorruptStoreError(f"{where} is not text")
    try:
        return json.loads(text)
    except ValueError:
        raise CorruptStoreError(f"{where} is not valid JSON") from None
