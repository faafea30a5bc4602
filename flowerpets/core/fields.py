"""Typed reads of a peer's records: the one accessor every PET's protocol uses.

A request or reply from another process is untrusted input. :class:`Fields`
reads one named :class:`~flowerpets.core.records.ConfigRecord` (or metric
record) out of a message's content and hands back each field checked to be of
the type its stage needs. A missing record, a missing field or one of the
wrong type raises :class:`~flowerpets.exceptions.MessageFieldError`, naming the
record and the field, never the value: a node refuses the request, a server
marks the reply malformed. A bug in our own code raises something else and is
never taken for a peer's fault.

Argument checks on what a *caller* passes live in :mod:`flowerpets._validation`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar, overload

from flowerpets._validation import is_integer, is_real
from flowerpets.core.records import ConfigRecord, MetricRecord, RecordDict
from flowerpets.exceptions import MessageFieldError

__all__ = ["Fields"]

T = TypeVar("T")

_KINDS: dict[type, tuple[str, Callable[[object], bool]]] = {
    int: ("an int", is_integer),
    float: ("a number", is_real),
    bool: ("a bool", lambda v: isinstance(v, bool)),
    str: ("a str", lambda v: isinstance(v, str)),
    bytes: ("bytes", lambda v: isinstance(v, bytes)),
}
_MISSING = object()


class Fields:
    """The fields of one record of a message, read with their types checked.

    ``Fields.of(content, "secagg+")`` takes the record named ``"secagg+"``;
    ``Fields(record, "config")`` wraps a record already in hand (``name`` is
    what messages call it).
    """

    __slots__ = ("_name", "_record")

    def __init__(self, record: ConfigRecord | MetricRecord, name: str) -> None:
        self._record = record
        self._name = name

    @classmethod
    def of(cls, content: RecordDict | None, name: str) -> Fields:
        """The ConfigRecord ``name`` of ``content``.

        MessageFieldError if it is absent or another kind of record.
        """
        if content is None or name not in content:
            raise MessageFieldError(f"the message carries no {name!r} record")
        record = content[name]
        if not isinstance(record, ConfigRecord):
            raise MessageFieldError(
                f"the {name!r} record must be a ConfigRecord, got {type(record).__name__}"
            )
        return cls(record, name)

    @property
    def record(self) -> ConfigRecord | MetricRecord:
        return self._record

    def __contains__(self, key: str) -> bool:
        return key in self._record

    def _where(self, key: str) -> str:
        return f"{self._name}[{key!r}]"

    def _raw(self, key: str, default: object) -> object:
        if key in self._record:
            return self._record[key]
        if default is _MISSING:
            raise MessageFieldError(f"the {self._name!r} record lacks {key!r}")
        return default

    @overload
    def get(self, key: str, kind: type[T]) -> T: ...
    @overload
    def get(self, key: str, kind: type[T], default: T) -> T: ...

    def get(self, key: str, kind: type[T], default: object = _MISSING) -> T:
        """Field ``key`` as ``kind`` (int, float, bool, str or bytes); ``default`` if absent.

        An int is read as a float where a float is asked for; a bool is never
        read as a number.
        """
        value = self._raw(key, default)
        if value is default and default is not _MISSING:
            return value  # type: ignore[return-value]
        noun, accepts = _KINDS[kind]
        if not accepts(value):
            raise MessageFieldError(
                f"{self._where(key)} must be {noun}, got {type(value).__name__}"
            )
        return kind(value)  # type: ignore[call-arg]

    def items(self, key: str, kind: type[T], *, size: int | None = None) -> list[T]:
        """Field ``key`` as a list of ``kind``.

        ``size``: the length in bytes every item must have (for bytes items).
        """
        value = self._raw(key, _MISSING)
        noun, accepts = _KINDS[kind]
        if not isinstance(value, list) or not all(accepts(v) for v in value):
            raise MessageFieldError(f"{self._where(key)} must be a list of {_plural(noun)}")
        if size is not None and any(len(v) != size for v in value):
            raise MessageFieldError(f"every item of {self._where(key)} must be {size} bytes")
        return [kind(v) for v in value]  # type: ignore[call-arg]

    def text(self, key: str, choices: frozenset[str] | set[str]) -> str:
        """Field ``key`` as a str that is one of ``choices``."""
        value = self.get(key, str)
        if value not in choices:
            listed = ", ".join(sorted(choices))
            raise MessageFieldError(f"{self._where(key)} must be one of {listed}")
        return value


def _plural(noun: str) -> str:
    return {"an int": "ints", "a number": "numbers", "a bool": "bools", "a str": "str"}.get(
        noun, noun
    )
