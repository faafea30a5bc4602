"""The secure Gaussian source: AES-CTR known answers, the documented transform, the statistics.

The statistical tests draw from a fixed key (NIST's), so they are deterministic: they
cannot flake. Each also states the probability that it would fail for a correct
sampler under a random key, all below 1e-9, so a failure points at the sampler.
"""

from __future__ import annotations

import ctypes
import math
import pickle
import threading

import numpy as np
import pytest
from Crypto.Cipher import AES
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from numpy.typing import NDArray

from flowerpets.dp._primitives import noise
from flowerpets.dp._primitives.noise import (
    AesCtrGaussian,
    GeneratorGaussian,
    LazySecureGaussian,
    gaussian_source,
    lazy_gaussian_source,
)
from flowerpets.exceptions import (
    InsecureRandomnessWarning,
    ParameterTypeError,
    ParameterValueError,
)
from tests.vectors import (
    AES256_CTR_CIPHERTEXT,
    AES256_CTR_COUNTER,
    AES256_CTR_KEY,
    AES256_CTR_OUTPUT_BLOCKS,
    AES256_CTR_PLAINTEXT,
)


def nist_source(summands: int = 4) -> AesCtrGaussian:
    return AesCtrGaussian(summands=summands, key=AES256_CTR_KEY, initial_counter=AES256_CTR_COUNTER)


def test_keystream_is_aes256_ctr_nist_vector() -> None:
    expected = bytes(
        p ^ c for p, c in zip(AES256_CTR_PLAINTEXT[:32], AES256_CTR_CIPHERTEXT[:32], strict=True)
    )
    assert expected == AES256_CTR_OUTPUT_BLOCKS
    source = nist_source()
    # Two calls continue one stream: no block is ever reused.
    assert source.keystream(16) + source.keystream(16) == expected


class Controlled(AesCtrGaussian):
    """The sampler driven by a keystream we write: ``stream`` main words, ``retry`` retry blocks."""

    def __init__(self, stream: NDArray[np.uint64], summands: int = 4) -> None:
        super().__init__(summands=summands, key=AES256_CTR_KEY)
        self.stream = np.asarray(stream, dtype=np.uint64)
        self.position = 0
        self.changed_retry: dict[tuple[int, int], tuple[int, int]] = {}

    def _words_into(self, out: bytearray, n: int) -> int:
        words = self.stream[self.position : self.position + n]
        assert words.size == n, "the test gave too few words"
        out[: 8 * n] = words.astype("<u8").tobytes()
        self.position += n
        return 8 * (self.position - n)

    def retry_words(self, offsets: NDArray[np.uint64], attempt: int) -> NDArray[np.uint64]:
        words = super().retry_words(offsets, attempt)
        for row, offset in enumerate(offsets.tolist()):
            if (offset, attempt) in self.changed_retry:
                words[row] = self.changed_retry[offset, attempt]
        return words


# -- numpy's own ziggurat, fed with the words we choose (numpy/random/bitgen.h) -------------------
_NEXT_U64 = ctypes.CFUNCTYPE(ctypes.c_uint64, ctypes.c_void_p)
_NEXT_U32 = ctypes.CFUNCTYPE(ctypes.c_uint32, ctypes.c_void_p)
_NEXT_DOUBLE = ctypes.CFUNCTYPE(ctypes.c_double, ctypes.c_void_p)


class _BitgenT(ctypes.Structure):
    _fields_ = [
        ("state", ctypes.c_void_p),
        ("next_uint64", _NEXT_U64),
        ("next_uint32", _NEXT_U32),
        ("next_double", _NEXT_DOUBLE),
        ("next_raw", _NEXT_U64),
    ]


class WordList:
    """A bit generator for ``numpy.random.Generator`` that returns the given words in order."""

    def __init__(self, words: list[int]) -> None:
        self.words, self.used = words, 0

        def next_word(_: object) -> int:
            self.used += 1
            return self.words[self.used - 1]

        self._callbacks = (
            _NEXT_U64(next_word),
            _NEXT_U32(lambda s: next_word(s) >> 32),
            _NEXT_DOUBLE(lambda s: (next_word(s) >> 11) * 2.0**-53),
        )
        u64, u32, dbl = self._callbacks
        self._struct = _BitgenT(None, u64, u32, dbl, u64)
        new_capsule = ctypes.pythonapi.PyCapsule_New
        new_capsule.restype = ctypes.py_object
        new_capsule.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
        self.capsule = new_capsule(ctypes.addressof(self._struct), b"BitGenerator", None)
        self.lock = threading.Lock()


