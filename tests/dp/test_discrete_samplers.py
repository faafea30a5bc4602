"""The exact discrete samplers: exact inversion checked word by word, then the statistics.

The exactness tests compute the distribution functions independently (mpmath at
300 bits) and check that every output is the cell of the uniform its words
spell, including words placed on the table's edges (the slow path) and in the
tails beyond the window. The statistical tests draw from fixed keys, so they are
deterministic and cannot flake; each threshold (p >= 1e-6, 6 standard errors)
would fail a correct sampler under a random key with probability below 1e-5.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterable
from fractions import Fraction
from typing import Any

import mpmath
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray
from scipy import special, stats

from flowerpets.dp._primitives import discrete
from flowerpets.dp._primitives.discrete import (
    RandomWords,
    sample_discrete_gaussian,
    sample_skellam,
)
from flowerpets.dp._primitives.noise import AesCtrGaussian, GeneratorGaussian, LazySecureGaussian
from flowerpets.exceptions import ParameterTypeError, ParameterValueError

TOP = (1 << 64) - 1
P_MIN = 1e-6


def keyed(seed: int) -> AesCtrGaussian:
    return AesCtrGaussian(key=bytes((seed + i) % 256 for i in range(32)))


class Scripted:
    """Words we choose first, then a seeded generator's; it records every word it gave."""

    secure = False

    def __init__(self, first: Iterable[int] = (), seed: int = 0, *, mirror: bool = False) -> None:
        self.queue = [int(w) for w in first]
        self.rng = np.random.default_rng(seed)
        self.mirror = mirror  # every word w as 2**64 - 1 - w: the uniform U as 1 - U
        self.given: list[int] = []

    def fresh(self) -> int:
        return int(self.rng.integers(0, TOP, endpoint=True, dtype=np.uint64))

    def words(self, n: int) -> NDArray[np.uint64]:
        out = [self.queue.pop(0) if self.queue else self.fresh() for _ in range(n)]
        if self.mirror:
            out = [TOP - w for w in out]
        self.given += out
        return np.array(out, dtype=np.uint64)


# -- the exact distribution functions, independently (mpmath) -------------------------------------
mpmath.mp.prec = 300


def gaussian_cdf(sigma_squared: Fraction) -> Callable[[int], mpmath.mpf]:
    reach = int(40 * float(sigma_squared) ** 0.5) + 40  # the mass beyond is below 2**-1000
    s = mpmath.mpf(sigma_squared.numerator) / sigma_squared.denominator
    weights = [mpmath.exp(-(mpmath.mpf(k) ** 2) / (2 * s)) for k in range(-reach, reach + 1)]
    cumulative = list(mpmath.mpf(0) + x for x in np.cumsum(np.array(weights, dtype=object)))
    total = cumulative[-1]

    def cdf(k: int) -> mpmath.mpf:
        if k < -reach:
            return mpmath.mpf(0)
        return cumulative[min(k + reach, 2 * reach)] / total

    return cdf


def poisson_cdf(mu: Fraction) -> Callable[[int], mpmath.mpf]:
    m = mpmath.mpf(mu.numerator) / mu.denominator
    last = int(float(mu) + 40 * float(mu) ** 0.5) + 200
    terms = [mpmath.mpf(1)]
    for k in range(1, last + 1):
        terms.append(terms[-1] * m / k)
    cumulative = np.cumsum(np.array(terms, dtype=object)) * mpmath.exp(-m)

    def cdf(k: int) -> mpmath.mpf:
        return mpmath.mpf(0) if k < 0 else cumulative[min(k, last)]

    return cdf


def assert_cell(cdf: Callable[[int], mpmath.mpf], k: int, words: list[int]) -> None:
    """The words spell U in [v, v + 1) / 2**(64 n): that interval lies inside k's cell."""
    v = 0
    for w in words:
        v = (v << 64) | w
    scale = mpmath.mpf(2) ** (64 * len(words))
    assert cdf(k - 1) <= v / scale, (k, words)
    assert (v + 1) / scale <= cdf(k), (k, words)


def edge_words(table: discrete._Table, rng: np.random.Generator, count: int) -> list[int]:
    """Words on and around the table's edges, where the fast path cannot decide."""
    picks = rng.choice(table.low.size, size=min(count, table.low.size), replace=False)
    out = []
    for i in picks.tolist():
        for w in (int(table.low[i]), int(table.high[i])):
            out += [max(0, w - 1), w, min(TOP, w + 1)]
    return out


