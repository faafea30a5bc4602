"""Flat packing of named arrays into one vector, chunked by the ciphertext's slot count.

Every encrypted array of a model goes into *one* flat float64 vector, in model
order, so no ciphertext is wasted on a small bias: ``n`` values cost
``ceil(n / slots)`` ciphertexts whatever the number of layers. A
:class:`Layout` records which arrays are packed (names, dtypes, shapes) and
where; it travels with every encrypted update and sum as canonical JSON
(bounded, strictly validated, never pickle).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from flowerpets.core.layout import ArrayLayout
from flowerpets.exceptions import InvalidUpdateError, ModelMismatchError

__all__ = [
    "RESERVED_PREFIX",
    "Entry",
    "Layout",
    "chunk_views",
    "peak",
    "select_names",
]

RESERVED_PREFIX = "he."
"""Array and config names under this prefix belong to the HE wire format."""

MAX_LAYOUT_ENTRIES = 100_000
MAX_LAYOUT_SIZE = 1 << 40  # values; far beyond any model, well inside float64's exact integers
MAX_NDIM = 32
_FLOAT_DTYPES = frozenset({"<f2", "<f4", "<f8"})


@dataclass(frozen=True, slots=True)
class Entry:
    """One packed array: its name, dtype (numpy ``str``, little-endian) and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True, slots=True)
