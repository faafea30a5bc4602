"""The randomized Hadamard rotation that flattens an update before distributed DP rounds it.

Distributed DP rounds each coordinate of a client's scaled update to an integer
and sums them modulo ``m``. A vector whose norm sits in a few coordinates
would wrap around the modulus first there; rotating it by ``U = H S /
sqrt(D)`` (``H`` the Walsh-Hadamard matrix of order ``D``, ``S`` a diagonal of
random signs) spreads the norm evenly: each coordinate of ``U x`` is a sum of
``D`` independent ``+-x_k / sqrt(D)``, sub-Gaussian with variance proxy
``||x||_2^2 / D`` (Hoeffding; Kairouz, Liu and Steinke, ICML 2021, Section 4,
and Agarwal, Kairouz and Liu, NeurIPS 2021, Section 4, use the same
flattening). ``U`` is orthonormal, so L2 norms, and the privacy analysis in
L2, are unchanged; the server undoes it with ``U^T = S H / sqrt(D)``.

**One seed per round, public, shared.** Every client of a round must rotate by
the same ``U`` (the server unrotates the *sum*), so its signs come from a seed
the server sends with the round: it protects no one's privacy (the noise
does), only the wrap probability's bound, which holds for updates chosen
independently of the seed. The signs are the bits of
``SHAKE-256(DOMAIN || len(seed) as 8 bytes || seed || D as 8 bytes)``
(:mod:`hashlib`), bit ``j`` (little-endian within each byte) giving ``S_jj =
-1`` when set: a deterministic, documented derivation that any implementation
can reproduce.

**Padding.** ``H`` exists for powers of two: a vector of dimension ``d`` is
padded with zeros to ``D = padded_dimension(d)``, rotated there, and the
padding dropped after the inverse rotation. The accounting must count ``D``
coordinates (the rounded vector has ``D``).

**Cost.** The fast Walsh-Hadamard transform, ``log2(D)`` butterfly levels, two
at a time (radix 4) in place on numpy views, every pass on data in the cache:
about 15 ms of CPU for ``D = 2**20`` here (``bench/dp.py --parts distributed``).
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
from numpy.typing import NDArray

from flowerpets._validation import instance, integer
from flowerpets.exceptions import ParameterValueError

__all__ = ["MIN_SEED_BYTES", "RandomizedHadamard", "padded_dimension"]

MIN_SEED_BYTES = 16
_DOMAIN = b"flowerpets dp: randomized Hadamard signs v1"
_FWHT_BLOCK = 1 << 16  # 512 KiB of float64 and half that of scratch: in a 1 MiB L2 cache


def padded_dimension(d: int) -> int:
    """The smallest power of two at least ``d`` (and at least 1)."""
    d = integer("d", d, at_least=0)
    return 1 << max(d - 1, 0).bit_length()


def _signs(seed: bytes, padded: int) -> NDArray[np.float64]:
    """``S``'s diagonal as +-1.0 from the seed: the module docstring's SHAKE-256 derivation."""
    message = _DOMAIN + len(seed).to_bytes(8, "big") + seed + padded.to_bytes(8, "big")
    raw = np.frombuffer(hashlib.shake_256(message).digest((padded + 7) // 8), dtype=np.uint8)
    bits = np.unpackbits(raw, bitorder="little")[:padded]
    signs: NDArray[np.float64] = 1.0 - 2.0 * bits.astype(np.float64)
    return signs


_NARROW = 8  # up to this width, a level's rows are too short for numpy's inner loops


def _radix4(
    a: NDArray[np.float64],
    b: NDArray[np.float64],
    c: NDArray[np.float64],
    e: NDArray[np.float64],
    s: NDArray[np.float64],
    d: NDArray[np.float64],
) -> None:
    """``a, b, c, e`` become ``(a + b) +- (c + e)`` and ``(a - b) +- (c - e)``, in place.

    Two levels of ``H`` in eight passes, two of them into the scratch ``s`` and ``d``.
    """
    np.add(a, b, out=s)
    np.subtract(a, b, out=d)
    np.add(c, e, out=a)  # a holds c + e, b holds c - e
    np.subtract(c, e, out=b)
    np.subtract(s, a, out=c)
    np.add(s, a, out=a)
    np.subtract(d, b, out=e)
    np.add(d, b, out=b)


def _levels(
    x: NDArray[np.float64], h: int, sums: NDArray[np.float64], diffs: NDArray[np.float64]
) -> int:
    """Radix-4 butterflies on ``x`` from width ``h`` while four blocks fit; the next width.

    At a narrow width each of the ``h`` offsets within a block is a strided vector of its
    own (``h`` long passes, where numpy would loop over rows of ``h`` values: 2x to 6x
    slower at widths 2 to 8); wider, the blocks are rows of one 2-d pass.
    """
    n = x.size
    while 4 * h <= n:
        v = x.reshape(-1, 4, h)
        if h <= _NARROW:
            s, d = sums[: n // (4 * h)], diffs[: n // (4 * h)]
            for j in range(h):
                _radix4(v[:, 0, j], v[:, 1, j], v[:, 2, j], v[:, 3, j], s, d)
        else:
            s, d = sums[: n // 4].reshape(-1, h), diffs[: n // 4].reshape(-1, h)
            _radix4(v[:, 0, :], v[:, 1, :], v[:, 2, :], v[:, 3, :], s, d)
        h *= 4
    return h


def _fwht(x: NDArray[np.float64]) -> None:
    """``x = H x`` in place (unnormalized), ``x.size`` a power of two.

    Everything runs in the cache. The narrow levels run block by block
    (``_FWHT_BLOCK`` values): an odd number of levels starts with one plain level,
    so the rest go two at a time. The wide ones that remain combine rows of the
    vector seen as a matrix, each column on its own: they run a chunk of columns at a
    time, every remaining level on one chunk before the next (the same operations on
    each value, in the same order, as level after level over the whole vector).
    """
    n = x.size
    if n == 1:
        return
    block = min(n, _FWHT_BLOCK)
    sums, diffs = np.empty(block // 2), np.empty(max(block // 4, 1))
    width = 1
    for start in range(0, n, block):
        part = x[start : start + block]
        h = 1
        if (n.bit_length() - 1) % 2:  # one plain level first
            pair = part.reshape(-1, 2)
            first = sums[: block // 2]
            np.copyto(first, pair[:, 0])
            pair[:, 0] += pair[:, 1]
            np.subtract(first, pair[:, 1], out=pair[:, 1])
            h = 2
        width = _levels(part, h, sums, diffs)
    rows = n // width  # a power of 4: the levels left go two at a time
    if rows == 1:
        return
    chunk = max(block // rows, 1)
    if chunk * rows > block:  # rows beyond a block: scratch for a chunk
        sums, diffs = np.empty(chunk * rows // 4), np.empty(chunk * rows // 4)
    for column in range(0, width, chunk):
        h = 1
        while 4 * h <= rows:
            v = x.reshape(rows // (4 * h), 4, h, width)[:, :, :, column : column + chunk]
            shape = (rows // (4 * h), h, chunk)
            s, d = (
                sums[: rows * chunk // 4].reshape(shape),
                diffs[: rows * chunk // 4].reshape(shape),
            )
            _radix4(v[:, 0], v[:, 1], v[:, 2], v[:, 3], s, d)
            h *= 4


class RandomizedHadamard:
    """``U = H S / sqrt(D)`` of one round: ``seed`` (public, at least 16 bytes) fixes ``S``.

    ``rotate`` maps a float64 vector of ``dimension`` coordinates to ``padded``
    ones, ``unrotate`` back; both are orthonormal maps (up to float64 rounding,
    a relative ``log2(D)`` ulps or so), and ``unrotate(rotate(x)) == x`` to the
    same precision. See the module docstring for the derivation of ``S``.
    """

    __slots__ = ("_scaled_signs", "dimension", "padded")

    def __init__(self, seed: bytes, dimension: int) -> None:
        seed = bytes(instance("seed", seed, (bytes, bytearray)))
        if len(seed) < MIN_SEED_BYTES:
            raise ParameterValueError(
                f"a rotation seed is at least {MIN_SEED_BYTES} bytes, got {len(seed)}"
            )
        self.dimension: int = integer("dimension", dimension, at_least=1)
        self.padded: int = padded_dimension(self.dimension)
        self._scaled_signs = _signs(seed, self.padded) / math.sqrt(self.padded)

    def _check(self, x: object, size: int, what: str) -> NDArray[np.float64]:
        array = np.asarray(x)
        if array.shape != (size,) or array.dtype.kind not in "fiu":
            raise ParameterValueError(
                f"{what} must be a real vector of shape ({size},), got {array.dtype} {array.shape}"
            )
        return array

    def rotate(self, x: NDArray[np.float64]) -> NDArray[np.float64]:
        """``U`` applied to ``x`` (``dimension`` values) padded with zeros: ``padded`` values."""
        array = self._check(x, self.dimension, "the vector to rotate")
        out = np.zeros(self.padded)
        np.multiply(array, self._scaled_signs[: self.dimension], out=out[: self.dimension])
        _fwht(out)  # H (S x / sqrt(D)): the scaling first, in the same pass as the signs
        return out

    def unrotate(
        self, y: NDArray[np.float64], *, overwrite_input: bool = False
    ) -> NDArray[np.float64]:
        """``U^T y`` with the padding dropped: the first ``dimension`` values.

        ``overwrite_input`` lets the transform run in ``y`` itself (a C-contiguous float64
        vector the caller no longer needs), saving a copy; the result is then a view of it.
        """
        array = self._check(y, self.padded, "the vector to unrotate")
        in_place = overwrite_input and array.dtype == np.float64 and array.flags.c_contiguous
        out = array if in_place else np.array(array, dtype=np.float64)  # the transform is in place
        _fwht(out)
        kept = out[: self.dimension]
        kept *= self._scaled_signs[: self.dimension]
        return kept