def words_at(
    cdf: Callable[[int], mpmath.mpf], ks: Iterable[int], count: int = 4
) -> list[list[int]]:
    """The first ``count`` words of each ``F(k)``'s binary digits: ``U`` within 2**-256 of an
    edge, finer than the window's tails at 64 bits (a slow path that never widens never ends)."""
    out = []
    for k in ks:
        v = int(mpmath.floor(cdf(k) * mpmath.mpf(2) ** (64 * count)))
        out.append([(v >> (64 * (count - 1 - j))) & TOP for j in range(count)])
    return out


def slow_paths(
    cdf: Callable[[int], mpmath.mpf],
    firsts: list[list[int]],
    draw: Callable[[Scripted], NDArray[np.int64]],
) -> int:
    """Each draw from words starting with ``first`` is the exact cell: how many read more."""
    slow = 0
    for seed, first in enumerate(firsts):
        source = Scripted(first, seed)
        (k,) = draw(source).tolist()
        assert_cell(cdf, k, source.given)
        slow += len(source.given) > 1
    return slow


GAUSSIAN_CASES = [Fraction(7, 3), Fraction(2000, 3)]
POISSON_CASES = [Fraction(5, 2), Fraction(400)]


def words_to_try(
    family: str, parameter: Fraction, cdf: Callable[[int], mpmath.mpf], seed: int
) -> list[list[int]]:
    """Random first words, words on and around the table's edges, and the far tails (the slow
    path must widen the window for those)."""
    rng = np.random.default_rng(seed)
    table = discrete._table(family, parameter)
    firsts = [[w] for w in rng.integers(0, TOP, size=400, endpoint=True, dtype=np.uint64).tolist()]
    firsts += [[w] for w in edge_words(table, rng, 12)]
    return [*firsts, [0], [TOP], [0, 0], [TOP, TOP], [0, 0, 0, 5], [TOP, TOP, TOP]]


@pytest.mark.parametrize("sigma_squared", GAUSSIAN_CASES)
def test_every_gaussian_output_is_the_exact_cell_of_its_words(sigma_squared: Fraction) -> None:
    cdf = gaussian_cdf(sigma_squared)
    firsts = words_to_try("gaussian", sigma_squared, cdf, 1)
    firsts += words_at(cdf, [-3, 0, 2, int(3 * float(sigma_squared) ** 0.5), 12])
    draw = lambda source: sample_discrete_gaussian(sigma_squared, 1, source=source)  # noqa: E731
    assert slow_paths(cdf, firsts, draw) >= 10  # the edges and tails went through the slow path


@pytest.mark.parametrize("mu", POISSON_CASES)
def test_every_poisson_output_is_the_exact_cell_of_its_words(mu: Fraction) -> None:
    cdf = poisson_cdf(mu)
    firsts = words_to_try("poisson", mu, cdf, 2)
    firsts += words_at(cdf, [0, 1, int(float(mu)), int(float(mu) + 4 * float(mu) ** 0.5)])
    draw = lambda source: discrete._invert("poisson", mu, source.words(1), source)  # noqa: E731
    assert slow_paths(cdf, firsts, draw) >= 10


def test_skellam_is_the_difference_of_two_poisson_inversions() -> None:
    mu = Fraction(400)
    words = Scripted(seed=3).words(20)
    got = sample_skellam(mu, 10, source=Scripted(words.tolist()))
    pairs = words.reshape(10, 2)
    first = discrete._invert("poisson", mu, np.ascontiguousarray(pairs[:, 0]), Scripted())
    second = discrete._invert("poisson", mu, np.ascontiguousarray(pairs[:, 1]), Scripted())
    assert got.tolist() == (first - second).tolist()


# -- the enclosures --------------------------------------------------------------------------------
@pytest.mark.parametrize("x", [Fraction(1, 7), Fraction(1, 2), Fraction(3, 2), Fraction(40, 3)])
def test_exp_enclosure_holds_and_is_tight(x: Fraction) -> None:
    p = 128
    lo, hi = discrete._exp_neg(x, p)
    exact = mpmath.exp(-mpmath.mpf(x.numerator) / x.denominator) * mpmath.mpf(2) ** p
    assert lo <= exact <= hi
    assert hi - lo <= 4


