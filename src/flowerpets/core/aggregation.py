"""Streaming aggregation: the server keeps a running sum, never every update.

An update is checked whole before any of it is added, so a bad update (wrong
names or shapes, NaN or infinity, a nonsense weight) is refused with
:class:`~flowerpets.exceptions.InvalidUpdateError` and leaves the sum exactly
as it was.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.typing import NDArray

from flowerpets.core.records import Array, ArrayRecord, MetricRecord
from flowerpets.exceptions import InvalidUpdateError

__all__ = ["MetricMean", "WeightedSum"]

Signature = tuple[tuple[str, tuple[int, ...]], ...]

# Float dtypes whose finiteness check may take the BLAS shortcut (_sum_certainly_finite);
# it is exact only while size * sqrt(dtype max) cannot overflow, hence the size bound.
_BLAS_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
_FAST_FINITE_MAX_SIZE = 2**40

# Weighted adds go block by block through a scratch buffer of this many bytes: the
# block of the sum, the scratch and the block of the update stay in the CPU cache,
# and no update-sized temporary is allocated per add.
_BLOCK_BYTES = 256 * 1024


def _signature(arrays: ArrayRecord) -> Signature:
    return tuple((name, a.shape) for name, a in arrays.items())


def _check_finite(name: str, array: Array) -> None:
    data = array.numpy()
    if data.dtype.kind not in "fc" or data.size == 0:
        return
    # One reduction instead of an isfinite mask: any NaN or inf makes the sum non-finite.
    # (It can also overflow for values near the dtype's maximum, which are refused too.)
    if _sum_certainly_finite(data):
        return
    if not np.isfinite(np.add.reduce(data, axis=None)):
        raise InvalidUpdateError(f"array {name!r} holds NaN or infinite values")


def _sum_certainly_finite(data: NDArray[Any]) -> bool:
    """True only if ``np.add.reduce(data)`` is finite; False means "do the exact check".

    A performance shortcut, not a different rule: ``dot(x, x)`` is one BLAS pass,
    faster than the pairwise sum. Its terms are all >= 0, so if it is finite, no
    element is NaN or infinite and every ``|x_i| <= sqrt(max) * (1 + eps)``; then
    no partial sum of the (much shorter than sqrt(max)) array can overflow, so
    the sum is finite. If it is not finite (NaN, inf, or merely elements above
    ``sqrt(max)``), the caller does the exact check, which decides and warns as
    before. The dot's own floating-point warnings are silenced.
    """
    if data.dtype not in _BLAS_FLOATS or data.size > _FAST_FINITE_MAX_SIZE:
        return False
    flat = data.reshape(-1)
    with np.errstate(all="ignore"):
        return bool(np.isfinite(np.dot(flat, flat)))


def _accumulator_dtype(array: Array, weight: float | int) -> np.dtype[Any]:
    kind = array.dtype.kind
    if kind == "c":
        return np.dtype(np.complex128)
    if kind in "biu" and isinstance(weight, int):
        return np.dtype(np.int64)  # integer sums (histograms, counts) stay exact
    return np.dtype(np.float64)


class WeightedSum:
    """Running ``sum_i weight_i * arrays_i`` over updates of one shape.

    ``expected`` fixes the names and shapes every update must have; without it
    the first update added fixes them. Float updates are summed in float64,
    integer updates with integer weights in int64 (exact).
    """

    def __init__(self, *, expected: ArrayRecord | None = None) -> None:
        self._expected: Signature | None = _signature(expected) if expected is not None else None
        self._sums: dict[str, NDArray[Any]] = {}
        self._scratch: dict[np.dtype[Any], NDArray[Any]] = {}  # one block per accumulator dtype
        self._total_weight: float | int = 0
        self._count = 0

    @property
    def count(self) -> int:
        """How many updates were added."""
        return self._count

    @property
    def total_weight(self) -> float:
        return float(self._total_weight)

    def check(self, arrays: ArrayRecord, weight: float | int) -> None:
        """Raise ``InvalidUpdateError`` if ``add`` would refuse this update."""
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise InvalidUpdateError(f"weight must be a number, got {type(weight).__name__}")
        if not math.isfinite(weight) or weight < 0:
            raise InvalidUpdateError(f"weight must be finite and >= 0, got {weight!r}")
        expected = self._expected
        got = _signature(arrays)
        if expected is not None and got != expected:
            raise InvalidUpdateError(
                f"update does not match the model: expected names and shapes {_show(expected)}, "
                f"got {_show(got)}"
            )
        for name, array in arrays.items():
            if array.dtype.kind not in "biufc":
                raise InvalidUpdateError(f"array {name!r} has non-numeric dtype {array.dtype}")
            _check_finite(name, array)

    def add(self, arrays: ArrayRecord, weight: float | int = 1) -> None:
        """Add ``weight * arrays`` to the sum, or refuse the whole update."""
        self.check(arrays, weight)
        if self._expected is None:
            self._expected = _signature(arrays)
        for name, array in arrays.items():
            data = array.numpy()
            acc = self._sums.get(name)
            if acc is None:
                acc = np.zeros(data.shape, dtype=_accumulator_dtype(array, weight))
                self._sums[name] = acc
            elif acc.dtype.kind == "i" and not (isinstance(weight, int) and data.dtype.kind in "biu"):
                acc = self._sums[name] = acc.astype(np.float64)
            if weight == 1:
                np.add(acc, data, out=acc, casting="unsafe")
            else:
                self._add_scaled(acc, data, weight)
        self._total_weight += weight
        self._count += 1

    def _add_scaled(self, acc: NDArray[Any], data: NDArray[Any], weight: float | int) -> None:
        """``acc += np.multiply(data, weight, dtype=acc.dtype)``, block by block.

        Each element goes through the same two operations (the product in the
        accumulator's dtype, then the sum) as the one-shot expression, so the
        result is bit for bit the same; only the temporary is a reused block.
        """
        if not (acc.flags.c_contiguous and data.flags.c_contiguous):
            acc += np.multiply(data, weight, dtype=acc.dtype)
            return
        flat_acc, flat_data = acc.reshape(-1), data.reshape(-1)
        step = max(1, _BLOCK_BYTES // acc.itemsize)
        scratch = self._scratch.get(acc.dtype)
        if scratch is None:
            scratch = self._scratch[acc.dtype] = np.empty(step, dtype=acc.dtype)
        for start in range(0, flat_acc.size, step):
            block = flat_acc[start : start + step]
            product = np.multiply(
                flat_data[start : start + step], weight, out=scratch[: block.size], dtype=acc.dtype
            )
            np.add(block, product, out=block)

    def result(self) -> ArrayRecord:
        """The sum so far (empty if nothing was added). The accumulator is handed over, not copied."""
        return ArrayRecord.from_numpy(self._sums, copy=False)


def _show(signature: Signature) -> str:
    shown = ", ".join(f"{name}{list(shape)}" for name, shape in signature[:6])
    return f"[{shown}{', ...' if len(signature) > 6 else ''}]"


class MetricMean:
    """Weighted means of the scalar metrics that replies report.

    Each metric is averaged over the replies that carry it, weighted as the
    updates are. The weight metric itself (``num-examples``) is summed.
    List-valued metrics are not averaged.
    """

    def __init__(self, *, weight_key: str | None = None) -> None:
        self._weight_key = weight_key
        self._sums: dict[str, float] = {}
        self._weights: dict[str, float] = {}

    def add(self, metrics: MetricRecord, weight: float) -> None:
        for key, value in metrics.items():
            if isinstance(value, list):
                continue
            w = 1.0 if key == self._weight_key else weight
            self._sums[key] = self._sums.get(key, 0.0) + w * float(value)
            self._weights[key] = self._weights.get(key, 0.0) + w

    def result(self) -> MetricRecord:
        out = MetricRecord()
        for key, total in self._sums.items():
            if key == self._weight_key:
                out[key] = total
            elif self._weights[key] > 0:
                out[key] = total / self._weights[key]
        return out
