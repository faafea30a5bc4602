"""Exact discrete Gaussian and Skellam noise, from the secure keystream, in integer arithmetic.

Distributed DP adds its noise on SecAgg+'s integer grid, so the noise must be
an integer, and its privacy analysis (Canonne, Kamath and Steinke, NeurIPS
2020, for the discrete Gaussian; Agarwal, Kairouz and Liu, NeurIPS 2021, for
Skellam) holds for the exact distribution. A sampler that rounds a float
normal, or computes its probabilities in floating point, samples something
else, and floating-point samplers leak the value they protect through the
floats they can return (Mironov, CCS 2012). These samplers use no floating
point at all: every step is integer arithmetic on the keystream's words.

Both samplers invert a uniform ``U`` in [0, 1) whose binary digits are the
keystream's words, read lazily, as Knuth and Yao (1976) sample exactly from
random bits: the output is the ``k`` with ``F(k - 1) <= U < F(k)``, ``F`` the
distribution function. Its probabilities are irrational, so they are held as
certified enclosures:

1. **Weights.** ``w(k)``, proportional to the probability of ``k``, is
   enclosed between two fixed-point integers, every product and quotient
   rounded outwards (down for the lower bound, up for the upper one). For the
   discrete Gaussian ``w(k) = exp(-k^2 / (2 sigma^2))`` comes from
   ``w(k + 1) = w(k) exp(-(2k + 1) / (2 sigma^2))`` and an enclosure of
   ``exp(-1 / (2 sigma^2))`` by its alternating Taylor series; for Poisson
   ``w(k + 1) = w(k) mu / (k + 1)``, rational. A geometric series bounds
   the mass beyond a window wide enough for that mass to blur no cell edge at
   the precision in use (about 10.6 standard deviations each side at 64 bits).
2. **Distribution function.** ``F(k)`` is enclosed from those sums, and
   rounded outwards to 64 bits: two ``uint64`` per ``k``, cached per parameter.
3. **Fast path.** One word ``u`` puts ``U`` in ``[u, u + 1) / 2**64``. When the
   enclosures show that interval inside one cell ``[F(k - 1), F(k))``, the
   output is ``k``. For most words one look-up decides: the word's top bits
   name a bucket of words, and a bucket that lies inside one cell (its
   enclosures included) has its ``k`` stored. The others (about 5% of the
   words) go through a guide table indexed by the same bits, a step or two
   forward, and a compare per output.
4. **Slow path.** Otherwise (``u`` within an enclosure's width of a cell's
   edge, or in a tail beyond the window: below 1e-12 per word) the sampler
   reads 64 more bits of ``U`` and recomputes the enclosures with 64 more bits
   of precision and a window wide enough for them (twice as wide again if ``U``
   may lie beyond it), until the interval fits in one cell: each round fails
   again with probability about ``2**-60``, so it ends with probability 1.

No step ever picks an output that exact inversion of ``U`` would not, so each
output has exactly the claimed distribution, given uniform keystream words
(the security of AES-256-CTR, :mod:`.noise`). Skellam(mu, mu) is
Poisson(mu) - Poisson(mu), two inversions from two words; a mean above
``_MAX_MU`` is split into equal parts whose Skellam draws are summed (Poisson
is additive, so the sum is exact too).

Costs and limits. Building a table takes about ``21 sigma`` (the discrete
Gaussian) or ``21 sqrt(mu)`` (Poisson) steps of Python integer arithmetic
(about 0.3 s at sigma = 10,000), and is cached for the last few parameters; a
slow-path draw rebuilds it at higher precision (about a second at sigma =
10,000, once in about 1e13 draws). ``bench/dp.py --parts discrete`` measures
the draws and the builds against numpy. ``sigma_squared`` is capped at
``2**34`` (sigma = 131,072: a table of 2.8 million entries, built in about
6 s). The samplers are
not constant time: the table look-ups' cache footprint and the rare slow path
depend on the values drawn, like every sampler in this package; they assume an
attacker who cannot time the process's memory accesses.
"""

from __future__ import annotations

