"""L2 clipping of a model update (all of its arrays taken as one vector).

The guarantee DP rests on is the bound on the *returned* arrays, after they are
cast to the model's dtype: :func:`clip_update` leaves room for every rounding
on the way (see its docstring), so the returned norm is at most the clip.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from flowerpets._validation import real
from flowerpets.core import ArrayRecord
from flowerpets.exceptions import InvalidUpdateError, ParameterValueError

__all__ = ["ClippedUpdate", "clip_update", "enforce_clip", "global_norm", "update_between"]


# A sum of squares at least this large lost nothing that matters to squares that underflowed
# into the subnormals (each is off by at most 2**-1075, below 2**-107 of the sum); a smaller
# one may be off by far more than the relative error clip_update allows for.
_SMALLEST_UNSCALED = 2.0**-968


_SQUARES_BLOCK = 1 << 16  # values per block: the float64 squares stay in the cache


def _sum_of_squares(values: NDArray[Any], *, divisor: float = 1.0) -> float:
    """``sum((values / divisor) ** 2)`` in float64, block by block; inf if a square overflows.

    Without BLAS: OpenBLAS's ``ddot`` hands a long vector to its worker threads, which then
    busy-wait for a while, taking a core from whatever the caller does next (on a small
    machine, its own next step); and without a float64 copy of the whole input. The
    error is that of a dot product or better: each square rounds once, and numpy's
    pairwise summation adds them.
    """
    flat = np.asarray(values).reshape(-1)
    total = 0.0
    squares = np.empty(min(flat.size, _SQUARES_BLOCK))
    with np.errstate(over="ignore"):  # an overflow shows as inf: the caller's to handle
        for start in range(0, flat.size, _SQUARES_BLOCK):
            part = squares[: min(_SQUARES_BLOCK, flat.size - start)]
            np.copyto(part, flat[start : start + part.size], casting="unsafe")
            if divisor != 1.0:
                part /= divisor
            part *= part
            total += float(np.add.reduce(part))
    return total


def global_norm(arrays: Mapping[str, NDArray[Any]]) -> float:
    """The L2 norm of all ``arrays`` concatenated, in float64 (no overflow or underflow)."""
    total = sum(_sum_of_squares(array) for array in arrays.values())
    if math.isfinite(total) and total >= _SMALLEST_UNSCALED:
        return math.sqrt(total)
    # Squares overflowed, or underflowed (a tiny update): scale by the largest magnitude first.
    peak = max((float(np.max(np.abs(a))) for a in arrays.values() if np.size(a)), default=0.0)
    if not math.isfinite(peak):
        return math.inf
    if peak == 0.0:
        return 0.0
    scaled = sum(_sum_of_squares(array, divisor=peak) for array in arrays.values())
    return peak * math.sqrt(scaled)


def update_between(new: ArrayRecord, received: ArrayRecord) -> dict[str, NDArray[np.float64]]:
    """``new - received`` per array, in float64; refuses mismatched or non-finite input.

    Raises :class:`~flowerpets.exceptions.InvalidUpdateError` if the names or
    shapes differ, or if the difference holds NaN or infinity.
    """
    got = [(n, a.shape) for n, a in new.items()]
    expected = [(n, a.shape) for n, a in received.items()]
    if got != expected:
        raise InvalidUpdateError(
            f"the trained arrays {got} do not match the received model {expected}"
        )
    update: dict[str, NDArray[np.float64]] = {}
    for name, array in new.items():
        data, base = array.numpy(), received[name].numpy()
        if data.dtype.kind not in "biuf" or base.dtype.kind not in "biuf":
            raise InvalidUpdateError(f"array {name!r} is not real-valued numeric data")
        delta = np.subtract(data, base, dtype=np.float64)
        with np.errstate(over="ignore"):  # an overflowing sum is refused just below
            total = np.add.reduce(delta, axis=None)
        if not np.isfinite(total):
            raise InvalidUpdateError(f"the update of {name!r} holds NaN or infinite values")
        update[name] = delta
    return update


@dataclass(frozen=True, slots=True)
class ClippedUpdate:
    """An update clipped to L2 norm ``clip``: the arrays, and the norm before clipping."""

    arrays: dict[str, NDArray[Any]]
    norm: float
    clip: float

    @property
    def unclipped(self) -> bool:
        """True if the update's norm was at most the clip (the adaptive-clipping indicator)."""
        return self.norm <= self.clip


