"""Gaussian noise from a cryptographically secure source.

The default source, :class:`AesCtrGaussian`, turns an AES-256-CTR keystream
(OpenSSL, through ``cryptography``) into Gaussians in three documented steps:

1. **Keystream.** A fresh 256-bit key from :func:`secrets.token_bytes` and a
   counter block starting at zero; every call continues the same stream, so no
   keystream block is ever used twice. The stream is read as little-endian
   unsigned 64-bit words; a word's *position* is its byte offset in the stream.
2. **Normals.** Each word is one ziggurat draw (Marsaglia and Tsang, J. Stat.
   Softw. 2000, with 256 layers and the bit layout of numpy's
   ``Generator.standard_normal``, so that layer, sign and position never share
   bits, as Doornik (2005) advises): bits 0-7 pick the layer, bit 8 the sign,
   bits 9-60 the position in the layer. About 98.5% of words are accepted at
   once, with one multiply. The others (wedges and the tail beyond r = 3.654)
   need more randomness: the word at position ``p`` gets its own *retry
   stream*, blocks ``AES-256-ECB(k', p || a)`` for attempts a = 0, 1, ... (16
   bytes, big-endian), whose words the draw consumes in the order numpy would
   read them from its bit generator, with uniforms ``(v >> 11) * 2**-53``.
   ``k'`` is HKDF-SHA256 of the key, so the retry blocks never meet the main
   stream. The result: each normal is numpy's ziggurat run on its own words,
   and depends on no other normal's words.
3. **Summing.** Each output is the sum of ``summands`` such normals, each from
   a different word, divided by ``sqrt(summands)`` (the same distribution).

Floating-point attacks. Mironov (CCS 2012) showed that a textbook Laplace
sampler in floating point leaks the value it protects: the set of floats that
``x + noise`` can take depends on ``x``. Jin et al. (IEEE S&P 2022) showed the
same for Gaussian samplers (Box-Muller, polar, ziggurat). Summing independent
samples, as Holohan and Braghin (ESORICS 2021) propose, makes that search
infeasible in practice: its cost grows exponentially with the number of
summands. They sum ``2n`` samples from samplers that return pairs (Box-Muller's
cos and sin of one transform add up to a single rotated normal), and ``n`` from
samplers that share no variates between draws, as the ziggurat here does; the
default ``summands=4`` is ``n = 4``, twice the independent normals of Opacus's
secure mode (4 Box-Muller samples, ``n = 2``). It is a mitigation, not a
proof: a discrete Gaussian on a fixed-point grid (Canonne, Kamath and Steinke,
2020) would be one, and is not implemented.

Why the ziggurat and not Box-Muller: numpy's float64 ``log``, ``cos`` and
``sin`` are scalar loops on CPUs without AVX-512 (15-25 ns a value), and four
independent Box-Muller normals per output cost four of each. The ziggurat's
fast path is a table look-up and a multiply, done here with in-place numpy
operations on cache-sized blocks (``bench/dp.py`` measures it against numpy).

:class:`GeneratorGaussian` wraps a caller's ``numpy.random.Generator`` for tests
and reproducible experiments only: it is not a secure source, and
:func:`gaussian_source` warns when one is chosen.

A mod holds its source through :func:`lazy_gaussian_source`: the secure source
is then a :class:`LazySecureGaussian`, which builds its cipher on the first
draw and never pickles it, so a mod can be shipped to another process (a
simulation's worker) without its key, and draws there under a fresh one.
"""

from __future__ import annotations

import math
import secrets
import threading
import warnings
from typing import Protocol, runtime_checkable

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from numpy.typing import NDArray

from flowerpets._validation import instance, integer, real
from flowerpets.exceptions import InsecureRandomnessWarning, ParameterValueError

__all__ = [
    "AesCtrGaussian",
    "GaussianSource",
    "GeneratorGaussian",
    "LazySecureGaussian",
    "gaussian_source",
    "lazy_gaussian_source",
]

_KEY_BYTES = 32  # AES-256
_BLOCK_BYTES = 16
_RETRY_INFO = b"flowerpets dp noise: ziggurat retry stream"
# Words per block: a few 256 KiB buffers stay in the L2 cache while every step runs over them.
_BLOCK_WORDS = 1 << 15