import bisect
import functools
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from itertools import accumulate
from typing import Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray

from flowerpets._validation import instance, integer, rational
from flowerpets.dp._primitives.noise import AesCtrGaussian

__all__ = ["RandomWords", "sample_discrete_gaussian", "sample_skellam"]

_WORD_BITS = 64
_TAIL_MARGIN = 16  # the mass beyond a window is below 2**-(bits + 16) of the output's bits
_MAX_SIGMA_SQUARED = 1 << 34  # sigma <= 131072: a table of 2.8 million entries
_MAX_MU = 1 << 33  # a Poisson table of 2 million entries; a larger mean is split
_MAX_SKELLAM_MU = 1 << 40  # at most 128 parts, 256 words a draw
_CACHED_TABLES = 8
_BLOCK = 1 << 16  # words per block of the fast path
_GUIDE_BITS = 20  # at most 2**20 buckets of the words' top bits
# 4 to 8 buckets per cell, and int32 entries (every table is far below 2**31 entries):
# a guide that stays in the cache outruns a finer one that does not (3x at 25,000 cells).
_GUIDE_SPARE_BITS = 2
_GUIDE_STEPS = 8  # a bucket with more cells than this is searched by bisection


@runtime_checkable
class RandomWords(Protocol):
    """A source of uniform 64-bit words: :class:`~.noise.AesCtrGaussian` is the secure one."""

    @property
    def secure(self) -> bool: ...

    def words(self, n: int) -> NDArray[np.uint64]: ...


@dataclass(frozen=True)
class _Weights:
    """Enclosures of ``w(k) 2**p`` for ``k = first, first + 1, ...``, and of the two tails' sums."""

    first: int
    low: list[int]
    high: list[int]
    left_tail: int  # an upper bound of the sum of w(k) 2**p over k < first
    right_tail: int  # ... over k beyond the window


@dataclass(frozen=True)
class _Table:
    """``F(first - 1 + i)`` enclosed in ``[low[i], high[i]] / 2**64`` (the fast path's table).

    ``guide[h]`` is the first ``i`` with ``low[i]`` above ``h 2**(64 - guide_bits)``: a
    word's top bits narrow its search to a few entries. ``answer[h]`` is the ``i`` that
    decides every word of bucket ``h`` (the whole bucket lies inside one cell, its
    enclosures included), or -1: most words need nothing but that look-up.
    """

    first: int
    low: NDArray[np.uint64]
    high: NDArray[np.uint64]
    guide: NDArray[np.int32]
    guide_bits: int
    answer: NDArray[np.int32]

    def search(self, u: NDArray[np.uint64]) -> NDArray[np.intp]:
        """``searchsorted(low, u, side="right")``: from the guide, then a few steps forward."""
        h = u >> np.uint64(_WORD_BITS - self.guide_bits)
        i: NDArray[np.intp] = self.guide[h].astype(np.intp)
        end = self.guide[h + np.uint64(1)].astype(np.intp)  # the answer lies in [i, end]
        wide = np.flatnonzero(end - i > _GUIDE_STEPS)  # a bucket in a tail, full of tiny cells
        i[wide] = np.searchsorted(self.low, u[wide], side="right")
        end[wide] = i[wide]
        todo = np.flatnonzero(i < end)
        while todo.size:
            todo = todo[self.low[i[todo]] <= u[todo]]
            i[todo] += 1
            todo = todo[i[todo] < end[todo]]
        return i


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _ceil_shift(a: int, p: int) -> int:
    return -((-a) >> p)


def _precision(bits: int, entries: int) -> int:
    # Each recurrence step can add an ulp of error, and a sum adds them up: 3 bits per bit of
    # the window's length keep the enclosures well inside one ulp of the output's `bits`.
    return bits + _WORD_BITS + 3 * entries.bit_length()


