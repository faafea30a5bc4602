"""Flat packing of named arrays into one vector, chunked by the ciphertext's slot count.

Every encrypted array of a model goes into *one* flat float64 vector, in model
order, so no ciphertext is wasted on a small bias: ``n`` values cost
``ceil(n / slots)`` ciphertexts whatever the number of layers. A
:class:`Layout` records which arrays are packed (the core's
:class:`~flowerpets.core.ArrayLayout` of their names, shapes and dtypes) and
where; it travels with every encrypted update and sum as canonical JSON
(bounded, strictly validated, never pickle).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from flowerpets._validation import instance, strings
from flowerpets.core.layout import ArrayLayout
from flowerpets.exceptions import (
    InvalidUpdateError,
    ModelMismatchError,
    ParameterValueError,
    UnknownArrayError,
)

__all__ = [
    "RESERVED_PREFIX",
    "Layout",
    "chunk_views",
    "encryption_patterns",
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
class Layout:
    """Which arrays are packed into the flat vector, in order.

    The names, shapes and dtypes are a core :class:`~flowerpets.core.ArrayLayout`
    (:attr:`arrays`, whose encoding is the wire's): the one description of them.
    On top of it CKKS adds its rules (floating-point little-endian dtypes only, no
    reserved names, size limits) and the chunking into ciphertexts.
    """

    arrays: ArrayLayout

    def __post_init__(self) -> None:
        # The core layout has checked what every layout must hold (unique names, valid shapes).
        instance("arrays", self.arrays, ArrayLayout)
        if len(self.arrays) > MAX_LAYOUT_ENTRIES:
            raise ParameterValueError(f"a layout holds at most {MAX_LAYOUT_ENTRIES} arrays")
        for name, shape, dtype in self.arrays.items():
            if not name or name.startswith(RESERVED_PREFIX):
                raise ParameterValueError(
                    f"array name {name!r} is empty or uses the reserved prefix"
                )
            if dtype not in _FLOAT_DTYPES:
                raise ParameterValueError(
                    f"array {name!r} has dtype {dtype!r}: CKKS is approximate, so only "
                    "floating-point arrays can be encrypted"
                )
            if len(shape) > MAX_NDIM:
                raise ParameterValueError(f"array {name!r} has an invalid shape {shape!r}")
        if self.size > MAX_LAYOUT_SIZE:
            raise ParameterValueError(
                f"a layout packs at most {MAX_LAYOUT_SIZE} values, got {self.size}"
            )

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
        little = tuple(np.dtype(dtype).newbyteorder("<").str for dtype in arrays.dtypes)
        return cls(ArrayLayout(arrays.names, arrays.shapes, little))

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
            raise UnknownArrayError(f"the layout has no arrays named {unknown}")
        flat = np.zeros(self.size, dtype=np.float64)
        offset = 0
        for (name, shape, _), size in zip(self.arrays.items(), self.arrays.sizes, strict=True):
            if name in arrays:
                data = np.asarray(arrays[name])
                if data.shape != shape:
                    raise InvalidUpdateError(
                        f"array {name!r} has shape {data.shape}, the layout says {shape}"
                    )
                # One pass, no temporary; computed in float64 (a float32 array times a
                # Python float would otherwise be rounded to float32 first).
                np.multiply(
                    data.reshape(-1), weight, out=flat[offset : offset + size], dtype=np.float64
                )
            offset += size
        return flat

    def unpack(self, flat: NDArray[np.float64], divisor: float = 1.0) -> dict[str, NDArray[Any]]:
        """Split ``flat / divisor`` back into named arrays of the layout's dtypes and shapes."""
        if flat.shape != (self.size,):
            raise ParameterValueError(f"expected {self.size} values, got shape {flat.shape}")
        out: dict[str, NDArray[Any]] = {}
        offset = 0
        for (name, shape, dtype), size in zip(self.arrays.items(), self.arrays.sizes, strict=True):
            part = flat[offset : offset + size] / divisor
            out[name] = part.astype(np.dtype(dtype), copy=False).reshape(shape)
            offset += size
        return out

    # -- wire form: the core layout's encoding -------------------------------------------
    def to_json(self) -> list[list[Any]]:
        return self.arrays.to_json()

    @classmethod
    def from_json(cls, value: Any) -> Layout:
        """Parse :meth:`to_json`'s output; anything else raises ValueError."""
        return cls(ArrayLayout.from_json(value))

    def digest(self) -> str:
        """SHA-256 of the canonical JSON, hex: two layouts are the same iff their digests are."""
        return self.arrays.digest()


def encryption_patterns(value: object) -> tuple[str, ...]:
    """A mod's ``encrypt`` argument: a non-empty sequence of non-empty names or globs."""
    patterns = strings("encrypt", value, check=_a_pattern)
    if not patterns:
        raise ParameterValueError(
            "encrypt must be a non-empty sequence of names or patterns (default: '*')"
        )
    return patterns


def _a_pattern(pattern: str) -> None:
    if not pattern:
        raise ParameterValueError("encrypt holds an empty name or pattern")


def select_names(names: Sequence[str], patterns: Sequence[str]) -> tuple[str, ...]:
    """The names (in order) matched by any pattern: an exact name or a glob (``fc*.weight``).

    A pattern that matches nothing raises ModelMismatchError: it is most likely a typo,
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