# -- the ziggurat (Marsaglia and Tsang 2000; numpy's constants) -------------------------------
_LAYERS = 256
_R = 3.6541528853610088  # where the tail starts
_INV_R = 1.0 / _R
_AREA = 0.0049286732339746519  # the area of every layer, the base's tail included
_MASK52 = np.uint64((1 << 52) - 1)
_ONE_BITS = np.uint64(0x3FF0000000000000)  # the bits of 1.0: OR-ed with 52 bits, a float in [1, 2)


def _gauss(x: float) -> float:
    return math.exp(-0.5 * x * x)


def _ziggurat_tables() -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """Layer widths, fast-acceptance fractions and heights, layer 0 at the base.

    Layer ``i >= 1`` is the box ``[0, x_i] x [f(x_i), f(x_{i-1})]`` with
    ``f(x) = exp(-x^2/2)``, ``x_0 = 0`` and ``x_255 = r``; every box has area
    ``_AREA``, which fixes the edges from the bottom up. Layer 0 is the base
    ``[0, r] x [0, f(r)]`` plus the tail beyond ``r``, drawn as a box of the same
    area and width ``_AREA / f(r)``. A draw at ``u * width`` (``u`` uniform) is
    accepted at once when it falls below the next layer's edge: ``u < fraction``.
    """
    edges = np.zeros(_LAYERS)
    edges[-1] = _R
    for i in range(_LAYERS - 2, 0, -1):
        edges[i] = math.sqrt(-2.0 * math.log(_gauss(edges[i + 1]) + _AREA / edges[i + 1]))
    widths = edges.copy()
    widths[0] = _AREA / _gauss(_R)
    fractions = np.empty(_LAYERS)
    fractions[0] = _R * _gauss(_R) / _AREA
    fractions[1:] = edges[:-1] / edges[1:]
    # numpy compares the 52-bit position with the fraction rounded to 52 bits: so do we.
    fractions = np.round(fractions * 2.0**52) * 2.0**-52
    heights = np.array([_gauss(x) for x in edges])
    return widths, fractions, heights


_WIDTHS, _FRACTIONS, _HEIGHTS = _ziggurat_tables()
_HEIGHT_STEPS = np.concatenate([[0.0], _HEIGHTS[:-1] - _HEIGHTS[1:]])  # f(x_{i-1}) - f(x_i)
# Indexed by a word's low 9 bits (layer, then sign): one look-up gives the signed width.
_SIGNED_WIDTHS = np.concatenate([_WIDTHS, -_WIDTHS])
_FRACTIONS_9 = np.concatenate([_FRACTIONS, _FRACTIONS])


def _positions_in_layer(words: NDArray[np.uint64]) -> NDArray[np.float64]:
    """Bits 9-60 of each word as a float in [0, 1): exactly ``bits * 2**-52``."""
    bits = ((words >> np.uint64(9)) & _MASK52) | _ONE_BITS
    return bits.view(np.float64) - 1.0


def _first_try(words: NDArray[np.uint64]) -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
    """The signed ziggurat draw of each word and whether it is accepted at once."""
    low = (words & np.uint64(0x1FF)).view(np.int64)
    u = _positions_in_layer(words)
    return u * _SIGNED_WIDTHS[low], u < _FRACTIONS_9[low]


def _position_bits(u: NDArray[np.float64]) -> NDArray[np.uint64]:
    """Bits 9-60 of the words whose positions in the layer are ``u`` (exact: ``u * 2**52``)."""
    return (u * 2.0**52).astype(np.uint64) << np.uint64(9)


def _uniforms(words: NDArray[np.uint64]) -> NDArray[np.float64]:
    """numpy's ``next_double`` of a word: its top 53 bits, ``(w >> 11) * 2**-53`` in [0, 1)."""
    return (words >> np.uint64(11)).astype(np.float64) * 2.0**-53


@runtime_checkable
class GaussianSource(Protocol):
    """Draws i.i.d. N(0, std^2) noise, as float64."""

    @property
    def secure(self) -> bool:
        """True if the noise comes from a cryptographically secure source."""
        ...

    def normal(self, std: float, shape: tuple[int, ...]) -> NDArray[np.float64]: ...