def _reach(variance: Fraction, bits: int) -> int:
    """How far from the centre a window must reach for ``bits`` bits of output.

    The tail bounds then hold less than ``2**-(bits + _TAIL_MARGIN)`` of the mass, so
    they blur no cell edge by more than that: with ``L = ln(2) (bits + margin) <
    0.7 (bits + margin)`` nats, the normal's ``exp(-d^2 / (2 var))`` needs ``d =
    sqrt(2 L var)``, and Poisson's Chernoff bound ``exp(-d^2 / (2 (mu + d / 3)))``
    needs ``2 L / 3`` more (the second term).
    """
    nats = Fraction(7, 10) * (bits + _TAIL_MARGIN)
    return math.isqrt(math.ceil(2 * nats * variance)) + math.ceil(2 * nats / 3) + 2


def _exp_neg(x: Fraction, p: int) -> tuple[int, int]:
    """``(lo, hi)`` with ``lo <= exp(-x) 2**p <= hi``, for a rational ``x > 0``.

    ``exp(-x) = exp(-y)**(2**r)`` with ``y = x / 2**r <= 1/2``; ``exp(-y)`` is the
    alternating Taylor series, whose terms decrease, so its remainder is below
    the next term; ``r`` squarings follow, each rounded outwards.
    """
    r = 0
    while x > Fraction(1, 2) * (1 << r):
        r += 1
    guard = p + r + 16  # squaring doubles the relative error: r bits, and some to spare
    y = x / (1 << r)
    num, den = y.numerator, y.denominator
    one = 1 << guard
    s_lo = s_hi = t_lo = t_hi = one  # the partial sum and the term y**n / n!, both enclosed
    n = 0
    while t_hi > 1:
        n += 1
        t_lo = t_lo * num // (den * n)
        t_hi = _ceil_div(t_hi * num, den * n)
        if n % 2:
            s_lo, s_hi = s_lo - t_hi, s_hi - t_lo
        else:
            s_lo, s_hi = s_lo + t_lo, s_hi + t_hi
    # The remainder is at most the next term, itself below the last one (y / (n + 1) < 1).
    lo, hi = max(0, s_lo - t_hi), s_hi + t_hi
    for _ in range(r):
        lo, hi = (lo * lo) >> guard, _ceil_shift(hi * hi, guard)
    return lo >> (guard - p), _ceil_shift(hi, guard - p)


def _gaussian_weights(sigma_squared: Fraction, spread: int, bits: int) -> _Weights:
    """``w(k) = exp(-k^2 / (2 sigma^2))`` for ``|k| <= half``, with the ratio of neighbours
    ``g(k) = w(k + 1) / w(k) = f**(2k + 1)``, ``f = exp(-1 / (2 sigma^2))``."""
    half = spread * _reach(sigma_squared, bits)
    p = _precision(bits, 2 * half + 1)
    one = 1 << p
    f_lo, f_hi = _exp_neg(1 / (2 * sigma_squared), p)
    ff_lo, ff_hi = (f_lo * f_lo) >> p, _ceil_shift(f_hi * f_hi, p)
    w_lo = w_hi = one
    g_lo, g_hi = f_lo, f_hi
    low, high = [one], [one]
    for _ in range(half):
        w_lo, w_hi = (w_lo * g_lo) >> p, _ceil_shift(w_hi * g_hi, p)
        low.append(w_lo)
        high.append(w_hi)
        g_lo, g_hi = (g_lo * ff_lo) >> p, _ceil_shift(g_hi * ff_hi, p)
    if g_hi >= one:  # too little precision to see the ratio below 1 here: look further out
        return _gaussian_weights(sigma_squared, 2 * spread, bits)
    # Beyond the window each ratio is at most g(half) < 1: the tail is below w(half) g / (1 - g).
    tail = _ceil_div(w_hi * g_hi, one - g_hi)
    return _Weights(-half, low[:0:-1] + low, high[:0:-1] + high, tail, tail)


