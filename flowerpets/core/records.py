"""Typed records: what a message carries.

A message's content is a :class:`RecordDict`, a mapping of names to three kinds
of record:

* :class:`ArrayRecord`: ordered name -> :class:`Array` (model weights, updates,
  masked vectors, ciphertext bytes);
* :class:`MetricRecord`: name -> number or list of numbers (loss, accuracy,
  number of examples);
* :class:`ConfigRecord`: name -> scalar, string, bytes or list of one of those
  (learning rate, clipping norm, protocol stage).

Every write is type-checked, so a wrong value fails where it is written, not
later on the other side of the wire. An :class:`Array` is immutable, so one
array can be shared by every message of a round without copying and without
one node's mod seeing another node's changes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping
from typing import Any, ClassVar, Self, TypeVar

import numpy as np
from numpy.typing import ArrayLike, NDArray

from flowerpets.core.layout import ArrayLayout
from flowerpets.exceptions import NotFoundError, RecordTypeError

__all__ = [
    "Array",
    "ArrayRecord",
    "ConfigRecord",
    "ConfigValue",
    "MetricRecord",
    "MetricValue",
    "RecordDict",
]

# Kinds of numpy dtype an Array may hold: bool, signed, unsigned, float, complex.
# Object, string and void dtypes are refused: they cannot be encoded without pickle.
_ARRAY_KINDS = frozenset("biufc")

MetricValue = int | float | list[int] | list[float]
ConfigScalar = int | float | str | bytes | bool
ConfigValue = ConfigScalar | list[int] | list[float] | list[str] | list[bytes] | list[bool]


class Array:
    """An immutable n-dimensional numeric array, backed by numpy.

    ``Array(x)`` copies ``x`` so that later writes to ``x`` cannot change the
    record. ``Array(x, copy=False)`` takes ``x`` without copying: the caller
    promises not to write to it again (the array is marked read-only through the
    view the record holds). Arrays decoded from the wire are views of the
    received buffer and are never copied.
    """

    __slots__ = ("_data",)

    def __init__(self, data: ArrayLike, *, copy: bool = True) -> None:
        if isinstance(data, Array):
            self._data: NDArray[Any] = data._data
            return
        array = np.array(data, copy=True, order="C") if copy else np.asarray(data)
        if array.dtype.kind not in _ARRAY_KINDS:
            raise RecordTypeError(
                f"Array holds numeric or boolean data only, got dtype {array.dtype!r}"
            )
        if not array.dtype.isnative:  # byte order is a detail of the source, not of the values
            array = array.astype(array.dtype.newbyteorder("="))
        if not array.flags.c_contiguous:
            array = np.ascontiguousarray(array)
        view = array.view()
        view.flags.writeable = False
        self._data = view

    # -- views -------------------------------------------------------------
    def numpy(self) -> NDArray[Any]:
        """The data as a read-only numpy array (no copy)."""
        return self._data

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> NDArray[Any]:
        if dtype is not None and np.dtype(dtype) != self._data.dtype:
            return self._data.astype(dtype)
        return self._data.copy() if copy else self._data

    @property
    def dtype(self) -> np.dtype[Any]:
        return self._data.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._data.shape)

    @property
    def size(self) -> int:
        return int(self._data.size)

    @property
    def nbytes(self) -> int:
        return int(self._data.nbytes)

    # -- comparison and display -------------------------------------------
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Array):
            return NotImplemented
        return (
            self.dtype == other.dtype
            and self.shape == other.shape
            and bool(np.array_equal(self._data, other._data, equal_nan=self.dtype.kind in "fc"))
        )

    __hash__ = None  # type: ignore[assignment]  # mutable-looking container semantics

    def __repr__(self) -> str:
        return f"Array(dtype={self.dtype.str!r}, shape={self.shape})"


V = TypeVar("V")


class _TypedRecord(MutableMapping[str, V]):
    """A str-keyed mapping whose values are checked on every write."""

    __slots__ = ("_items",)
    _kind: ClassVar[str]

    def __init__(self, items: Mapping[str, Any] | Iterable[tuple[str, Any]] | None = None) -> None:
        self._items: dict[str, V] = {}
        if items is not None:
            pairs = items.items() if isinstance(items, Mapping) else items
            for key, value in pairs:
                self[key] = value

    def _check_value(self, key: str, value: Any) -> V:
        raise NotImplementedError

    def __setitem__(self, key: str, value: Any) -> None:
        if not isinstance(key, str) or not key:
            raise RecordTypeError(f"{self._kind} keys are non-empty strings, got {key!r}")
        self._items[key] = self._check_value(key, value)

    def __getitem__(self, key: str) -> V:
        return self._items[key]

    def __delitem__(self, key: str) -> None:
        del self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, _TypedRecord)
        return list(self._items.items()) == list(other._items.items())

    __hash__ = None  # type: ignore[assignment]

    def copy(self) -> Self:
        """A shallow copy: a new mapping holding the same (immutable) values."""
        new = type(self).__new__(type(self))
        new._items = dict(self._items)
        return new

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._items!r})"


class ArrayRecord(_TypedRecord[Array]):
    """An ordered mapping of names to :class:`Array`.

    numpy arrays are accepted on write and wrapped (copied) into an ``Array``.
    Use :meth:`from_numpy` with ``copy=False`` to wrap without copying.
    """

    __slots__ = ()
    _kind = "ArrayRecord"

    def _check_value(self, key: str, value: Any) -> Array:
        if isinstance(value, Array):
            return value
        if isinstance(value, np.ndarray):
            return Array(value)
        raise RecordTypeError(
            f"ArrayRecord[{key!r}] must be an Array or numpy array, got {type(value).__name__}"
        )

    @classmethod
    def from_numpy(cls, arrays: Mapping[str, ArrayLike], *, copy: bool = True) -> ArrayRecord:
        """Wrap named numpy arrays, keeping their order."""
        record = cls()
        for name, value in arrays.items():
            record[name] = Array(value, copy=copy)
        return record

    def to_numpy(self) -> dict[str, NDArray[Any]]:
        """Named read-only numpy views, in order (no copy)."""
        return {name: array.numpy() for name, array in self._items.items()}

    @property
    def num_parameters(self) -> int:
        return sum(array.size for array in self._items.values())

    @property
    def nbytes(self) -> int:
        return sum(array.nbytes for array in self._items.values())

    def layout(self) -> ArrayLayout:
        """Names, shapes and dtypes, in order: what two compatible records share."""
        return ArrayLayout.of(self._items)


def _is_number(value: Any) -> bool:
    # bool is an int subclass; a metric or number that is secretly a flag is refused.
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(
        value, bool | np.bool_
    )


def _as_number(value: Any) -> int | float:
    if isinstance(value, int | np.integer):
        return int(value)
    return float(value)


def _homogeneous_list(
    key: str, kind: str, value: list[Any], check: Callable[[Any], bool]
) -> list[Any]:
    if not all(check(item) for item in value):
        raise RecordTypeError(f"{kind}[{key!r}]: every list item must be of the same allowed type")
    if value and len({_scalar_class(item) for item in value}) > 1:
        # Type names only: a record's values may be private, and errors travel in the clear.
        mixed = sorted({_scalar_class(item).__name__ for item in value})
        raise RecordTypeError(f"{kind}[{key!r}]: a list must not mix types, got {mixed}")
    return list(value)


# Exact types that are stored as they are (what _as_number/_as_config_scalar return).
_PLAIN_NUMBERS: frozenset[type] = frozenset({int, float})
_PLAIN_CONFIG_SCALARS: frozenset[type] = frozenset({bool, int, float, str, bytes})


def _plain_list(value: list[Any], plain: frozenset[type]) -> list[Any] | None:
    """A copy of ``value`` if every item is of one exact type of ``plain`` (checked in one
    pass: the common case, lists of keys, shares and node ids); None to check it in full."""
    if value and type(value[0]) in plain:
        first = type(value[0])
        if all(type(item) is first for item in value):
            return list(value)
    return None


def _scalar_class(item: Any) -> type:
    if isinstance(item, bool | np.bool_):
        return bool
    if isinstance(item, int | np.integer):
        return int
    if isinstance(item, float | np.floating):
        return float
    return type(item)


class MetricRecord(_TypedRecord[MetricValue]):
    """Name -> int, float, or a list of one of those (never bool or str)."""

    __slots__ = ()
    _kind = "MetricRecord"

    def _check_value(self, key: str, value: Any) -> MetricValue:
        if _is_number(value):
            return _as_number(value)
        if isinstance(value, list):
            plain = _plain_list(value, _PLAIN_NUMBERS)
            if plain is not None:
                return plain
            items = _homogeneous_list(key, self._kind, value, _is_number)
            return [_as_number(item) for item in items]
        raise RecordTypeError(
            f"MetricRecord[{key!r}] must be an int, a float or a list of them, "
            f"got {type(value).__name__}"
        )


def _is_config_scalar(value: Any) -> bool:
    return isinstance(value, bool | int | float | str | bytes | np.integer | np.floating)


def _as_config_scalar(value: Any) -> ConfigScalar:
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return float(value)
    return value  # type: ignore[no-any-return]


class ConfigRecord(_TypedRecord[ConfigValue]):
    """Name -> int, float, str, bytes, bool, or a homogeneous list of one of those."""

    __slots__ = ()
    _kind = "ConfigRecord"

    def _check_value(self, key: str, value: Any) -> ConfigValue:
        if _is_config_scalar(value):
            return _as_config_scalar(value)
        if isinstance(value, list):
            plain = _plain_list(value, _PLAIN_CONFIG_SCALARS)
            if plain is not None:
                return plain
            items = _homogeneous_list(key, self._kind, value, _is_config_scalar)
            return [_as_config_scalar(item) for item in items]  # type: ignore[return-value]
        raise RecordTypeError(
            f"ConfigRecord[{key!r}] must be an int, float, str, bytes, bool or a list of one "
            f"of those, got {type(value).__name__}"
        )


Record = ArrayRecord | MetricRecord | ConfigRecord


class RecordDict(_TypedRecord[Record]):
    """The content of a message: name -> ArrayRecord, MetricRecord or ConfigRecord.

    By convention a train request holds ``"arrays"`` and ``"config"``, and its
    reply holds ``"arrays"`` and ``"metrics"``.
    """

    __slots__ = ()
    _kind = "RecordDict"

    def _check_value(self, key: str, value: Any) -> Record:
        if isinstance(value, ArrayRecord | MetricRecord | ConfigRecord):
            return value
        raise RecordTypeError(
            f"RecordDict[{key!r}] must be an ArrayRecord, MetricRecord or ConfigRecord, "
            f"got {type(value).__name__}"
        )

    def _of_type(self, cls: type[V]) -> dict[str, V]:
        return {name: rec for name, rec in self._items.items() if isinstance(rec, cls)}

    @property
    def array_records(self) -> dict[str, ArrayRecord]:
        return self._of_type(ArrayRecord)

    @property
    def metric_records(self) -> dict[str, MetricRecord]:
        return self._of_type(MetricRecord)

    @property
    def config_records(self) -> dict[str, ConfigRecord]:
        return self._of_type(ConfigRecord)

    def get_typed(self, key: str, cls: type[V]) -> V:
        """The record under ``key``, checked to be of ``cls``; a clear error otherwise."""
        try:
            record = self._items[key]
        except KeyError:
            raise NotFoundError(
                f"message content has no {cls.__name__} named {key!r} "
                f"(it has {sorted(self._items)!r})"
            ) from None
        if not isinstance(record, cls):
            raise RecordTypeError(
                f"content[{key!r}] is a {type(record).__name__}, expected {cls.__name__}"
            )
        return record

    def deep_copy(self) -> RecordDict:
        """A copy whose records are new mappings (arrays are immutable and shared)."""
        new = RecordDict()
        for name, record in self._items.items():
            new._items[name] = record.copy()
        return new
