"""Fixed-point encoding of weighted updates, sized so that the cohort's sum cannot wrap.

Everything is summed modulo ``2**32`` (``uint32`` words, 4 bytes per value on
the wire) and read back as a signed 32-bit integer, so a sum is exact as long
as its magnitude stays at most ``SUM_BOUND = 2**31 - 1``. With ``n`` nodes in
the cohort, each node's value of any coordinate is therefore kept within
``level = SUM_BOUND // n`` in magnitude; ``n * level <= SUM_BOUND`` whoever
drops out.

* A float value ``x`` of a node with weight ``w`` (``0 <= w <= max_weight``) is
  clipped to ``[-c, c]`` (``c`` the clipping range), multiplied by
  ``w * scale`` with ``scale = (level - 1) / (max_weight * c)`` and
  stochastically rounded: ``q = rint(w * scale * x + s)``, ``s`` uniform in
  [-1/2, 1/2), which rounds up with probability equal to the fractional part,
  so ``E[q] = w * scale * x`` and ``|q| <= level``. The server divides the sum
  by ``scale``. Each node's rounding error is below one step (``1 / scale``),
  so a coordinate of the weighted *mean* over ``m`` contributors of total
  weight ``W`` is off by less than ``m / (scale * W)``
  (:meth:`Quantization.mean_error_bound`), clipping aside. (``s`` has 32 random
  bits and the sum is a float64 below ``2**31``, so the rounding is unbiased to
  within ``2**-20`` of a step.)
* An integer value (integer or boolean arrays: histograms, counts) is sent as
  ``w * x`` exactly; it must satisfy ``|w * x| <= level``, or the node refuses
  to send it rather than clip it.
* The weight itself is an integer in ``[0, max_weight]``, which needs
  ``max_weight <= level``: a configuration that breaks it is refused with
  :class:`~flowerpets.exceptions.InfeasibleParametersError`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from flowerpets._validation import integer, real
from flowerpets.exceptions import (
    InfeasibleParametersError,
    InvalidUpdateError,
    ParameterValueError,
)
from flowerpets.secagg._primitives.prg import UniformStream

__all__ = [
    "BLOCK_WORDS",
    "MODULUS_BITS",
    "SUM_BOUND",
    "Quantization",
    "encode_integers_into",
    "quantize_into",
    "to_signed",
]

MODULUS_BITS = 32
SUM_BOUND = 2**31 - 1
# Values per block: the block's float64 temporaries, input and output stay in a 2 MiB L2 cache.
BLOCK_WORDS = 1 << 14
_U32_TO_UNIT = 2.0**-32


@dataclass(frozen=True, slots=True)
class Quantization:
    """The fixed-point encoding for one round (see the module docstring for the bounds)."""

    cohort_size: int
    clipping_range: float
    max_weight: int

    def __post_init__(self) -> None:
        n = integer("cohort_size", self.cohort_size, at_least=1)
        real("clipping_range", self.clipping_range, above=0)
        w = integer("max_weight", self.max_weight, at_least=1)
        if self.level < 2:
            raise InfeasibleParametersError(
                f"a cohort of {n} cannot be summed in {MODULUS_BITS} bits: each node's values "
                f"would have to stay within {self.level}"
            )
        if w > self.level:
            raise InfeasibleParametersError(
                f"max_weight={w} is too large for a cohort of {n}: the sum of {n} weights could "
                f"exceed 2**31 - 1 and wrap around the 2**{MODULUS_BITS} modulus "
                f"(the largest safe max_weight for this cohort is {self.level})"
            )

    @property
    def level(self) -> int:
        """The largest magnitude one node may contribute to any coordinate."""
        return SUM_BOUND // self.cohort_size

    @property
    def scale(self) -> float:
        """Quantization steps per unit of ``weight * value``."""
        return (self.level - 1) / (self.max_weight * float(self.clipping_range))

    def float_factor(self, weight: int) -> float:
        return weight * self.scale

    def float_limit(self, weight: int) -> float:
        """Scaled values are clipped to this: ``weight * scale * c``, at most ``level - 1``.

        Clipping ``x * factor`` to it is clipping ``x`` to ``[-c, c]``, and keeps
        the rounded value within ``level``.
        """
        return min(self.float_factor(weight) * float(self.clipping_range), float(self.level - 1))

    def integer_limit(self, weight: int) -> int:
        """The largest ``|x|`` an integer value may have at this weight."""
        return self.level // max(weight, 1)

    def mean_error_bound(self, contributors: int, total_weight: float) -> float:
        """A bound on the rounding error of each coordinate of the weighted mean."""
        if total_weight <= 0:
            return math.inf
        return contributors / (self.scale * total_weight)


def quantize_into(
    out: NDArray[np.uint32],
    values: NDArray[np.floating],
    *,
    factor: float,
    limit: float,
    uniform: UniformStream,
) -> int:
    """``out = rint(clip(values * factor, -limit, limit) + s) mod 2**32``; returns #clipped.

    ``s`` is uniform in [-1/2, 1/2) (the stream's words read as int32, times
    ``2**-32``). Works block by block, so the temporaries stay in the CPU cache.
    NaN or infinite values raise :class:`~flowerpets.exceptions.InvalidUpdateError`.
    ``limit + 1`` must be below ``2**31``.
    """
    flat = values.reshape(-1)
    if out.shape != (flat.size,) or out.dtype != np.uint32:
        raise ParameterValueError(
            f"out must be uint32 of shape ({flat.size},), got {out.dtype} {out.shape}"
        )
    if not 0 <= limit < SUM_BOUND:
        # No value: the limit is proportional to the node's private weight.
        raise ParameterValueError("limit must be in [0, 2**31 - 1)")
    signed_out = out.view(np.int32)  # two's complement: the same bits as the value mod 2**32
    block = uniform.block_words
    scaled = np.empty(block, dtype=np.float64)
    noise = np.empty(block, dtype=np.float64)
    clipped = 0
    for start in range(0, flat.size, block):
        x = flat[start : start + block]
        count = x.size
        v, s = scaled[:count], noise[:count]
        np.copyto(v, x)  # widen first: faster than a mixed-type multiply
        v *= factor
        low, high = float(v.min()), float(v.max())
        if not (low >= -limit and high <= limit):
            if not (math.isfinite(low) and math.isfinite(high)):
                raise InvalidUpdateError("the update holds NaN or infinite values")
            clipped += int(np.count_nonzero(np.abs(v) > limit))
            np.clip(v, -limit, limit, out=v)
        np.copyto(s, uniform.next(count).view(np.int32))
        s *= _U32_TO_UNIT
        v += s
        np.rint(v, out=v)
        # Exact: |v| <= limit + 1 < 2**31, an integer, so float64 -> int32 is well defined.
        np.copyto(signed_out[start : start + count], v, casting="unsafe")
    return clipped


def encode_integers_into(
    out: NDArray[np.uint32], values: NDArray[np.integer | np.bool_], *, weight: int, limit: int
) -> None:
    """``out = weight * values mod 2**32``, refusing any ``|value| > limit`` (never clipped)."""
    flat = values.reshape(-1)
    if out.shape != (flat.size,):
        raise ParameterValueError(f"out has shape {out.shape}, values have {flat.size} elements")
    if flat.size == 0:
        return
    low, high = int(flat.min()), int(flat.max())
    if low < -limit or high > limit:
        # No values, weight or limit (limit = level // weight) in the reason: it travels
        # in the clear, and each of them is private.
        raise InvalidUpdateError(
            "integer values times the node's weight exceed what one node may contribute, "
            "so the cohort's sum could wrap; they are never clipped"
        )
    np.copyto(out, flat.astype(np.int64) * weight, casting="unsafe")


def to_signed(total: NDArray[np.uint32]) -> NDArray[np.int64]:
    """A ``uint32`` sum read as the signed integers it encodes."""
    return total.view(np.int32).astype(np.int64)