@pytest.mark.parametrize(
    ("family", "parameter", "exact_weight"),
    [
        (
            "gaussian",
            Fraction(9, 4),
            lambda k: mpmath.exp(-(mpmath.mpf(k) ** 2) / (2 * mpmath.mpf(9) / 4)),
        ),
        (
            "poisson",
            Fraction(30, 7),
            # mu**k / k! over its value at the mode (4)
            lambda k: (mpmath.mpf(30) / 7) ** (k - 4) * mpmath.factorial(4) / mpmath.factorial(k),
        ),
    ],
)
def test_weights_and_tails_enclose_the_exact_ones(
    family: str, parameter: Fraction, exact_weight: Callable[[int], mpmath.mpf]
) -> None:
    bits = 64
    weights = discrete._FAMILIES[family](parameter, 1, bits)
    p = discrete._precision(bits, len(weights.low))
    scale = mpmath.mpf(2) ** p
    last = weights.first + len(weights.low) - 1
    for i, k in enumerate(range(weights.first, last + 1)):
        exact = exact_weight(k) * scale
        assert weights.low[i] <= exact <= weights.high[i]
    right = mpmath.nsum(lambda k: exact_weight(int(k)), [last + 1, last + 400]) * scale
    left = sum((exact_weight(k) for k in range(max(0, weights.first - 400), weights.first)),
               mpmath.mpf(0)) * scale  # fmt: skip
    assert right <= weights.right_tail and left <= weights.left_tail


# -- the distributions -----------------------------------------------------------------------------
def chi_square_p(
    samples: NDArray[np.int64], support: NDArray[np.int64], pmf: NDArray[Any]
) -> float:
    """Pearson's test over the support's values, the tails merged until each bin expects >= 5."""
    n = samples.size
    expected = pmf * n
    keep = expected >= 5
    low, high = support[keep][0], support[keep][-1]
    values, counts = np.unique(samples, return_counts=True)
    observed = np.zeros(support.size)
    observed[np.searchsorted(support, values)] = counts
    inner = (support >= low) & (support <= high)
    obs = np.concatenate(
        [[observed[support < low].sum()], observed[inner], [observed[support > high].sum()]]
    )
    exp = np.concatenate(
        [[expected[support < low].sum()], expected[inner], [expected[support > high].sum()]]
    )
    obs, exp = obs[exp > 0], exp[exp > 0]
    return float(stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue)


def gaussian_pmf(sigma_squared: Fraction) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
    s = float(sigma_squared)
    reach = int(40 * s**0.5) + 40
    support = np.arange(-reach, reach + 1)
    weights = np.exp(-(support.astype(np.float64) ** 2) / (2 * s))
    return support, weights / weights.sum()


def skellam_pmf(mu: Fraction) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
    reach = int(40 * float(2 * mu) ** 0.5) + 40
    support = np.arange(-reach, reach + 1)
    # e**(-2 mu) I_|k|(2 mu): ive is the exponentially scaled modified Bessel function.
    return support, special.ive(np.abs(support), 2 * float(mu))


N = 200_000


@pytest.mark.parametrize(("sigma_squared", "seed"), [(Fraction(9, 4), 1), (Fraction(10**4), 2)])
def test_discrete_gaussian_fits_its_pmf(sigma_squared: Fraction, seed: int) -> None:
    samples = sample_discrete_gaussian(sigma_squared, N, source=keyed(seed))
    support, pmf = gaussian_pmf(sigma_squared)
    assert chi_square_p(samples, support, pmf) > P_MIN
    check_moments_and_tails(samples, support, pmf)


@pytest.mark.parametrize(("mu", "seed"), [(Fraction(3, 2), 3), (Fraction(5000), 4)])
def test_skellam_fits_its_pmf(mu: Fraction, seed: int) -> None:
    samples = sample_skellam(mu, N, source=keyed(seed))
    support, pmf = skellam_pmf(mu)
    assert abs(pmf.sum() - 1) < 1e-9
    assert chi_square_p(samples, support, pmf) > P_MIN
    check_moments_and_tails(samples, support, pmf)
    assert abs(float(pmf @ support.astype(np.float64) ** 2) - 2 * float(mu)) < 1e-6 * float(mu)