def _output_dtype(dtype: np.dtype[Any] | None) -> np.dtype[Any]:
    if dtype is not None and dtype.kind == "f":
        return dtype
    return np.dtype(np.float64)


def clip_update(
    update: Mapping[str, NDArray[Any]],
    clip: float,
    *,
    dtypes: Mapping[str, np.dtype[Any]] | None = None,
) -> ClippedUpdate:
    """Scale ``update`` down to L2 norm at most ``clip``, cast to ``dtypes`` (default float64).

    An update whose norm is at most ``clip`` is returned unscaled (only cast),
    unless it is within rounding of the clip (see below). Non-float target
    dtypes become float64.

    The bound holds for the returned arrays, after the cast, without a second
    pass to check it. Each value is ``fl(fl(x_i) * fl(f))`` in the target dtype (the
    factor is cast too), so ``|out_i| <= f |x_i| (1 + u)^3 + tiny`` with ``u`` the
    dtype's unit roundoff and ``tiny`` its smallest subnormal; and the computed norm
    ``N`` of the ``n`` values is within a relative ``gamma = (n + k + 2) 2^-52`` of the
    true one (``k`` arrays, a sum of squares each). The factor is therefore
    ``f = min(1, (C - sqrt(n) tiny) / (N (1 + gamma) (1 + u)^3))``: an update within
    about ``3u`` of the clip is shrunk by that much, and the returned norm is at
    most ``C`` however the rounding falls (a property test checks it).
    """
    clip = real("clip", clip, above=0, secret=True)  # adaptive clipping learns it from data
    norm = global_norm(update)
    if not math.isfinite(norm):
        raise InvalidUpdateError("the update holds NaN or infinite values")
    targets = {n: _output_dtype(None if dtypes is None else dtypes.get(n)) for n in update}
    size = sum(int(np.size(a)) for a in update.values())
    roundoff = max((float(np.finfo(t).eps) / 2 for t in targets.values()), default=0.0)
    tiny = max((float(np.finfo(t).smallest_subnormal) for t in targets.values()), default=0.0)
    gamma = (size + len(update) + 2) * 2.0**-52
    budget = clip - math.sqrt(size) * tiny
    if budget <= 0:
        raise ParameterValueError(
            f"clip is below what the dtypes {sorted({t.name for t in targets.values()})} resolve"
        )
    worst = norm * (1 + gamma) * (1 + roundoff) ** 3
    factor = 1.0 if worst <= budget else budget / worst
    arrays: dict[str, NDArray[Any]] = {}
    for name, array in update.items():
        data = np.asarray(array, dtype=np.float64)
        if factor == 1.0:
            arrays[name] = data.astype(targets[name], copy=False)
        else:
            arrays[name] = np.multiply(data, factor, dtype=targets[name])
    return ClippedUpdate(arrays=arrays, norm=norm, clip=clip)


def enforce_clip(
    update: Mapping[str, NDArray[Any]],
    clip: float,
    *,
    dtypes: Mapping[str, np.dtype[Any]] | None = None,
) -> dict[str, NDArray[Any]] | None:
    """What a server that cannot trust a client's clipping keeps of ``update``: or None.

    An update whose L2 norm, computed here, is at most ``clip`` (with room for
    this computation's own rounding) comes back unchanged. One a rounding's
    width above (the most :func:`clip_update`'s honest output can read here, since
    its true norm is at most ``clip``) comes back through :func:`clip_update`, so
    the bound holds exactly. Anything larger returns None: its sender did not
    clip, and the caller refuses it. The caller has checked that ``update`` is
    real-valued and finite.
    """
    clip = float(clip)
    norm = global_norm(update)
    size = sum(int(np.size(a)) for a in update.values())
    gamma = (size + len(update) + 2) * 2.0**-52  # the relative error of ``norm``
    if norm * (1 + gamma) <= clip:
        return dict(update)
    if norm <= clip * (1 + 4 * gamma):
        return clip_update(update, clip, dtypes=dtypes).arrays
    return None
