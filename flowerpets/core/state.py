"""State kept in a context: a frozen dataclass mapped to and from a ConfigRecord.

A PET declares what it remembers as a frozen dataclass and names its record
once, with a :class:`StateSlot`; the slot writes and reads it, field by field:

.. code-block:: python

    @dataclass(frozen=True, slots=True)
    class Budget:
        clip: float
        counts: tuple[int, ...] = ()

    BUDGET = StateSlot(Budget, "my-pet.budget")

    budget = BUDGET.get(context.state, Budget(clip=1.0))  # the default only if there is no record
    BUDGET.store(context.state, replace(budget, counts=(*budget.counts, 1)))

A field ``snake_case`` is stored under the key ``snake-case``; the record also
carries :data:`VERSION_KEY` (the slot's ``version``). Field types: ``int``,
``float``, ``str``, ``bytes``, ``bool``, an :class:`~enum.Enum` whose values are
one of those, ``tuple[X, ...]`` or ``list[X]`` of them, ``X | None`` (None is
stored as an absent key), and anything else through a field converter
(``dataclasses.field(metadata=convert(encode, decode))``).

Reading is strict, because a state that cannot be read must never be taken for
a fresh one (a privacy ledger that restarts, a protocol round that begins
again): every field must be present (but optional ones), of exactly its type
(a bool is not an int, an int is not a float), no key may be unknown, and the
version must match. Anything else raises a
:class:`~flowerpets.exceptions.StateError` (missing, corrupt, mistyped) whose
message names the record and the field, never a value: reasons may travel in
the clear, and state holds secrets.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, overload

from flowerpets._validation import is_integer
from flowerpets.core.records import ConfigRecord, ConfigValue, RecordDict
from flowerpets.exceptions import (
    CorruptStateError,
    MissingStateError,
    RecordTypeError,
    StateTypeError,
)

__all__ = ["StateSlot", "VERSION_KEY", "convert"]

VERSION_KEY = "state.version"
"""The record key of the state's version (no field name can map to it: it holds a dot)."""

T = TypeVar("T")

_SCALARS: tuple[type, ...] = (bool, int, float, str, bytes)
_CONVERTER = "flowerpets.core.state"


@dataclass(frozen=True, slots=True)
class _Converter:
    encode: Callable[[Any], ConfigValue]
    decode: Callable[[Any], Any]


def convert(encode: Callable[[Any], ConfigValue], decode: Callable[[Any], Any]) -> dict[str, Any]:
    """Field metadata: store the field as ``encode(value)``, read it back with ``decode``.

    ``decode`` raises ``ValueError``, ``TypeError`` or ``KeyError`` on a stored
    value it cannot read; the slot reports a :class:`CorruptStateError`, as it
    does for a stored value that ``encode`` does not write back exactly (a lax
    ``decode`` cannot turn garbage into a valid state).
    """
    return {_CONVERTER: _Converter(encode, decode)}


@dataclass(frozen=True, slots=True)
class _Field:
    name: str
    key: str
    kind: type  # a scalar type or an Enum (the item type of a sequence); object with a converter
    sequence: type | None  # tuple or list
    optional: bool
    converter: _Converter | None


def _scalar_kind(hint: Any, where: str) -> type:
    if isinstance(hint, type) and hint in _SCALARS:
        return hint
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        kinds = {type(member.value) for member in hint}
        if len(kinds) != 1 or kinds.pop() not in _SCALARS:
            raise RecordTypeError(f"{where}: the enum's values must all be of one scalar type")
        return hint
    raise RecordTypeError(
        f"{where}: a state field holds int, float, str, bytes, bool, an Enum, a tuple or list of "
        f"one of those, or an optional one; got {hint!r} (use convert() for anything else)"
    )


def _field_of(f: dataclasses.Field[Any], hint: Any, owner: str) -> _Field:
    where = f"{owner}.{f.name}"
    optional = False
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) != 1 or len(typing.get_args(hint)) != 2:
            raise RecordTypeError(f"{where}: only 'X | None' unions can be stored")
        optional, hint = True, args[0]
    converter = f.metadata.get(_CONVERTER)
    key = f.name.replace("_", "-")
    if converter is not None:
        return _Field(f.name, key, object, None, optional, converter)
    origin = typing.get_origin(hint)
    if origin in (tuple, list):
        items = typing.get_args(hint)
        if origin is tuple and (len(items) != 2 or items[1] is not Ellipsis):
            raise RecordTypeError(f"{where}: a tuple field must be tuple[X, ...]")
        return _Field(f.name, key, _scalar_kind(items[0], where), origin, optional, None)
    return _Field(f.name, key, _scalar_kind(hint, where), None, optional, None)


def _encode_scalar(kind: type, value: Any, where: str) -> ConfigValue:
    if issubclass(kind, enum.Enum):
        if not isinstance(value, kind):
            raise RecordTypeError(f"{where} must be a {kind.__name__}, got {type(value).__name__}")
        return value.value  # type: ignore[no-any-return]
    if kind is float and is_integer(value):
        return float(value)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise RecordTypeError(f"{where} must be a {kind.__name__}, got {type(value).__name__}")
    return value  # type: ignore[return-value]


def _decode_scalar(kind: type, value: Any, where: str) -> Any:
    base = type(next(iter(kind)).value) if issubclass(kind, enum.Enum) else kind
    if type(value) is not base:  # exact: a bool is no int, an int no float
        raise StateTypeError(f"{where} must hold a {base.__name__}, got {type(value).__name__}")
    if issubclass(kind, enum.Enum):
        try:
            return kind(value)
        except ValueError:
            raise CorruptStateError(f"{where} holds no {kind.__name__}") from None
    return value