def numpy_ziggurat(source: AesCtrGaussian, word: int, offset: int) -> tuple[float, int]:
    """numpy's standard normal from ``word`` then its retry words; and how many it read."""
    at = np.array([offset], dtype=np.uint64)
    retries = [int(v) for attempt in range(16) for v in source.retry_words(at, attempt)[0]]
    bits = WordList([word, *retries])
    value = float(np.random.Generator(bits).standard_normal())  # type: ignore[arg-type]
    return value, bits.used


def gauss(x: float) -> float:
    return math.exp(-0.5 * x * x)


def test_ziggurat_layers_have_equal_areas_and_close_at_the_top() -> None:
    widths, heights = noise._WIDTHS, noise._HEIGHTS
    edges = np.concatenate([[0.0], widths[1:]])
    areas = edges[1:] * (heights[:-1] - heights[1:])
    np.testing.assert_allclose(areas, noise._AREA, rtol=1e-12)
    # The base: the box under f(r) plus the tail beyond r.
    tail = math.sqrt(math.pi / 2) * math.erfc(noise._R / math.sqrt(2))
    assert math.isclose(noise._R * gauss(noise._R) + tail, noise._AREA, rel_tol=1e-9)
    assert math.isclose(widths[0] * heights[-1], noise._AREA, rel_tol=1e-15)
    # r is right: the top box [0, x1] x [f(x1), 1] has the same area (Marsaglia-Tsang).
    assert math.isclose(edges[1] * (1.0 - heights[1]), noise._AREA, rel_tol=1e-9)
    assert np.all(np.diff(edges) > 0) and heights[0] == 1.0


def test_each_normal_is_numpys_ziggurat_of_its_own_words() -> None:
    """numpy's ``Generator.standard_normal`` fed one word and then that word's retry stream.

    Tables are rebuilt here from the equal-area recurrence, numpy's were printed once:
    they agree to ~1e-14, hence the tolerance; the number of words read is exact.
    """
    source = nist_source(summands=1)
    words = nist_source().words(20_000)
    got = source.standard_normal(words.size)
    _, accepted = noise._first_try(words)
    checked = [*np.flatnonzero(~accepted).tolist(), *range(300)]
    assert len(checked) > 500  # ~1.5% of draws need the retry stream
    for i in checked:
        expected, used = numpy_ziggurat(source, int(words[i]), 8 * i)
        assert used >= (1 if accepted[i] else 2)
        assert got[i] == pytest.approx(expected, rel=1e-13, abs=0)


def test_tail_and_wedge_draws_follow_numpy() -> None:
    # Layer 0 beyond r (the tail), layer 1 (always a wedge), a wedge of layer 200; both signs.
    top = (1 << 52) - 1
    words = [(top << 9) | (sign << 8) | layer for layer in (0, 1, 200) for sign in (0, 1)]
    source = Controlled(np.array(words * 4, dtype=np.uint64), summands=1)
    got = source.standard_normal(len(words) * 4)
    for i, value in enumerate(got[: len(words)].tolist()):
        expected, _ = numpy_ziggurat(source, words[i], 8 * i)
        assert value == pytest.approx(expected, rel=1e-13, abs=0)
    assert np.all(np.abs(got[:2]) > noise._R)  # the tail lies beyond r
    assert np.all(np.isfinite(got))


def test_retry_stream_is_aes_ecb_under_the_hkdf_key() -> None:
    """Block a of the word at offset p is AES-256(k', p || a), k' = HKDF-SHA256(key)."""
    retry_key = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=noise._RETRY_INFO
    ).derive(AES256_CTR_KEY)
    offsets = np.array([0, 8, 2**40 + 16], dtype=np.uint64)
    got = nist_source().retry_words(offsets, 7)
    for row, offset in zip(got, offsets.tolist(), strict=True):
        block = offset.to_bytes(8, "big") + (7).to_bytes(8, "big")
        expected = AES.new(retry_key, AES.MODE_ECB).encrypt(block)
        assert row.astype("<u8").tobytes() == expected
    assert retry_key != AES256_CTR_KEY


@pytest.mark.parametrize("summands", [1, 4])
def test_each_output_depends_on_its_own_summands_words_only(summands: int) -> None:
    """Change any one keystream word: exactly one output changes, and each output has
    ``summands`` such words (a ziggurat normal is one word, plus its own retries). With
    one summand: each normal has its own word (Box-Muller's cos and sin shared two).

    The words are ones the fast path accepts: a rejected word's draw is finished from
    its retry stream alone (next test), so changing it may change nothing."""
    n = 24
    candidates = nist_source().words(4 * n * summands)
    stream = candidates[noise._first_try(candidates)[1]][: n * summands].copy()
    base = Controlled(stream, summands).normal(1.0, (n,))
    depends: dict[int, set[int]] = {i: set() for i in range(n)}
    for position in range(n * summands):
        for bit in (0, 8, 30):  # the layer, the sign, a position in the layer
            changed = stream.copy()
            changed[position] ^= np.uint64(1 << bit)
            values = Controlled(changed, summands).normal(1.0, (n,))
            moved = np.flatnonzero(values != base).tolist()
            assert len(moved) == 1, f"word {position} bit {bit} moved outputs {moved}"
            depends[moved[0]].add(position)
    assert all(depends[i] == {j * n + i for j in range(summands)} for i in range(n))