def _poisson_weights(mu: Fraction, spread: int, bits: int) -> _Weights:
    """``w(k) = mu**k / k!`` over ``w(mode)``, from ``w(k + 1) = w(k) mu / (k + 1)``."""
    a, b = mu.numerator, mu.denominator
    mode = a // b
    reach = spread * _reach(mu, bits)
    first, last = max(0, mode - reach), mode + reach
    p = _precision(bits, last - first + 1)
    one = 1 << p
    up_lo, up_hi = [one], [one]
    w_lo = w_hi = one
    for k in range(mode + 1, last + 1):
        w_lo, w_hi = w_lo * a // (b * k), _ceil_div(w_hi * a, b * k)
        up_lo.append(w_lo)
        up_hi.append(w_hi)
    # Past the window the ratios mu / (k + 1) fall below mu / (last + 1) < 1.
    right = _ceil_div(w_hi * a, b * (last + 1) - a)
    down_lo: list[int] = []
    down_hi: list[int] = []
    w_lo = w_hi = one
    for k in range(mode, first, -1):  # w(k - 1) = w(k) k / mu
        w_lo, w_hi = w_lo * b * k // a, _ceil_div(w_hi * b * k, a)
        down_lo.append(w_lo)
        down_hi.append(w_hi)
    # Below the window the ratios k / mu fall below first / mu < 1 (none if first is 0).
    left = _ceil_div(w_hi * b * first, a - b * first)
    return _Weights(first, down_lo[::-1] + up_lo, down_hi[::-1] + up_hi, left, right)


_Family = Callable[[Fraction, int, int], _Weights]
_FAMILIES: dict[str, _Family] = {"gaussian": _gaussian_weights, "poisson": _poisson_weights}


