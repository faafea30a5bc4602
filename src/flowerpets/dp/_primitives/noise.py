"""Gaussian noise from a cryptographically secure source.

The default source, :class:`AesCtrGaussian`, turns an AES-256-CTR keystream
(OpenSSL, through ``cryptography``) into Gaussians in three documented steps:

1. **Keystream.** A fresh 256-bit key from :func:`secrets.token_bytes` and a
   counter block starting at zero; every call continues the same stream, so no
   keystream block is ever used twice. The stream is read as little-endian
   unsigned 64-bit words.
2. **Uniforms.** Each word ``w`` gives ``u = ((w >> 12) + 1/2) * 2**-52``: its top
   52 bits, centred in their cell. Every step is exact in float64, so ``u`` lies
   in [2**-53, 1 - 2**-53], strictly inside (0, 1), and ``log(u)`` is always
   finite. (With 53 bits, ``+ 1/2`` would round the top cell up to 1.)
3. **Gaussians.** Box-Muller on pairs of uniforms:
   ``sqrt(-2 ln u1) * (cos 2 pi u2, sin 2 pi u2)``. Each output is then the sum
   of ``summands`` such normals divided by ``sqrt(summands)`` (same
   distribution, see below). A single normal is at most
   ``sqrt(-2 ln 2**-53) = 8.6`` in magnitude: the tail beyond is lost, with
   probability about 1e-17.

Floating-point attacks. Mironov (CCS 2012) showed that a textbook Laplace
sampler in floating point leaks the value it protects: the set of floats that
``x + noise`` can take depends on ``x``. Jin et al. (IEEE S&P 2022) showed the
same for Gaussian samplers (Box-Muller, polar, ziggurat). Summing ``2n``
independent samples, as Holohan and Braghin (2021) propose and Opacus's secure
mode does with ``n = 2``, makes that search infeasible in practice (its cost
grows as ``2**(53 (2n - 1))``); it is the default here (``summands=4``). It is a
mitigation, not a proof: a discrete Gaussian on a fixed-point grid (Canonne,
Kamath and Steinke, 2020) would be one, and is not implemented.

:class:`GeneratorGaussian` wraps a caller's ``numpy.random.Generator`` for tests
and reproducible experiments only: it is not a secure source, and
:func:`gaussian_source` warns when one is chosen.
"""

from __future__ import annotations

import math
import secrets
import threading
import warnings
from typing import Protocol, runtime_checkable

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from numpy.typing import NDArray

from flowerpets.exceptions import InsecureRandomnessWarning

__all__ = ["AesCtrGaussian", "GaussianSource", "GeneratorGaussian", "gaussian_source"]

_KEY_BYTES = 32  # AES-256
_BLOCK_BYTES = 16
_CHUNK = 1 << 17  # outputs per chunk: bounds the temporaries at a few MB
_UNIFORM_SCALE = 2.0**-52


@runtime_checkable
class GaussianSource(Protocol):
    """Draws i.i.d. N(0, std^2) noise, as float64."""

    @property
    def secure(self) -> bool:
        """True if the noise comes from a cryptographically secure source."""
        ...

    def normal(self, std: float, shape: tuple[int, ...]) -> NDArray[np.float64]: ...


def _check_std(std: float) -> float:
    value = float(std)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"noise standard deviation must be finite and >= 0, got {std!r}")
    return value


