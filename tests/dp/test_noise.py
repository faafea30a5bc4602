"""The secure Gaussian source: AES-CTR known answers, the documented transform, the statistics."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest

from flowerpets.dp._primitives.noise import (
    AesCtrGaussian,
    GeneratorGaussian,
    gaussian_source,
)
from flowerpets.exceptions import InsecureRandomnessWarning

# NIST SP 800-38A, F.5.5 CTR-AES256.Encrypt.
NIST_KEY = bytes.fromhex("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4")
NIST_COUNTER = bytes.fromhex("f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff")
NIST_PLAIN = bytes.fromhex("6bc1bee22e409f96e93d7e117393172aae2d8a571e03ac9c9eb76fac45af8e51")
NIST_CIPHER = bytes.fromhex("601ec313775789a5b7a7f504bbf3d228f443e3ca4d62b59aca84e990cacaf5c5")
NIST_OUTPUT_BLOCKS = bytes.fromhex(
    "0bdf7df1591716335e9a8b15c860c5025a6e699d536119065433863c8f657b94"
)


def nist_source(summands: int = 4) -> AesCtrGaussian:
    return AesCtrGaussian(summands=summands, key=NIST_KEY, initial_counter=NIST_COUNTER)


def test_keystream_is_aes256_ctr_nist_vector() -> None:
    expected = bytes(p ^ c for p, c in zip(NIST_PLAIN, NIST_CIPHER, strict=True))
    assert expected == NIST_OUTPUT_BLOCKS
    source = nist_source()
    # Two calls continue one stream: no block is ever reused.
    assert source.keystream(16) + source.keystream(16) == expected


def test_uniforms_follow_the_documented_transform() -> None:
    stream = nist_source().keystream(32)
    words = [int.from_bytes(stream[i : i + 8], "little") for i in range(0, 32, 8)]
    expected = [((w >> 12) + 0.5) * 2.0**-52 for w in words]
    assert nist_source().uniforms(4).tolist() == expected
    assert all(0.0 < u < 1.0 for u in expected)


def test_extreme_words_map_strictly_inside_the_unit_interval() -> None:
    class Extremes(AesCtrGaussian):
        def words(self, n: int) -> np.ndarray:
            return np.array([0, 2**64 - 1] * (n // 2), dtype=np.uint64)

    lowest, highest = Extremes().uniforms(2).tolist()
    assert lowest == 2.0**-53 and highest == 1.0 - 2.0**-53
    assert np.all(np.isfinite(Extremes().standard_normal(2)))


def test_box_muller_known_answer() -> None:
    u = nist_source().uniforms(4).tolist()
    expected = [
        math.sqrt(-2 * math.log(u[0])) * math.cos(2 * math.pi * u[2]),
        math.sqrt(-2 * math.log(u[1])) * math.cos(2 * math.pi * u[3]),
        math.sqrt(-2 * math.log(u[0])) * math.sin(2 * math.pi * u[2]),
        math.sqrt(-2 * math.log(u[1])) * math.sin(2 * math.pi * u[3]),
    ]
    np.testing.assert_allclose(nist_source().standard_normal(4), expected, rtol=1e-14)
    # An odd count drops the last sine, nothing else.
    np.testing.assert_allclose(nist_source().standard_normal(3), expected[:2] + expected[2:3])


def test_each_output_sums_its_summands() -> None:
    raw = nist_source().standard_normal(4 * 5).reshape(4, 5)
    np.testing.assert_allclose(
        nist_source(summands=4).normal(3.0, (5,)), raw.sum(axis=0) * 3.0 / 2.0, rtol=1e-14
    )
    np.testing.assert_allclose(
        nist_source(summands=1).normal(3.0, (2,)), nist_source().standard_normal(2) * 3.0
    )


def _chi_square_normal(samples: np.ndarray, bins: int = 24) -> float:
    edges = np.linspace(-3.0, 3.0, bins - 1)
    counts = np.bincount(np.searchsorted(edges, samples), minlength=bins)
    cdf = np.array([0.5 * math.erfc(-x / math.sqrt(2)) for x in edges])
    probs = np.diff(np.concatenate([[0.0], cdf, [1.0]]))
    expected = probs * samples.size
    return float(np.sum((counts - expected) ** 2 / expected))


@pytest.mark.parametrize("summands", [1, 4])
def test_secure_noise_is_standard_normal(summands: int) -> None:
    samples = nist_source(summands).normal(1.0, (400_000,))
    assert abs(samples.mean()) < 5 / math.sqrt(samples.size)
    assert abs(samples.std() - 1.0) < 0.01
    # 23 degrees of freedom: a chi-square above 60 has probability ~3e-5 under the null.
    assert _chi_square_normal(samples) < 60.0


def test_standard_deviation_scales_and_shape_is_kept() -> None:
    noise = AesCtrGaussian().normal(0.25, (300, 700))
    assert noise.shape == (300, 700) and noise.dtype == np.float64
    assert abs(noise.std() / 0.25 - 1.0) < 0.01
    assert not np.any(AesCtrGaussian().normal(0.0, (10,)))


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
    ("kwargs", "match"),
    [
        ({"summands": 0}, "summands"),
        ({"summands": True}, "summands"),
        ({"key": b"short"}, "key must be 32 bytes"),
        ({"initial_counter": b"x"}, "initial_counter"),
    ],
)
def test_bad_settings_are_refused(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        AesCtrGaussian(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("std", [-1.0, math.nan, math.inf])
def test_bad_standard_deviations_are_refused(std: float) -> None:
    with pytest.raises(ValueError, match="standard deviation"):
        AesCtrGaussian().normal(std, (3,))
    with pytest.raises(TypeError):
        GeneratorGaussian("not a generator")  # type: ignore[arg-type]