def test_a_large_mean_is_split_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(discrete, "_MAX_MU", 4)  # mu = 10 in 3 parts of 10/3
    source = keyed(5)
    samples = sample_skellam(Fraction(10), N // 2, source=source)
    support, pmf = skellam_pmf(Fraction(10))
    assert chi_square_p(samples, support, pmf) > P_MIN
    # 3 parts, two words each, per output (no slow path at these words).
    assert keyed(5).words(3 * N + 1)[-1] == source.words(1)[0]


def test_the_statistics_refuse_rounded_float_normals() -> None:
    # The negative control: a rounded N(0, sigma^2) is not N_Z(0, sigma^2), nor Skellam.
    rng = np.random.default_rng(8)
    support, pmf = gaussian_pmf(Fraction(9, 4))
    rounded = np.rint(rng.normal(0.0, 1.5, N)).astype(np.int64)
    assert chi_square_p(rounded, support, pmf) < P_MIN
    with pytest.raises(AssertionError):
        check_moments_and_tails(rounded, support, pmf)
    support, pmf = skellam_pmf(Fraction(3, 2))
    assert chi_square_p(np.rint(rng.normal(0.0, 3**0.5, N)).astype(np.int64), support, pmf) < P_MIN


def check_moments_and_tails(
    samples: NDArray[np.int64], support: NDArray[np.int64], pmf: NDArray[np.float64]
) -> None:
    n = samples.size
    x = support.astype(np.float64)
    var = float(pmf @ x**2)
    fourth = float(pmf @ x**4)
    assert abs(samples.mean()) <= 6 * (var / n) ** 0.5
    assert (
        abs(float(np.mean(samples.astype(np.float64) ** 2)) - var)
        <= 6 * ((fourth - var**2) / n) ** 0.5
    )
    # Both tails beyond 2.5 and 3.5 standard deviations, against their exact probabilities.
    for c in (2.5, 3.5):
        cut = c * var**0.5
        for tail in (support <= -cut, support >= cut):
            p = float(pmf[tail].sum())
            hits = int(np.isin(samples, support[tail]).sum())
            assert stats.binomtest(hits, n, p).pvalue > P_MIN


# -- known answers ---------------------------------------------------------------------------------
def test_known_answers_for_a_fixed_key() -> None:
    assert sample_discrete_gaussian(Fraction(10**4), 8, source=keyed(0)).tolist() == GAUSSIAN_KAT
    assert sample_skellam(5000, 8, source=keyed(0)).tolist() == SKELLAM_KAT


GAUSSIAN_KAT = [90, 0, 126, -71, 64, 25, -90, -42]
SKELLAM_KAT = [63, 140, 27, -33, -101, -62, 67, -82]


def test_each_draw_reads_one_word_and_continues_the_stream() -> None:
    source = keyed(6)
    sample_discrete_gaussian(Fraction(10**4), 1000, source=source)
    sample_skellam(Fraction(10**4), 1000, source=source)
    assert source.words(1)[0] == keyed(6).words(3001)[-1]


# -- properties ------------------------------------------------------------------------------------
variances = st.builds(Fraction, st.integers(1, 10**4), st.integers(1, 64))
words64 = st.integers(0, TOP)


@settings(max_examples=30, deadline=None)
@given(
    st.sampled_from([Fraction(1, 3), Fraction(50), Fraction(10**5)]), st.lists(words64, max_size=40)
)
def test_the_guided_search_is_searchsorted(sigma_squared: Fraction, extra: list[int]) -> None:
    table = discrete._table("gaussian", sigma_squared)
    # Random words, the extremes, and every edge's neighbours: tail buckets go to bisection.
    edges = np.concatenate([table.low, table.low - np.uint64(1), table.low + np.uint64(1)])
    u = np.concatenate([np.array([*extra, 0, TOP], dtype=np.uint64), edges])
    assert table.search(u).tolist() == np.searchsorted(table.low, u, side="right").tolist()


@pytest.mark.parametrize(
    ("family", "parameter"),
    [("gaussian", Fraction(1, 3)), ("gaussian", Fraction(10**5)), ("poisson", Fraction(1455000))],
)
def test_a_bucket_answer_is_the_fast_path_of_its_every_word(
    family: str, parameter: Fraction
) -> None:
    # A bucket with an answer lies inside one cell, its enclosures included: its first and
    # last words (so every word between) find that cell and pass the fast path's test.
    table = discrete._table(family, parameter)
    shift = np.uint64(64 - table.guide_bits)
    buckets = np.flatnonzero(table.answer >= 0)
    assert buckets.size > table.answer.size // 2  # the look-up decides most words
    first = buckets.astype(np.uint64) << shift
    for u in (first, first + ((np.uint64(1) << shift) - np.uint64(1))):
        i = np.searchsorted(table.low, u, side="right")
        assert np.array_equal(i, table.answer[buckets])
        assert np.all((i > 0) & (i < table.low.size))
        assert np.all(table.high[i - 1] <= u)
        cells, undecided = discrete._cells(table, u)
        assert np.array_equal(cells, i) and undecided.size == 0


@settings(max_examples=40, deadline=None)
@given(variances, st.integers(0, 64), st.integers(0, 2**32))
def test_output_is_int64_of_the_size_asked(sigma_squared: Fraction, size: int, seed: int) -> None:
    for out in (
        sample_discrete_gaussian(sigma_squared, size, source=Scripted(seed=seed)),
        sample_skellam(sigma_squared, size, source=Scripted(seed=seed)),
    ):
        assert out.dtype == np.int64 and out.shape == (size,)


@settings(max_examples=60, deadline=None)
@given(variances, words64)
def test_the_mirrored_word_gives_the_negated_gaussian(sigma_squared: Fraction, word: int) -> None:
    # U -> 1 - U maps k's cell onto -k's: every word w onto 2**64 - 1 - w (the slow path's too).
    (k,) = sample_discrete_gaussian(sigma_squared, 1, source=Scripted([word], 1)).tolist()
    mirrored = Scripted([word], 1, mirror=True)
    assert sample_discrete_gaussian(sigma_squared, 1, source=mirrored).tolist() == [-k]


@settings(max_examples=60, deadline=None)
@given(variances, words64, words64)
def test_swapped_words_give_the_negated_skellam(mu: Fraction, u: int, v: int) -> None:
    source = Scripted([u, v], 1)
    (k,) = sample_skellam(mu, 1, source=source).tolist()
    assume(len(source.given) == 2)  # the slow path reads its extra words in column order
    (swapped,) = sample_skellam(mu, 1, source=Scripted([v, u], 1)).tolist()
    assert swapped == -k


# -- sources and refusals --------------------------------------------------------------------------
def test_the_default_source_is_secure_and_fresh() -> None:
    first = sample_discrete_gaussian(Fraction(10**6), 64)
    second = sample_discrete_gaussian(Fraction(10**6), 64)
    assert first.dtype == np.int64 and first.tolist() != second.tolist()


def test_every_noise_source_gives_words() -> None:
    lazy = LazySecureGaussian()
    assert isinstance(lazy, RandomWords) and lazy.words(4).dtype == np.uint64
    assert pickle.loads(pickle.dumps(lazy))._source is None  # the key never travels
    seeded = GeneratorGaussian(np.random.default_rng(7))
    expected = np.random.default_rng(7).integers(0, 1 << 64, size=5, dtype=np.uint64)
    assert isinstance(seeded, RandomWords) and seeded.words(5).tolist() == expected.tolist()
    assert sample_skellam(9, 3, source=seeded).shape == (3,)


# Untyped: these calls are wrong on purpose.
dg: Any = sample_discrete_gaussian
sk: Any = sample_skellam


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda: dg(2.0, 3), ParameterTypeError),
        (lambda: dg(True, 3), ParameterTypeError),
        (lambda: dg("4", 3), ParameterTypeError),
        (lambda: dg(0, 3), ParameterValueError),
        (lambda: dg(Fraction(-1, 2), 3), ParameterValueError),
        (lambda: dg(2**34 + 1, 3), ParameterValueError),
        (lambda: dg(4, -1), ParameterValueError),
        (lambda: dg(4, 2.0), ParameterTypeError),
        (
            lambda: dg(4, 2, source=np.random.default_rng(0)),
            ParameterTypeError,
        ),
        (lambda: sk(1.5, 3), ParameterTypeError),
        (lambda: sk(0, 3), ParameterValueError),
        (lambda: sk(Fraction(-3), 3), ParameterValueError),
        (lambda: sk(2**40 + 1, 3), ParameterValueError),
        (lambda: sk(3, -2), ParameterValueError),
        (lambda: sk(3, 2, source="key"), ParameterTypeError),
    ],
)
def test_bad_parameters_are_refused_with_our_errors(
    call: Callable[[], object], error: type
) -> None:
    with pytest.raises(error):
        call()
