"""The names, shapes and dtypes of a set of arrays, in order: one description for every PET.

:class:`ArrayLayout` is what two compatible models share. The aggregator checks
updates against it (names and shapes), a sum describes its arrays with it, and a
PET that packs arrays into one vector (SecAgg+'s masked vector, HE's
ciphertexts) builds its own packing on top of it.

Its stable encoding is :meth:`ArrayLayout.to_json`, a list of
``[name, dtype, shape]`` (dtype as numpy's ``dtype.str``, e.g. ``"<f4"``), and
:meth:`ArrayLayout.digest`, the SHA-256 of that list's compact JSON; HE's wire
header carries exactly that encoding, so changing it changes a wire format.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from flowerpets._validation import is_integer
from flowerpets.exceptions import ParameterTypeError, ParameterValueError

__all__ = ["ArrayLayout", "Shape"]

Shape = tuple[int, ...]


class _ArrayLike(Protocol):
    @property
    def shape(self) -> Shape: ...

    @property
    def dtype(self) -> Any: ...


@dataclass(frozen=True, slots=True)
class ArrayLayout:
    """Arrays' names, shapes and dtypes (numpy ``dtype.str``), in order.

    Names are unique; dimensions are non-negative ints. Equality is exact:
    the same names in the same order, with the same shapes and dtypes.
    """

    names: tuple[str, ...]
    shapes: tuple[Shape, ...]
    dtypes: tuple[str, ...]

    def __post_init__(self) -> None:
        if not len(self.names) == len(self.shapes) == len(self.dtypes):
            raise ParameterValueError(
                f"a layout has one shape and one dtype per name: {len(self.names)} names, "
                f"{len(self.shapes)} shapes, {len(self.dtypes)} dtypes"
            )
        if len(set(self.names)) != len(self.names):
            raise ParameterValueError(f"a layout names each array once, got {list(self.names)[:8]}")
        for name, shape, dtype in zip(self.names, self.shapes, self.dtypes, strict=True):
            if not isinstance(name, str):
                raise ParameterTypeError(f"array names are str, got {type(name).__name__}")
            if not isinstance(dtype, str):
                raise ParameterTypeError(
                    f"array {name!r}: a dtype is numpy's dtype.str, got {dtype!r}"
                )
            if not isinstance(shape, tuple) or any(not is_integer(d) or d < 0 for d in shape):
                raise ParameterValueError(f"array {name!r} has an invalid shape {shape!r}")

    @classmethod
    def of(
        cls, arrays: Mapping[str, _ArrayLike], names: Iterable[str] | None = None
    ) -> ArrayLayout:
        """The layout of ``arrays`` (only ``names``, if given), in ``arrays``' order."""
        wanted = None if names is None else set(names)
        picked = [(n, a) for n, a in arrays.items() if wanted is None or n in wanted]
        return cls(
            tuple(n for n, _ in picked),
            tuple(tuple(int(d) for d in a.shape) for _, a in picked),
            tuple(np.dtype(a.dtype).str for _, a in picked),
        )

    def __len__(self) -> int:
        return len(self.names)

    def items(self) -> Iterator[tuple[str, Shape, str]]:
        """``(name, shape, dtype)`` of each array, in order."""
        return zip(self.names, self.shapes, self.dtypes, strict=True)

    @property
    def sizes(self) -> tuple[int, ...]:
        """How many values each array holds."""
        return tuple(math.prod(shape) for shape in self.shapes)

    @property
    def size(self) -> int:
        """How many values the arrays hold in all."""
        return sum(self.sizes)

    @property
    def named_shapes(self) -> tuple[tuple[str, Shape], ...]:
        """``(name, shape)`` pairs: what an update must share with the model, whatever its dtype."""
        return tuple(zip(self.names, self.shapes, strict=True))

    def shape_map(self) -> dict[str, Shape]:
        """``{name: shape}``, in order."""
        return dict(self.named_shapes)

    def describe(self, limit: int = 3) -> str:
        """A short description (at most ``limit`` arrays named), for error messages."""
        named = ", ".join(f"{n!r} {s}" for n, s in self.named_shapes[:limit])
        more = f" and {len(self) - limit} more" if len(self) > limit else ""
        return f"{self.size} values in {len(self)} arrays ({named}{more})"

    # -- the stable encoding ----------------------------------------------------------------
    def to_json(self) -> list[list[Any]]:
        """``[[name, dtype, shape], ...]``: JSON-ready, and what :meth:`digest` hashes."""
        return [[n, d, list(s)] for n, s, d in self.items()]

    @classmethod
    def from_json(cls, value: Any) -> ArrayLayout:
        """Parse :meth:`to_json`'s output; anything else raises ValueError."""
        if not isinstance(value, list):
            raise ParameterValueError("a layout is a list of [name, dtype, shape]")
        names: list[str] = []
        dtypes: list[str] = []
        shapes: list[Shape] = []
        for item in value:
            if (
                not isinstance(item, list)
                or len(item) != 3
                or not isinstance(item[0], str)
                or not isinstance(item[1], str)
                or not isinstance(item[2], list)
            ):
                raise ParameterValueError(f"a layout entry is [name, dtype, shape], got {item!r}")
            names.append(item[0])
            dtypes.append(item[1])
            shapes.append(tuple(item[2]))
        return cls(tuple(names), tuple(shapes), tuple(dtypes))

    def digest(self) -> str:
        """SHA-256 of the compact JSON, hex: two layouts are the same iff their digests are."""
        text = json.dumps(self.to_json(), separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256(text.encode()).hexdigest()