class AesCtrGaussian:
    """Gaussians from an AES-256-CTR keystream (see the module docstring for the transform).

    ``key`` and ``initial_counter`` exist for known-answer tests; leave them
    unset, and the key comes from :func:`secrets.token_bytes`. One instance may
    be shared by threads (every node of a simulation): drawing from the stream is
    serialized, so no two draws ever see the same keystream bytes.
    """

    def __init__(
        self,
        *,
        summands: int = 4,
        key: bytes | None = None,
        initial_counter: bytes | None = None,
    ) -> None:
        if isinstance(summands, bool) or not isinstance(summands, int) or summands < 1:
            raise ValueError(f"summands must be an integer >= 1, got {summands!r}")
        key = secrets.token_bytes(_KEY_BYTES) if key is None else bytes(key)
        if len(key) != _KEY_BYTES:
            raise ValueError(f"key must be {_KEY_BYTES} bytes, got {len(key)}")
        counter = bytes(_BLOCK_BYTES) if initial_counter is None else bytes(initial_counter)
        if len(counter) != _BLOCK_BYTES:
            raise ValueError(f"initial_counter must be {_BLOCK_BYTES} bytes, got {len(counter)}")
        self._encryptor = Cipher(algorithms.AES(key), modes.CTR(counter)).encryptor()
        self._summands = summands
        self._lock = threading.Lock()
        self._zeros = bytes(0)

    @property
    def secure(self) -> bool:
        return True

    @property
    def summands(self) -> int:
        return self._summands

    def keystream(self, nbytes: int) -> bytes:
        """The next ``nbytes`` of the AES-CTR keystream (the encryption of zeros)."""
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        with self._lock:
            if len(self._zeros) < nbytes:
                self._zeros = bytes(nbytes)
            return self._encryptor.update(memoryview(self._zeros)[:nbytes])

    def words(self, n: int) -> NDArray[np.uint64]:
        """The next ``n`` little-endian 64-bit words of the keystream."""
        return np.frombuffer(self.keystream(8 * n), dtype="<u8").astype(np.uint64, copy=False)

    def uniforms(self, n: int) -> NDArray[np.float64]:
        """``n`` uniforms strictly inside (0, 1), 52 random bits each."""
        u = (self.words(n) >> np.uint64(12)).astype(np.float64)
        u += 0.5
        u *= _UNIFORM_SCALE
        return u

    def standard_normal(self, n: int) -> NDArray[np.float64]:
        """``n`` standard normals by Box-Muller (no summing)."""
        pairs = (n + 1) // 2
        u = self.uniforms(2 * pairs)
        radius, angle = u[:pairs], u[pairs:]  # in place: the same operations, fewer buffers
        np.log(radius, out=radius)
        radius *= -2.0
        np.sqrt(radius, out=radius)
        angle *= 2.0 * math.pi
        out = np.empty(2 * pairs, dtype=np.float64)
        np.cos(angle, out=out[:pairs])
        np.sin(angle, out=out[pairs:])
        out[:pairs] *= radius
        out[pairs:] *= radius
        return out[:n]

    def normal(self, std: float, shape: tuple[int, ...]) -> NDArray[np.float64]:
        """N(0, std^2) noise of ``shape``: each value sums ``summands`` Box-Muller normals."""
        std = _check_std(std)
        size = math.prod(shape)
        out = np.empty(size, dtype=np.float64)
        scale = std / math.sqrt(self._summands)
        for start in range(0, size, _CHUNK):
            stop = min(size, start + _CHUNK)
            block = self.standard_normal(self._summands * (stop - start))
            chunk = block.reshape(self._summands, stop - start).sum(axis=0)
            np.multiply(chunk, scale, out=out[start:stop])
        return out.reshape(shape)


class GeneratorGaussian:
    """Noise from a caller's ``numpy.random.Generator``: reproducible, *not* secure.

    ``normal(std, shape)`` is exactly ``rng.normal(0.0, std, size=shape)``, so a
    test can reproduce every draw from the same seed. Draws are serialized, as
    numpy generators are not thread-safe.
    """

    def __init__(self, rng: np.random.Generator) -> None:
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
        self._rng = rng
        self._lock = threading.Lock()

    @property
    def secure(self) -> bool:
        return False

    def normal(self, std: float, shape: tuple[int, ...]) -> NDArray[np.float64]:
        std = _check_std(std)
        with self._lock:
            return np.asarray(self._rng.normal(0.0, std, size=shape), dtype=np.float64)


def gaussian_source(rng: np.random.Generator | None, *, owner: str) -> GaussianSource:
    """The secure source when ``rng`` is None; else ``rng``, with a warning naming ``owner``."""
    if rng is None:
        return AesCtrGaussian()
    warnings.warn(
        f"{owner}: noise drawn from the numpy Generator you passed is not cryptographically "
        "secure; use rng= for tests and reproducible experiments only",
        InsecureRandomnessWarning,
        stacklevel=3,
    )
    return GeneratorGaussian(rng)