class StateSlot(Generic[T]):
    """Where one frozen dataclass lives in a context's state, and how it is written.

    ``key`` names the record in ``context.state``; ``version`` is stored with it
    and checked on every read (raise it when a field changes meaning: an old
    record is then refused, never misread).
    """

    __slots__ = ("_fields", "cls", "key", "version")

    def __init__(self, cls: type[T], key: str, *, version: int = 1) -> None:
        if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
            raise RecordTypeError(f"a state is a frozen dataclass, got {cls!r}")
        if not cls.__dataclass_params__.frozen:  # type: ignore[attr-defined]
            raise RecordTypeError(f"{cls.__name__}: a state dataclass must be frozen")
        if not isinstance(key, str) or not key:
            raise RecordTypeError(f"a state's key is a non-empty string, got {key!r}")
        if not is_integer(version) or version < 1:
            raise RecordTypeError(f"a state's version is an integer >= 1, got {version!r}")
        hints = typing.get_type_hints(cls)
        self.cls, self.key, self.version = cls, key, version
        self._fields = tuple(
            _field_of(f, hints[f.name], cls.__name__) for f in dataclasses.fields(cls) if f.init
        )

    def __repr__(self) -> str:
        return f"StateSlot({self.cls.__name__}, {self.key!r}, version={self.version})"

    # -- records ------------------------------------------------------------------------------
    def to_record(self, value: T) -> ConfigRecord:
        """``value`` as a record (a wrong field type fails here, where it is written)."""
        if not isinstance(value, self.cls):
            raise RecordTypeError(f"{self.key!r} holds a {self.cls.__name__}, got {value!r}")
        record = ConfigRecord({VERSION_KEY: self.version})
        for f in self._fields:
            item = getattr(value, f.name)
            where = f"{self.key}[{f.key!r}]"
            if item is None and f.optional:
                continue
            if f.converter is not None:
                record[f.key] = f.converter.encode(item)
            elif f.sequence is not None:
                if not isinstance(item, list | tuple):
                    raise RecordTypeError(f"{where} must be a sequence, got {type(item).__name__}")
                if f.kind in _SCALARS and all(type(x) is f.kind for x in item):
                    record[f.key] = list(item)
                else:
                    record[f.key] = [_encode_scalar(f.kind, x, where) for x in item]
            else:
                record[f.key] = _encode_scalar(f.kind, item, where)
        return record

    def from_record(self, record: object) -> T:
        """The state ``record`` holds; a :class:`StateError` if it holds none exactly."""
        if not isinstance(record, ConfigRecord):
            raise StateTypeError(
                f"state {self.key!r} must be a ConfigRecord, got {type(record).__name__}"
            )
        version = record.get(VERSION_KEY)
        if version is None:
            raise CorruptStateError(f"state {self.key!r} carries no version")
        if type(version) is not int:
            raise StateTypeError(f"state {self.key!r}: its version must be an int")
        if version != self.version:
            raise CorruptStateError(
                f"state {self.key!r} is of version {version}; this build reads version "
                f"{self.version} only"
            )
        known = {f.key for f in self._fields} | {VERSION_KEY}
        unknown = sorted(k for k in record if k not in known)
        if unknown:
            raise CorruptStateError(f"state {self.key!r} holds unknown fields {unknown[:5]}")
        values: dict[str, Any] = {}
        for f in self._fields:
            where = f"state {self.key}[{f.key!r}]"
            if f.key not in record:
                if not f.optional:
                    raise CorruptStateError(f"{where} is missing")
                values[f.name] = None
                continue
            stored = record[f.key]
            if f.converter is not None:
                try:
                    decoded = f.converter.decode(stored)
                    again = ConfigRecord({f.key: f.converter.encode(decoded)})[f.key]
                except (ValueError, TypeError, KeyError) as exc:
                    raise CorruptStateError(
                        f"{where} cannot be read ({type(exc).__name__})"
                    ) from exc
                # What it read must write back as stored: nothing coerced, nothing dropped.
                if again != stored or type(again) is not type(stored):
                    raise CorruptStateError(f"{where} does not read back as it was stored")
                values[f.name] = decoded
            elif f.sequence is not None:
                if not isinstance(stored, list):
                    raise StateTypeError(f"{where} must hold a list")
                if f.kind in _SCALARS and all(type(x) is f.kind for x in stored):
                    values[f.name] = f.sequence(stored)  # the common case, checked in one pass
                else:
                    values[f.name] = f.sequence(_decode_scalar(f.kind, x, where) for x in stored)
            else:
                values[f.name] = _decode_scalar(f.kind, stored, where)
        try:
            return self.cls(**values)
        except (ValueError, TypeError) as exc:  # the dataclass's own checks refused it
            raise CorruptStateError(
                f"state {self.key!r} is not a valid {self.cls.__name__} ({type(exc).__name__})"
            ) from exc

    # -- a context's state --------------------------------------------------------------------
    def store(self, state: RecordDict, value: T) -> None:
        """Write ``value`` to ``state`` (replacing what the slot held)."""
        state[self.key] = self.to_record(value)

    def load(self, state: RecordDict) -> T:
        """The state in ``state``; :class:`MissingStateError` if there is none."""
        if self.key not in state:
            raise MissingStateError(f"the context holds no state {self.key!r}")
        return self.from_record(state[self.key])

    @overload
    def get(self, state: RecordDict) -> T | None: ...
    @overload
    def get(self, state: RecordDict, default: T) -> T: ...
    def get(self, state: RecordDict, default: T | None = None) -> T | None:
        """The state in ``state``, or ``default`` only if it holds no such record at all."""
        if self.key not in state:
            return default
        return self.from_record(state[self.key])

    def clear(self, state: RecordDict) -> None:
        """Forget the state (nothing happens if there is none)."""
        state.pop(self.key, None)