def _check_std(std: float) -> float:
    # z C: with adaptive clipping, C is learnt from the data, so the message leaves it out.
    return real("the noise standard deviation", std, at_least=0, secret=True)


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
        summands = integer("summands", summands, at_least=1)
        key = secrets.token_bytes(_KEY_BYTES) if key is None else bytes(key)
        if len(key) != _KEY_BYTES:
            raise ParameterValueError(f"key must be {_KEY_BYTES} bytes, got {len(key)}")
        counter = bytes(_BLOCK_BYTES) if initial_counter is None else bytes(initial_counter)
        if len(counter) != _BLOCK_BYTES:
            raise ParameterValueError(
                f"initial_counter must be {_BLOCK_BYTES} bytes, got {len(counter)}"
            )
        self._encryptor = Cipher(algorithms.AES(key), modes.CTR(counter)).encryptor()
        retry_key = HKDF(
            algorithm=hashes.SHA256(), length=_KEY_BYTES, salt=None, info=_RETRY_INFO
        ).derive(key)
        # ECB on distinct counter blocks is CTR's keystream at positions we choose.
        self._retry_cipher = Cipher(algorithms.AES(retry_key), modes.ECB())  # noqa: S305
        self._summands = summands
        self._lock = threading.Lock()
        self._offset = 0  # bytes of the stream drawn so far
        self._zeros = bytes(0)

    @property
    def secure(self) -> bool:
        return True

    @property
    def summands(self) -> int:
        return self._summands

    def _zero_input(self, nbytes: int) -> memoryview:
        # Called under the lock; grows to the largest request and is reused.
        if len(self._zeros) < nbytes:
            self._zeros = bytes(nbytes)
        return memoryview(self._zeros)[:nbytes]

    def keystream(self, nbytes: int) -> bytes:
        """The next ``nbytes`` of the AES-CTR keystream (the encryption of zeros)."""
        nbytes = integer("nbytes", nbytes, at_least=0)
        with self._lock:
            self._offset += nbytes
            return self._encryptor.update(self._zero_input(nbytes))

    def words(self, n: int) -> NDArray[np.uint64]:
        """The next ``n`` little-endian 64-bit words of the keystream."""
        return np.frombuffer(self.keystream(8 * n), dtype="<u8").astype(np.uint64, copy=False)

    def _words_into(self, out: bytearray, n: int) -> int:
        """The next ``n`` words into ``out`` (``8 n + 15`` bytes); returns the first's offset."""
        with self._lock:
            start = self._offset
            self._offset += 8 * n
            self._encryptor.update_into(self._zero_input(8 * n), out)
        return start

    def retry_words(self, offsets: NDArray[np.uint64], attempt: int) -> NDArray[np.uint64]:
        """Retry block ``attempt`` of the words at these stream offsets: two words each."""
        blocks = np.empty((offsets.size, 2), dtype=">u8")
        blocks[:, 0] = offsets
        blocks[:, 1] = attempt
        stream = self._retry_cipher.encryptor().update(blocks.tobytes())
        return np.frombuffer(stream, dtype="<u8").astype(np.uint64).reshape(offsets.size, 2)

    def _retry(self, words: NDArray[np.uint64], offsets: NDArray[np.uint64]) -> NDArray[np.float64]:
        """The draws the fast path rejected, each finished from its own retry stream.

        It follows numpy's ``random_standard_normal`` step by step, reading the
        word's retry words in order: a wedge takes one uniform and, if it fails,
        the next word as a fresh draw; the tail takes two uniforms per try.
        """
        out = np.empty(words.size)
        word = words.copy()
        pending = np.arange(words.size)
        attempt = 0
        # A word needs ``a`` retries with probability below 0.5**a: the loop ends, and soon.
        while pending.size:
            w = word[pending]
            extra = self.retry_words(offsets[pending], attempt)
            u1 = _uniforms(extra[:, 0])
            layer = (w & np.uint64(0xFF)).astype(np.intp)
            done = np.zeros(pending.size, dtype=bool)
            # The tail beyond r (Marsaglia 1964): an exponential proposal, accepted or tried again.
            tail = np.flatnonzero(layer == 0)
            xx = -_INV_R * np.log1p(-u1[tail])
            yy = -np.log1p(-_uniforms(extra[tail, 1]))
            ok = yy + yy > xx * xx
            negative = ((w[tail] >> np.uint64(17)) & np.uint64(1)).astype(bool)  # rabs bit 8
            out[pending[tail[ok]]] = np.where(negative[ok], -(_R + xx[ok]), _R + xx[ok])
            done[tail[ok]] = True
            # A wedge: under the curve, or a fresh draw from the next retry word.
            wedge = np.flatnonzero(layer != 0)
            x, _ = _first_try(w[wedge])
            i = layer[wedge]
            below = _HEIGHT_STEPS[i] * u1[wedge] + _HEIGHTS[i] < np.exp(-0.5 * x * x)
            out[pending[wedge[below]]] = x[below]
            done[wedge[below]] = True
            again = wedge[~below]
            fresh = extra[again, 1]
            x, accepted = _first_try(fresh)
            out[pending[again[accepted]]] = x[accepted]
            done[again[accepted]] = True
            word[pending[again]] = fresh
            pending = pending[~done]
            attempt += 1
        return out

    def _draw(self, out: NDArray[np.float64], scale: float, summands: int) -> None:
        """``out[i] = scale * (sum of summands normals)``, added in summand order.

        In a block of ``b`` outputs, normal ``j`` of output ``i`` is the draw of
        the block's word ``j * b + i``. An output with a rejected draw is summed
        at the end, after one vectorized pass has finished every rejected draw.
        """
        n = out.size
        block = max(1, _BLOCK_WORDS // summands)  # outputs per block
        words_max = summands * min(block, n)
        raw = bytearray(8 * words_max + _BLOCK_BYTES - 1)
        words = np.frombuffer(raw, dtype="<u8", count=words_max).view(np.uint64)
        low = np.empty(words_max, dtype=np.uint64)
        table = np.empty(words_max)
        rejected_mask = np.empty(words_max, dtype=bool)
        u = words.view(np.float64)  # the words become their positions in the layer, in place
        low_index = low.view(np.int64)
        slots = np.arange(summands)[:, None]
        # Outputs with a rejected draw: index, all their draws, which were rejected, words, offsets.
        late: list[
            tuple[
                NDArray[np.intp],
                NDArray[np.float64],
                NDArray[np.bool_],
                NDArray[np.uint64],
                NDArray[np.uint64],
            ]
        ] = []
        for start in range(0, n, block):
            b = min(block, n - start)
            k = summands * b
            first = self._words_into(raw, k)
            w, lo, li, uu, t, rej = (
                words[:k],
                low[:k],
                low_index[:k],
                u[:k],
                table[:k],
                rejected_mask[:k],
            )
            # The fast path, in place: u = bits 9-60 as [0, 1), accepted if u < fraction[layer].
            np.bitwise_and(w, np.uint64(0x1FF), out=lo)
            np.right_shift(w, np.uint64(9), out=w)
            np.bitwise_and(w, _MASK52, out=w)
            np.bitwise_or(w, _ONE_BITS, out=w)
            np.subtract(uu, 1.0, out=uu)
            np.take(_FRACTIONS_9, li, out=t, mode="clip")
            np.greater_equal(uu, t, out=rej)
            np.take(_SIGNED_WIDTHS, li, out=t, mode="clip")
            np.multiply(uu, t, out=t)
            columns = np.flatnonzero(rej.reshape(summands, b).any(axis=0))
            if columns.size:
                # Every draw of those outputs, slot by slot (flat 1-D takes are the fast kind).
                flat = (slots * b + columns).ravel()
                shape = (summands, columns.size)
                late.append(
                    (
                        columns + start,
                        t.take(flat).reshape(shape),
                        rej.take(flat).reshape(shape),
                        # The word again (bits 61-63 are never read): layer, sign, position.
                        (lo.take(flat) | _position_bits(uu.take(flat))).reshape(shape),
                        (first + 8 * flat.astype(np.uint64)).reshape(shape),
                    )
                )
            chunk = out[start : start + b]
            if summands == 1:
                np.multiply(t, scale, out=chunk)
                continue
            np.add(t[:b], t[b : 2 * b], out=chunk)
            for j in range(2, summands):
                np.add(chunk, t[j * b : (j + 1) * b], out=chunk)
            chunk *= scale
        if not late:
            return
        # Every rejected draw at once, then the sums of the outputs that held one, in order.
        outputs, terms, flags, late_words, offsets = (
            np.concatenate(part, axis=-1) for part in zip(*late, strict=True)
        )
        terms[flags] = self._retry(late_words[flags], offsets[flags])
        total = terms[0].copy()
        for j in range(1, summands):
            total += terms[j]
        total *= scale
        out[outputs] = total

    def standard_normal(self, n: int) -> NDArray[np.float64]:
        """``n`` standard normals, one ziggurat draw per keystream word (no summing)."""
        out = np.empty(n)
        if n:
            self._draw(out, 1.0, 1)
        return out

    def normal(self, std: float, shape: tuple[int, ...]) -> NDArray[np.float64]:
        """N(0, std^2) noise of ``shape``: each value sums ``summands`` independent normals."""
        std = _check_std(std)
        size = math.prod(shape)
        out = np.empty(size, dtype=np.float64)
        if size:
            self._draw(out, std / math.sqrt(self._summands), self._summands)
        return out.reshape(shape)


class GeneratorGaussian:
    """Noise from a caller's ``numpy.random.Generator``: reproducible, *not* secure.

    ``normal(std, shape)`` is exactly ``rng.normal(0.0, std, size=shape)``, so a
    test can reproduce every draw from the same seed. Draws are serialized, as
    numpy generators are not thread-safe.
    """

    def __init__(self, rng: np.random.Generator) -> None:
        self._rng = instance("rng", rng, np.random.Generator)
        self._lock = threading.Lock()

    @property
    def secure(self) -> bool:
        return False

    def normal(self, std: float, shape: tuple[int, ...]) -> NDArray[np.float64]:
        std = _check_std(std)
        with self._lock:
            return np.asarray(self._rng.normal(0.0, std, size=shape), dtype=np.float64)

    def words(self, n: int) -> NDArray[np.uint64]:
        """``n`` uniform 64-bit words from the generator (for the discrete samplers' tests)."""
        n = integer("n", n, at_least=0)
        with self._lock:
            return self._rng.integers(0, 1 << 64, size=n, dtype=np.uint64)

    # A copy carries the generator's state (a test replays it); a lock cannot be pickled.
    def __getstate__(self) -> np.random.Generator:
        return self._rng

    def __setstate__(self, rng: np.random.Generator) -> None:
        self._rng = rng
        self._lock = threading.Lock()


class LazySecureGaussian:
    """The secure source (:class:`AesCtrGaussian`, default settings), built on the first draw.

    It pickles as a new, unused source: the key never leaves the process, and a
    copy draws under a fresh key of its own.
    """

    __slots__ = ("_source",)

    def __init__(self) -> None:
        self._source: AesCtrGaussian | None = None

    @property
    def secure(self) -> bool:
        return True

    def _secure(self) -> AesCtrGaussian:
        source = self._source
        if source is None:
            # Two threads racing here each get a fresh secure source: both are as good.
            source = self._source = AesCtrGaussian()
        return source

    def normal(self, std: float, shape: tuple[int, ...]) -> NDArray[np.float64]:
        return self._secure().normal(std, shape)

    def words(self, n: int) -> NDArray[np.uint64]:
        """The next ``n`` keystream words (:meth:`AesCtrGaussian.words`)."""
        return self._secure().words(n)

    def __reduce__(self) -> tuple[type[LazySecureGaussian], tuple[()]]:
        return (LazySecureGaussian, ())


def gaussian_source(rng: np.random.Generator | None, *, owner: str) -> GaussianSource:
    """The secure source when ``rng`` is None; else ``rng``, with a warning naming ``owner``."""
    return AesCtrGaussian() if rng is None else _seeded(rng, owner)


def lazy_gaussian_source(rng: np.random.Generator | None, *, owner: str) -> GaussianSource:
    """As :func:`gaussian_source`, with the secure source built on first use (see the module)."""
    return LazySecureGaussian() if rng is None else _seeded(rng, owner)


def _seeded(rng: np.random.Generator, owner: str) -> GeneratorGaussian:
    source = GeneratorGaussian(rng)  # refuses anything but a Generator before warning
    warnings.warn(
        f"{owner}: noise drawn from the numpy Generator you passed is not cryptographically "
        "secure; use rng= for tests and reproducible experiments only",
        InsecureRandomnessWarning,
        stacklevel=4,  # the code that built the mod (or called gaussian_source)
    )
    return source