class Layout:
    """Which arrays are packed into the flat vector, in order.

    The names, shapes and dtypes are a core :class:`~flowerpets.core.ArrayLayout`
    (:attr:`arrays`, whose encoding is the wire's); on top of it CKKS adds its
    rules (floating-point little-endian dtypes only, no reserved names, size
    limits) and the chunking into ciphertexts.
    """

    entries: tuple[Entry, ...]
    arrays: ArrayLayout = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # The core layout checks what every layout must hold (unique names, valid shapes).
        arrays = ArrayLayout(
            tuple(e.name for e in self.entries),
            tuple(e.shape for e in self.entries),
            tuple(e.dtype for e in self.entries),
        )
        object.__setattr__(self, "arrays", arrays)
        if len(self.entries) > MAX_LAYOUT_ENTRIES:
            raise ValueError(f"a layout holds at most {MAX_LAYOUT_ENTRIES} arrays")
        for e in self.entries:
            if not e.name or e.name.startswith(RESERVED_PREFIX):
                raise ValueError(f"array name {e.name!r} is empty or uses the reserved prefix")
            if e.dtype not in _FLOAT_DTYPES:
                raise ValueError(
                    f"array {e.name!r} has dtype {e.dtype!r}: CKKS is approximate, so only "
                    "floating-point arrays can be encrypted"
                )
            if len(e.shape) > MAX_NDIM:
                raise ValueError(f"array {e.name!r} has an invalid shape {e.shape!r}")
        if self.size > MAX_LAYOUT_SIZE:
            raise ValueError(f"a layout packs at most {MAX_LAYOUT_SIZE} values, got {self.size}")

    @classmethod
    def of(cls, arrays: Mapping[str, Any], names: Sequence[str]) -> Layout:
        """The layout of ``names``, in ``arrays``' order, with ``arrays``' dtypes and shapes."""
        missing = set(names) - set(arrays)
        if missing:
            raise InvalidUpdateError(f"no arrays named {sorted(missing)} to encrypt")
        return cls.from_arrays(ArrayLayout.of(arrays, names))

    @classmethod
    def from_arrays(cls, arrays: ArrayLayout) -> Layout:
        """The packing of a core layout (dtypes made little-endian), checked for CKKS."""
        return cls(
            tuple(
                Entry(name, np.dtype(dtype).newbyteorder("<").str, shape)
                for name, shape, dtype in zip(
                    arrays.names, arrays.shapes, arrays.dtypes, strict=True
                )
            )
        )

    @property
    def names(self) -> tuple[str, ...]:
        return self.arrays.names

    @property
    def size(self) -> int:
        return self.arrays.size

    def chunk_count(self, slots: int) -> int:
        return -(-self.size // slots)

    def chunk_sizes(self, slots: int) -> list[int]:
        """How many values each ciphertext holds: ``slots`` each, the last one the rest."""
        count = self.chunk_count(slots)
        return [min(slots, self.size - i * slots) for i in range(count)]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return self.arrays.shape_map()

    def describe(self, limit: int = 3) -> str:
        """A short description (at most ``limit`` arrays named), for error messages."""
        return self.arrays.describe(limit)

    # -- packing ---------------------------------------------------------------
    def pack(self, arrays: Mapping[str, Any], weight: float = 1.0) -> NDArray[np.float64]:
        """``weight * arrays`` flattened into one float64 vector (missing names are zeros).

        Shapes must match the layout. Finiteness is checked by :func:`peak`.
        """
        shapes = self.shapes()
        unknown = [name for name in arrays if name not in shapes]
        if unknown:
            raise KeyError(f"the layout has no arrays named {unknown}")
        flat = np.zeros(self.size, dtype=np.float64)
        offset = 0
        for e in self.entries:
            if e.name in arrays:
                data = np.asarray(arrays[e.name])
                if data.shape != e.shape:
                    raise InvalidUpdateError(
                        f"array {e.name!r} has shape {data.shape}, the layout says {e.shape}"
                    )
                # One pass, no temporary; computed in float64 (a float32 array times a
                # Python float would otherwise be rounded to float32 first).
                np.multiply(
                    data.reshape(-1), weight, out=flat[offset : offset + e.size], dtype=np.float64
                )
            offset += e.size
        return flat

    def unpack(self, flat: NDArray[np.float64], divisor: float = 1.0) -> dict[str, NDArray[Any]]:
        """Split ``flat / divisor`` back into named arrays of the layout's dtypes and shapes."""
        if flat.shape != (self.size,):
            raise ValueError(f"expected {self.size} values, got shape {flat.shape}")
        out: dict[str, NDArray[Any]] = {}
        offset = 0
        for e in self.entries:
            part = flat[offset : offset + e.size] / divisor
            out[e.name] = part.astype(np.dtype(e.dtype), copy=False).reshape(e.shape)
            offset += e.size
        return out

    # -- wire form: the core layout's encoding -------------------------------------------
    def to_json(self) -> list[list[Any]]:
        return self.arrays.to_json()

    @classmethod
    def from_json(cls, value: Any) -> Layout:
        """Parse :meth:`to_json`'s output; anything else raises ValueError."""
        arrays = ArrayLayout.from_json(value)
        return cls(
            tuple(
                Entry(n, d, s)
                for n, s, d in zip(arrays.names, arrays.shapes, arrays.dtypes, strict=True)
            )
        )

    def digest(self) -> str:
        """SHA-256 of the canonical JSON, hex: two layouts are the same iff their digests are."""
        return self.arrays.digest()


def select_names(names: Sequence[str], patterns: Sequence[str]) -> tuple[str, ...]:
    """The names (in order) matched by any pattern: an exact name or a glob (``fc*.weight``).

    A pattern that matches nothing raises ValueError: it is most likely a typo,
    and a typo here would silently send an array in the clear.
    """
    chosen = []
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unmatched:
        raise ModelMismatchError(f"encryption patterns {unmatched} match no array of {list(names)}")
    for name in names:
        if any(fnmatch.fnmatchcase(name, p) for p in patterns):
            chosen.append(name)
    return tuple(chosen)


def peak(flat: NDArray[np.float64]) -> float:
    """``max |flat|`` (0 if empty); NaN or infinity raises ``InvalidUpdateError``.

    Two reductions, no temporary: NaN propagates through max and min.
    """
    if flat.size == 0:
        return 0.0
    high, low = float(flat.max()), float(flat.min())
    if not (math.isfinite(high) and math.isfinite(low)):
        raise InvalidUpdateError("the update holds NaN or infinite values")
    return max(high, -low)


def chunk_views(flat: NDArray[np.float64], slots: int) -> Iterator[NDArray[np.float64]]:
    """Consecutive views of ``flat`` of ``slots`` values (the last one shorter), no copies."""
    for start in range(0, flat.size, slots):
        yield flat[start : start + slots]