def test_a_retry_word_changes_only_the_output_it_belongs_to() -> None:
    n, summands = 16, 4
    stream = nist_source().words(n * summands).copy()
    # Layer 1 at the far end of its box: the wedge test fails (unless u ~ 0), so the draw
    # is the fresh word of retry block 0, at offset 8 * 5.
    stream[5] = np.uint64(((1 << 52) - 1) << 9) | np.uint64(1)
    base = Controlled(stream, summands).normal(1.0, (n,))
    source = Controlled(stream, summands)
    uniform, fresh = nist_source().retry_words(np.array([40], dtype=np.uint64), 0)[0].tolist()
    source.changed_retry[40, 0] = (uniform, fresh ^ 1)
    values = source.normal(1.0, (n,))
    assert np.flatnonzero(values != base).tolist() == [5]


def test_each_output_sums_its_summands_in_order() -> None:
    # Three blocks and a bit: summand j of output i is word j * b + i of its block.
    b = noise._BLOCK_WORDS // 4
    n = 3 * b + 5
    raw = nist_source().standard_normal(4 * n)
    expected = np.empty(n)
    for start in range(0, n, b):
        size = min(b, n - start)
        terms = raw[4 * start : 4 * (start + size)].reshape(4, size)
        expected[start : start + size] = ((terms[0] + terms[1]) + terms[2]) + terms[3]
    expected *= 3.0 / 2.0
    assert np.array_equal(nist_source(summands=4).normal(3.0, (n,)), expected)
    assert np.array_equal(nist_source(summands=1).normal(3.0, (7,)), raw[:7] * 3.0)


def test_extreme_words_give_finite_normals() -> None:
    words = np.array([0, 2**64 - 1, 2**63, 255, 256, 511] * 4, dtype=np.uint64)
    assert np.all(np.isfinite(Controlled(words, 1).standard_normal(words.size)))
    assert np.all(np.isfinite(Controlled(words, 4).normal(1.0, (6,))))


def _normal_cdf(x: NDArray[np.float64]) -> NDArray[np.float64]:
    return np.array([0.5 * math.erfc(-v / math.sqrt(2)) for v in x.tolist()])


def _chi_square_normal(samples: NDArray[np.float64], edges: NDArray[np.float64]) -> float:
    counts = np.bincount(np.searchsorted(edges, samples), minlength=edges.size + 1)
    probs = np.diff(np.concatenate([[0.0], _normal_cdf(edges), [1.0]]))
    expected = probs * samples.size
    return float(np.sum((counts - expected) ** 2 / expected))


def _ks_distance(samples: NDArray[np.float64]) -> float:
    """Kolmogorov-Smirnov distance to N(0, 1), on a 4,001-point grid (exact enough here)."""
    grid = np.linspace(-5.0, 5.0, 4001)
    empirical = np.searchsorted(np.sort(samples), grid, side="right") / samples.size
    return float(np.max(np.abs(empirical - _normal_cdf(grid))))


@pytest.mark.parametrize("summands", [1, 4])
def test_secure_noise_is_standard_normal(summands: int) -> None:
    """Fixed key, so deterministic. For a correct sampler and a random key, each check fails
    with probability below 1e-9: |mean| < 6.5 / sqrt(n) (normal tail 8e-11), |std - 1| <
    6.5 / sqrt(2n) (same), chi-square(39 df) < 124 (P = 1e-10), KS distance < 5.1 / sqrt(n)
    (Kolmogorov tail 2 exp(-2 * 5.1**2) ~ 5e-23, a grid only lowers the distance)."""
    n = 1_000_000
    samples = nist_source(summands).normal(1.0, (n,))
    assert abs(samples.mean()) < 6.5 / math.sqrt(n)
    assert abs(samples.std() - 1.0) < 6.5 / math.sqrt(2 * n)
    assert _chi_square_normal(samples, np.linspace(-3.8, 3.8, 39)) < 124.0
    assert _ks_distance(samples) < 5.1 / math.sqrt(n)


