"""Shamir secret sharing over a prime field, vectorised with numpy.

A secret is a vector of field elements; each element gets its own random
polynomial of degree ``threshold - 1`` whose constant term is the element, and
the share at point ``x`` is the vector of the polynomials' values at ``x``.
Any ``threshold`` shares determine the polynomials, hence the secret (Lagrange
interpolation at 0); any ``threshold - 1`` shares are uniformly distributed
whatever the secret, so they say nothing about it (for every candidate secret
there is exactly one polynomial through it and the shares).

The field is GF(p) for a prime ``p < 2**31`` so that products of two elements
fit in a ``uint64``; the default is the Mersenne prime ``2**31 - 1``. A 32-byte
secret (an X25519 private key, a PRG seed) is split into 16 little-endian
16-bit chunks, each an element of the field (:func:`bytes_to_elements`), so a
share of it is 16 elements (64 bytes on the wire).

Lagrange coefficients at 0 depend only on the set of points, so they are cached
per tuple of points: a server that reconstructs many secrets from shares held
at the same relative positions (the SecAgg+ share points are relative positions
in the ring, see :mod:`flowerpets.secagg.graph`) computes them once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache

import numpy as np
from numpy.typing import NDArray

from flowerpets._validation import integer
from flowerpets.exceptions import ParameterValueError, ProtocolViolationError

__all__ = [
    "CHUNK_BITS",
    "DEFAULT_PRIME",
    "SECRET_BYTES",
    "Shamir",
    "bytes_to_elements",
    "elements_to_bytes",
]

DEFAULT_PRIME = 2**31 - 1
SECRET_BYTES = 32
CHUNK_BITS = 16
_CHUNKS = SECRET_BYTES * 8 // CHUNK_BITS  # 16 field elements per 32-byte secret

Elements = NDArray[np.uint64]


def bytes_to_elements(secret: bytes) -> Elements:
    """A 32-byte secret as 16 field elements (its little-endian 16-bit chunks)."""
    if not isinstance(secret, bytes | bytearray) or len(secret) != SECRET_BYTES:
        raise ParameterValueError(f"a secret is {SECRET_BYTES} bytes")
    return np.frombuffer(bytes(secret), dtype="<u2").astype(np.uint64)


def elements_to_bytes(elements: Elements) -> bytes:
    """The inverse of :func:`bytes_to_elements`; refuses elements that are not 16-bit chunks.

    A reconstruction from inconsistent shares gives elements anywhere in the
    field, so this check catches most of them (each element is a chunk with
    probability ``2**16 / p``).
    """
    values = np.asarray(elements)
    if values.shape != (_CHUNKS,):
        raise ParameterValueError(f"a secret is {_CHUNKS} elements, got shape {values.shape}")
    if int(values.max(initial=0)) >= 1 << CHUNK_BITS:
        raise ProtocolViolationError(
            "the shares are inconsistent: an element is not a 16-bit chunk"
        )
    return values.astype("<u2").tobytes()


class Shamir:
    """``threshold``-out-of-``n`` sharing of vectors of elements of GF(``prime``)."""

    def __init__(self, prime: int = DEFAULT_PRIME) -> None:
        integer("prime", prime, above=2, below=2**31)
        if not _is_prime(prime):
            raise ParameterValueError(f"prime must be an odd prime below 2**31, got {prime}")
        self.prime = prime
        # Largest multiple of p below 2**64: rejection sampling makes coefficients exactly uniform.
        self._accept_below = (2**64 // prime) * prime
        self._lagrange = lru_cache(maxsize=4096)(self._lagrange_at_zero)

    def __repr__(self) -> str:
        return f"Shamir(prime={self.prime})"

    # -- sharing -------------------------------------------------------------
    def split(
        self,
        secret: Sequence[int] | NDArray[np.integer],
        threshold: int,
        points: Sequence[int],
        randomness: Callable[[int], bytes],
    ) -> Elements:
        """Shares of ``secret`` at ``points``: an array of shape ``(len(points), len(secret))``.

        ``randomness(n)`` returns ``n`` random bytes (the OS's secure source in
        production, a seeded stream in tests).
        """
        values = self._elements(secret, "secret")
        xs = self._points(points)
        integer("threshold", threshold, at_least=1)
        if threshold > len(xs):
            raise ParameterValueError(
                f"threshold {threshold} exceeds the number of shares {len(xs)}"
            )
        p = np.uint64(self.prime)
        # Coefficients of x^1 .. x^(t-1) for every element, uniform in GF(p).
        coefficients = self._uniform((threshold - 1, values.size), randomness)
        x = np.asarray(xs, dtype=np.uint64)[:, None]
        # Horner: (((c_{t-1} x + c_{t-2}) x + ...) x + secret), reduced at every step.
        # Each product is below p**2 < 2**62, so nothing overflows uint64.
        acc = np.zeros((len(xs), values.size), dtype=np.uint64)
        for row in coefficients[::-1]:
            acc += row[None, :]
            acc %= p
            acc *= x
            acc %= p
        acc += values[None, :]
        acc %= p
        return acc

    def combine(
        self, points: Sequence[int], shares: Sequence[Sequence[int]] | Elements
    ) -> Elements:
        """The secret from shares at ``points`` (all of them are used: pass exactly ``t``)."""
        ys = self._elements(shares, "shares", ndim=2)
        out: Elements = self.combine_many(points, ys[None, :, :])[0]
        return out

    def combine_many(self, points: Sequence[int], shares: Elements) -> Elements:
        """Many secrets at once from shares held at the same ``points``.

        ``shares`` has shape ``(secrets, len(points), elements)``; the result has
        shape ``(secrets, elements)``.
        """
        xs = self._points(points)
        ys = np.asarray(shares, dtype=np.uint64)
        if ys.ndim != 3 or ys.shape[1] != len(xs):
            raise ParameterValueError(
                f"shares must have shape (secrets, {len(xs)}, elements), got {ys.shape}"
            )
        if ys.size and int(ys.max()) >= self.prime:
            raise ParameterValueError(f"a share is not an element of GF({self.prime})")
        weights = self._lagrange(tuple(xs))
        p = np.uint64(self.prime)
        acc = np.zeros((ys.shape[0], ys.shape[2]), dtype=np.uint64)
        for j, weight in enumerate(weights):
            term = ys[:, j, :] * np.uint64(weight)  # < 2**62
            acc += term
            acc %= p
        return acc

    def lagrange_at_zero(self, points: Sequence[int]) -> tuple[int, ...]:
        """The ``l_j`` with ``f(0) = sum_j l_j f(x_j)`` (cached per tuple of points)."""
        return self._lagrange(tuple(self._points(points)))

    # -- helpers -------------------------------------------------------------
    def _lagrange_at_zero(self, xs: tuple[int, ...]) -> tuple[int, ...]:
        p = self.prime
        out = []
        for j, xj in enumerate(xs):
            num, den = 1, 1
            for m, xm in enumerate(xs):
                if m != j:
                    num = num * xm % p
                    den = den * (xm - xj) % p
            out.append(num * pow(den, -1, p) % p)
        return tuple(out)

    def _points(self, points: Sequence[int]) -> list[int]:
        xs = [int(x) for x in points]
        if not xs:
            raise ParameterValueError("at least one share point is needed")
        if any(not 0 < x < self.prime for x in xs):
            raise ParameterValueError(f"share points must be in [1, {self.prime}), got {xs[:8]}")
        if len(set(xs)) != len(xs):
            raise ParameterValueError(f"share points must be distinct, got {xs[:8]}")
        return xs

    def _elements(self, values: object, what: str, ndim: int = 1) -> Elements:
        array = np.asarray(values)
        if array.ndim != ndim or array.dtype.kind not in "iu":
            raise ParameterValueError(
                f"{what} must be a {ndim}-d array of integers, got {array.dtype}"
            )
        if array.size and (int(array.min()) < 0 or int(array.max()) >= self.prime):
            raise ParameterValueError(f"{what} must hold elements of GF({self.prime})")
        out: Elements = array.astype(np.uint64)
        return out

    def _uniform(self, shape: tuple[int, int], randomness: Callable[[int], bytes]) -> Elements:
        count = shape[0] * shape[1]
        out = np.empty(count, dtype=np.uint64)
        filled = 0
        while filled < count:
            need = count - filled
            raw = np.frombuffer(randomness(8 * need), dtype="<u8")
            if raw.size != need:
                raise ParameterValueError("the randomness source returned too few bytes")
            kept = raw[raw < np.uint64(self._accept_below)] % np.uint64(self.prime)
            out[filled : filled + kept.size] = kept
            filled += kept.size
        return out.reshape(shape)


def _is_prime(n: int) -> bool:
    if n % 2 == 0:
        return n == 2
    f = 3
    while f * f <= n:
        if n % f == 0:
            return False
        f += 2
    return True