def _cdf_bounds(weights: _Weights, bits: int) -> tuple[list[int], list[int]]:
    """``F(first - 1 + i) 2**bits`` enclosed, for ``i = 0 .. len(weights.low)``.

    ``F(k) = (mass below the window + w(first) + ... + w(k)) / Z``, with ``Z``
    between the window's lower sum and its upper sum plus both tails' bounds.
    """
    z_lo = sum(weights.low)
    z_hi = sum(weights.high) + weights.left_tail + weights.right_tail
    lower = [0]
    lower.extend((c << bits) // z_hi for c in accumulate(weights.low))
    upper = [
        _ceil_div(c << bits, z_lo) for c in accumulate(weights.high, initial=weights.left_tail)
    ]
    return lower, upper


@functools.lru_cache(maxsize=_CACHED_TABLES)
def _table(family: str, parameter: Fraction) -> _Table:
    weights = _FAMILIES[family](parameter, 1, _WORD_BITS)
    lower, upper = _cdf_bounds(weights, _WORD_BITS)
    top = (1 << _WORD_BITS) - 1
    # Capping an upper bound at 2**64 - 1 decides nothing wrongly: a cell that ends there has
    # no word u with u + 1 <= its lower edge's bound.
    low = np.array([min(v, top) for v in lower], dtype=np.uint64)
    bits = min(_GUIDE_BITS, low.size.bit_length() + _GUIDE_SPARE_BITS)  # narrower than most cells
    starts = np.arange((1 << bits) + 1, dtype=np.uint64) << np.uint64(_WORD_BITS - bits)
    guide = np.searchsorted(low, starts, side="right").astype(np.int32)
    guide[-1] = low.size  # the last bucket's end: 2**64, above every word
    high = np.array([min(v, top) for v in upper], dtype=np.uint64)
    return _Table(
        first=weights.first,
        low=low,
        high=high,
        guide=guide,
        guide_bits=bits,
        answer=_answers(low, high, guide, bits),
    )


def _answers(
    low: NDArray[np.uint64], high: NDArray[np.uint64], guide: NDArray[np.int32], bits: int
) -> NDArray[np.int32]:
    """Per bucket ``[s, s + w)`` of the words' top ``bits``: the ``i`` its every word decides on.

    Bucket ``h`` starts in cell ``i = guide[h]`` (``low[i - 1] <= s < low[i]``). If
    ``high[i - 1] <= s`` and ``s + w <= low[i]``, every word ``u`` of the bucket has
    ``high[i - 1] <= u`` and ``u + 1 <= low[i]``: the fast path's own test passes, for
    the same ``i``. Otherwise -1 (the word is searched and tested on its own).
    """
    width = np.uint64(1 << (_WORD_BITS - bits))
    starts = np.arange(1 << bits, dtype=np.uint64) << np.uint64(_WORD_BITS - bits)
    i = guide[:-1].astype(np.intp)
    inside = (i > 0) & (i < low.size)
    j = np.where(inside, i, 1)  # any valid index where the bucket is not inside
    # low[j] > s where inside, so the difference does not wrap; s + w may be 2**64.
    inside &= (high[j - 1] <= starts) & (low[j] - starts >= width)
    return np.where(inside, i, -1).astype(np.int32)


def _refine(family: str, parameter: Fraction, word: int, source: RandomWords) -> int:
    """The exact inversion of ``U`` when its first word did not decide: 64 more bits at a time."""
    u, bits, spread = word, _WORD_BITS, 1
    while True:
        u = (u << _WORD_BITS) | int(source.words(1)[0])
        bits += _WORD_BITS
        weights = _FAMILIES[family](parameter, spread, bits)
        lower, upper = _cdf_bounds(weights, bits)
        i = bisect.bisect_right(lower, u)  # the first edge certainly above U's interval
        if 0 < i < len(lower) and upper[i - 1] <= u:
            return weights.first - 1 + i
        if u < upper[0] or u + 1 > lower[-1]:  # U may lie beyond the window
            spread *= 2


def _cells(table: _Table, u: NDArray[np.uint64]) -> tuple[NDArray[np.int32], NDArray[np.intp]]:
    """The fast path on the words ``u``: each one's cell ``i`` (output ``first - 1 + i``), and
    where it did not decide (those cells hold 0; the slow path gives their outputs).

    The bucket look-up (:attr:`_Table.answer`) decides most words at once; the rest are
    searched (:meth:`_Table.search`) and tested one by one, ``high[i - 1] <= u < low[i]``.
    """
    top = u >> np.uint64(_WORD_BITS - table.guide_bits)
    # Below 2**21: the same values as int64, so no index cast; take() outruns fancy indexing.
    cells = np.take(table.answer, top.view(np.int64))
    missed = np.flatnonzero(cells < 0)
    if not missed.size:
        return cells, missed
    w = u[missed]
    i = table.search(w)
    below = table.high[np.maximum(i, 1) - 1]
    decided = (i > 0) & (i < table.low.size) & (below <= w)
    cells[missed] = np.where(decided, i, 0)
    return cells, missed[~decided]


_Blocks = Iterable[tuple[int, NDArray[np.uint64]]]  # (offset of the first word, words)
_Undecided = list[tuple[NDArray[np.intp], NDArray[np.uint64]]]  # (offsets, their words)


def _slices(words: NDArray[np.uint64]) -> _Blocks:
    return ((start, words[start : start + _BLOCK]) for start in range(0, words.size, _BLOCK))


def _drawn(source: RandomWords, count: int) -> _Blocks:
    """The source's next ``count`` words, a block at a time (the same words, in the same
    order, as one call; a block's words are used while they are in the cache)."""
    return ((start, source.words(min(_BLOCK, count - start))) for start in range(0, count, _BLOCK))


def _undecided(found: _Undecided) -> Iterator[tuple[int, int]]:
    """Each undecided word's offset and value, in the order found."""
    for offsets, words in found:
        yield from zip(offsets.tolist(), words.tolist(), strict=True)


def _inverted(
    family: str, parameter: Fraction, count: int, blocks: _Blocks, source: RandomWords
) -> NDArray[np.int64]:
    """One output per word: the fast path for all, then the slow path where it did not decide."""
    table = _table(family, parameter)
    out = np.empty(count, dtype=np.int64)
    offset = np.int64(table.first - 1)
    found: _Undecided = []
    for start, u in blocks:  # blocks: the temporaries stay in the cache
        cells, missed = _cells(table, u)
        np.add(cells, offset, out=out[start : start + u.size])
        found.append((missed + start, u[missed]))
    for j, word in _undecided(found):  # after the fast path: the stream's order is kept
        out[j] = _refine(family, parameter, word, source)
    return out


def _invert(
    family: str, parameter: Fraction, words: NDArray[np.uint64], source: RandomWords
) -> NDArray[np.int64]:
    """One output per word of ``words``; the slow path reads more from ``source``."""
    return _inverted(family, parameter, words.size, _slices(words), source)


def _skellam_into(
    out: NDArray[np.int64], mu: Fraction, pairs: _Blocks, source: RandomWords
) -> None:
    """``out += P - Q``, ``P`` and ``Q`` Poisson(mu) from the even and the odd words of ``pairs``.

    One pass over the pairs: both inversions' ``first - 1`` cancel in the difference. The
    slow path then reads its words in the order two :func:`_invert` calls would: every
    undecided ``P`` in turn, then every undecided ``Q``.
    """
    table = _table("poisson", mu)
    offset = table.first - 1
    found: tuple[_Undecided, _Undecided] = ([], [])
    for start, u in pairs:  # start is even: a block holds whole pairs
        cells, missed = _cells(table, u)
        part = out[start // 2 : (start + u.size) // 2]
        part += cells[0::2]
        part -= cells[1::2]
        for column, undecided in enumerate(found):
            mine = missed[missed % 2 == column]
            undecided.append(((mine + start) // 2, u[mine]))
    for sign, undecided in zip((1, -1), found, strict=True):
        for j, word in _undecided(undecided):
            out[j] += sign * (_refine("poisson", mu, word, source) - offset)


def _source(source: RandomWords | None) -> RandomWords:
    if source is None:
        return AesCtrGaussian()  # a fresh key per call: no stream is shared with another process
    return instance("source", source, RandomWords)


def sample_discrete_gaussian(
    sigma_squared: Fraction | int, size: int, *, source: RandomWords | None = None
) -> NDArray[np.int64]:
    """``size`` independent draws of the discrete Gaussian N_Z(0, sigma^2), exactly.

    ``P(X = k)`` is proportional to ``exp(-k^2 / (2 sigma^2))`` over the
    integers (Canonne, Kamath and Steinke, NeurIPS 2020); its variance is just
    below ``sigma^2`` (within ``1e-8`` of it for ``sigma >= 1``). Each draw reads
    one 64-bit word of ``source`` (and, below once in 1e12 draws, a few more):
    see the module docstring for why the output is exact.

    ``sigma_squared`` is an ``int`` or a :class:`fractions.Fraction` (a float is
    refused: pass ``Fraction(x)`` for its exact binary value), ``0 <
    sigma_squared <= 2**34``. ``source`` defaults to a fresh
    :class:`~.noise.AesCtrGaussian`; pass a seeded one (``key=``) for tests.
    """
    variance = rational("sigma_squared", sigma_squared, above=0, at_most=_MAX_SIGMA_SQUARED)
    size = integer("size", size, at_least=0)
    words = _source(source)
    return _inverted("gaussian", variance, size, _drawn(words, size), words)


def sample_skellam(
    mu: Fraction | int, size: int, *, source: RandomWords | None = None
) -> NDArray[np.int64]:
    """``size`` independent draws of Skellam(mu, mu) = Poisson(mu) - Poisson(mu), exactly.

    Its variance is ``2 mu``. Each draw reads two words of ``source`` (one per
    Poisson, see the module docstring); a mean above ``2**33`` is split into
    ``parts = ceil(mu / 2**33)`` equal parts, each drawn so and summed, which is
    exact as well (a sum of independent Skellams is Skellam) and reads
    ``2 parts`` words per draw.

    ``mu`` is an ``int`` or a :class:`fractions.Fraction` (a float is refused),
    ``0 < mu <= 2**40``. ``source`` defaults to a fresh :class:`~.noise.AesCtrGaussian`;
    pass a seeded one (``key=``) for tests.
    """
    mean = rational("mu", mu, above=0, at_most=_MAX_SKELLAM_MU)
    size = integer("size", size, at_least=0)
    words = _source(source)
    parts = -(-mean // _MAX_MU)
    part = mean / parts
    out = np.zeros(size, dtype=np.int64)
    for _ in range(parts):
        # Word pairs, two independent Poissons from the same table.
        _skellam_into(out, part, _drawn(words, 2 * size), words)
    return out