def test_the_tail_beyond_r_has_the_normal_shape() -> None:
    """2M single draws: P(|z| > r) = 2.58e-4 gives ~516 beyond r, drawn by the tail method.

    Poisson counts; for a random key each bound fails with probability below 1e-11, the
    share beyond 4 (binomial, 6.6 standard errors) below 3e-10."""
    n = 2_000_000
    samples = np.abs(nist_source(summands=1).standard_normal(n))
    for x, low, high in [(noise._R, 370, 680), (4.0, 55, 210), (4.5, 0, 45)]:
        expected = n * math.erfc(x / math.sqrt(2))
        count = int(np.count_nonzero(samples > x))
        assert low <= count <= high, (x, expected, count)
    # Inside the tail, the conditional distribution: beyond 4 among those beyond r.
    beyond_r = samples[samples > noise._R]
    ratio = math.erfc(4.0 / math.sqrt(2)) / math.erfc(noise._R / math.sqrt(2))
    share = float(np.mean(beyond_r > 4.0))
    assert abs(share - ratio) < 6.6 * math.sqrt(ratio * (1 - ratio) / beyond_r.size)


def test_standard_deviation_scales_and_shape_is_kept() -> None:
    """|std/0.25 - 1| < 0.01 with 210,000 draws: 6.5 standard errors, P < 1e-10."""
    noise_values = AesCtrGaussian().normal(0.25, (300, 700))
    assert noise_values.shape == (300, 700) and noise_values.dtype == np.float64
    assert abs(noise_values.std() / 0.25 - 1.0) < 0.01
    assert not np.any(AesCtrGaussian().normal(0.0, (10,)))
    assert AesCtrGaussian().normal(1.0, (0, 3)).shape == (0, 3)


def test_fresh_sources_draw_different_streams() -> None:
    assert AesCtrGaussian().keystream(32) != AesCtrGaussian().keystream(32)


def test_threads_never_share_keystream() -> None:
    shared = nist_source()
    drawn: list[np.ndarray] = []
    lock = threading.Lock()

    def draw() -> None:
        for _ in range(40):
            words = shared.words(250)
            with lock:
                drawn.append(words)

    threads = [threading.Thread(target=draw) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = np.sort(np.concatenate(drawn))
    expected = np.sort(nist_source().words(6 * 40 * 250))
    assert np.array_equal(got, expected)  # every word once: nothing repeated, nothing lost


def test_generator_source_reproduces_numpy_exactly() -> None:
    source = GeneratorGaussian(np.random.default_rng(7))
    expected = np.random.default_rng(7).normal(0.0, 2.0, size=(3, 4))
    assert np.array_equal(source.normal(2.0, (3, 4)), expected)
    assert not source.secure and AesCtrGaussian().secure


def test_choosing_a_generator_warns_and_none_is_secure() -> None:
    with pytest.warns(InsecureRandomnessWarning, match="not cryptographically secure"):
        assert not gaussian_source(np.random.default_rng(0), owner="test").secure
    assert isinstance(gaussian_source(None, owner="test"), AesCtrGaussian)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"summands": 0}, ParameterValueError, "summands"),
        ({"summands": True}, ParameterTypeError, "summands"),
        ({"key": b"short"}, ParameterValueError, "key must be 32 bytes"),
        ({"initial_counter": b"x"}, ParameterValueError, "initial_counter"),
    ],
)
def test_bad_settings_are_refused(kwargs: dict[str, object], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        AesCtrGaussian(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("std", [-1.0, math.nan, math.inf])
def test_bad_standard_deviations_are_refused(std: float) -> None:
    with pytest.raises(ParameterValueError, match="standard deviation") as refused:
        AesCtrGaussian().normal(std, (3,))
    assert "got" not in str(refused.value)  # z C shown nowhere: the clip may be learnt from data
    with pytest.raises(ParameterTypeError):
        GeneratorGaussian("not a generator")  # type: ignore[arg-type]


def test_the_lazy_source_builds_its_key_on_first_draw_and_never_pickles_it() -> None:
    source = LazySecureGaussian()
    first = source.normal(1.0, (64,))
    # A used source pickles exactly as a new one: no key, no stream position.
    assert pickle.dumps(source) == pickle.dumps(LazySecureGaussian())
    clone = pickle.loads(pickle.dumps(source))
    assert clone.secure and isinstance(lazy_gaussian_source(None, owner="test"), LazySecureGaussian)
    # Independent keys: equal draws have probability 0 here.
    again, copied = source.normal(1.0, (64,)), clone.normal(1.0, (64,))
    assert not np.array_equal(first, again) and not np.array_equal(again, copied)


def test_a_seeded_source_warns_and_its_copy_replays_the_same_draws() -> None:
    with pytest.warns(InsecureRandomnessWarning, match="owner-name"):
        source = lazy_gaussian_source(np.random.default_rng(5), owner="owner-name")
    clone = pickle.loads(pickle.dumps(source))
    assert np.array_equal(source.normal(2.0, (8,)), clone.normal(2.0, (8,)))
    assert np.array_equal(source.normal(2.0, (8,)), np.random.default_rng(5).normal(0, 2.0, 16)[8:])
