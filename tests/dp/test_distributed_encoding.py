"""Distributed DP's integer pipeline: rounding, the sum through residues, its noise, wrap-around.

Every random draw comes from a fixed AES key, so the tests are deterministic.
Each statistical threshold is stated with the chance that it would fail a
correct implementation under a random key (normal approximations, by the CLT).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from fractions import Fraction

import numpy as np
import pytest
from numpy.typing import NDArray

from flowerpets.core import QuantizedDomain
from flowerpets.dp._primitives.calibration import rounded_l1_bound, rounded_l2_bound
from flowerpets.dp._primitives.clip import clip_update
from flowerpets.dp._primitives.discrete import sample_discrete_gaussian, sample_skellam
from flowerpets.dp._primitives.distributed import (
    DEFAULT_BETA,
    Encoding,
    conditional_round,
    coordinate_wrap_probability,
    decode,
    encode,
    fits_modulus,
    lift,
    wrap_probability,
)
from flowerpets.dp._primitives.noise import AesCtrGaussian
from flowerpets.dp._primitives.rotation import RandomizedHadamard
from flowerpets.dp.accountant import DistributedDiscreteGaussianEvent, SkellamEvent
from flowerpets.exceptions import (
    ConditionalRoundingError,
    InvalidUpdateError,
    ParameterTypeError,
    ParameterValueError,
)

Noise = Callable[[int], NDArray[np.int64]]


def keyed(seed: int) -> AesCtrGaussian:
    return AesCtrGaussian(key=bytes((seed + 3 * i) % 256 for i in range(32)))


def no_noise(size: int) -> NDArray[np.int64]:
    return np.zeros(size, dtype=np.int64)


def skellam(variance: int, source: AesCtrGaussian) -> Noise:
    """Shares of ``variance`` in the accountant's convention: Poisson(v/2) - Poisson(v/2)."""
    return lambda size: sample_skellam(Fraction(variance, 2), size, source=source)


def discrete_gaussian(variance: int, source: AesCtrGaussian) -> Noise:
    return lambda size: sample_discrete_gaussian(variance, size, source=source)


SHARES = {SkellamEvent: skellam, DistributedDiscreteGaussianEvent: discrete_gaussian}


def released(
    updates: list[NDArray[np.float64]],
    encoding: Encoding,
    rotation: RandomizedHadamard,
    noise: Noise,
    source: AesCtrGaussian,
) -> NDArray[np.float64]:
    """Every client's residues, summed as SecAgg+ sums them, decoded."""
    residues = [
        encode(u, encoding=encoding, rotation=rotation, noise=noise, source=source)[0]
        for u in updates
    ]
    return decode(summed(residues), encoding=encoding, rotation=rotation)


def noised_sum(
    updates: list[NDArray[np.float64]], *, scale: float, variance: int, mechanism: type, key: int
) -> tuple[NDArray[np.float64], Encoding]:
    """The released sum of ``updates`` (clip 1), shares of ``variance`` from ``mechanism``."""
    encoding = Encoding(scale=scale, clip=1.0, dimension=updates[0].size)
    rotation = RandomizedHadamard(b"round seed %05d" % key, encoding.dimension)
    source = keyed(key)
    noise = SHARES[mechanism](variance, source)
    return released(updates, encoding, rotation, noise, source), encoding


def unit_updates(n: int, d: int, seed: int, norm: float = 1.0) -> list[NDArray[np.float64]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        u = rng.standard_normal(d)
        out.append(u * (norm * rng.uniform(0.3, 2.0) / np.linalg.norm(u)))
    return out


def summed(residues: list[NDArray[np.uint32]]) -> NDArray[np.uint64]:
    """What SecAgg+ reveals: the residues' sum mod 2**32 (numpy's uint32 addition wraps)."""
    total = np.zeros_like(residues[0])
    for r in residues:
        total += r
    return total.astype(np.uint64)


# -- the encoding ---------------------------------------------------------------------------------
def test_the_encoding_reuses_the_calibration_bounds() -> None:
    encoding = Encoding(scale=300.0, clip=0.5, dimension=1000, modulus_bits=20)
    assert encoding.padded == 1024 and encoding.modulus == 2**20 and encoding.beta == DEFAULT_BETA
    l2 = rounded_l2_bound(150.0, dimension=1024, beta=math.exp(-0.5))
    assert encoding.norm_bound == l2
    assert encoding.l1_bound == rounded_l1_bound(l2, dimension=1024)
    # exp(-0.5) ** tries <= 2**-40: 56 tries.
    assert encoding.rounding_tries == 56
    assert Encoding(scale=1.0, clip=1.0, dimension=3, beta=0.0).norm_bound == 1.0 + 2.0


def test_the_encoding_bounds_are_the_accountants_sensitivities() -> None:
    encoding = Encoding(scale=1e3, clip=0.7, dimension=5000)
    event = SkellamEvent.from_pipeline(
        clip=0.7,
        scale=1e3,
        dimension=encoding.padded,
        beta=encoding.beta,
        local_variance=1.0,
        clients_in_sum=1,
    )
    assert (event.l2_sensitivity, event.l1_sensitivity) == (
        encoding.norm_bound,
        encoding.l1_bound,
    )


def test_the_norm_check_is_exact_at_the_bound() -> None:
    # Integers round to themselves: the only question is the norm against the bound.
    three_four = np.array([3.0, 4.0])
    assert list(conditional_round(three_four, norm_bound=5.0, source=keyed(0), tries=1)) == [3, 4]
    with pytest.raises(ConditionalRoundingError):
        conditional_round(three_four, norm_bound=math.nextafter(5.0, 0), source=keyed(0), tries=1)
    ones = np.ones(2)  # norm sqrt(2), irrational: the float just above it passes, below fails
    above = math.sqrt(2)
    below = math.nextafter(above, 0)
    assert Fraction(below) ** 2 < 2 < Fraction(above) ** 2
    conditional_round(ones, norm_bound=above, source=keyed(0), tries=1)
    with pytest.raises(ConditionalRoundingError):
        conditional_round(ones, norm_bound=below, source=keyed(0), tries=1)


@pytest.mark.parametrize(
    "fields",
    [
        {"modulus_bits": 33},
        {"modulus_bits": 0},
        {"beta": 1.0},
        {"scale": 0.0},
        {"clip": -1.0},
        {"dimension": 0},
        {"scale": 2.0**51},  # clip * scale above 2**50
    ],
)
def test_the_encoding_refuses(fields: dict[str, float]) -> None:
    with pytest.raises(ParameterValueError):
        Encoding(**{"scale": 10.0, "clip": 1.0, "dimension": 8, **fields})  # type: ignore[arg-type]


# -- rounding -------------------------------------------------------------------------------------
def test_randomized_rounding_is_unbiased() -> None:
    # Plain rounding (a bound that always holds): each coordinate's mean over 4000 draws is x
    # within 6 standard errors sqrt(p (1 - p) / 4000); a correct rounding fails this for one
    # of the 64 coordinates with probability below 1.3e-7.
    rng = np.random.default_rng(5)
    x = rng.uniform(-50, 50, 64)
    x[:4] = [0.5, -0.5, 3.0, -2.25]
    draws, source = 4000, keyed(1)
    bound = float(np.linalg.norm(x)) + 8.0  # ||x|| + sqrt(64): never exceeded
    rounded = np.stack(
        [conditional_round(x, norm_bound=bound, source=source, tries=1) for _ in range(draws)]
    )
    assert np.all((rounded == np.floor(x)) | (rounded == np.floor(x) + 1))
    p = x - np.floor(x)
    stderr = np.sqrt(p * (1 - p) / draws)
    assert np.all(np.abs(rounded.mean(axis=0) - x) <= 6 * stderr + 1e-12)
    assert np.all(rounded[:, 2] == 3)  # an integer is never moved


class Words:
    """The words we choose, in order (not secure: for the rounding's exact decision)."""

    secure = False

    def __init__(self, words: list[int]) -> None:
        self.queue = list(words)

    def words(self, n: int) -> NDArray[np.uint64]:
        out, self.queue = self.queue[:n], self.queue[n:]
        return np.array(out, dtype=np.uint64)


def test_a_word_rounds_up_exactly_when_its_top_53_bits_are_below_the_fraction() -> None:
    # 0.25 and -1.75 have fraction 1/4: up iff the top 53 bits are below 2**51.
    x = np.array([0.25, 0.25, -1.75, -1.75, 7.0])
    below, at = ((1 << 51) - 1) << 11 | 0x7FF, (1 << 51) << 11
    words = Words([below, at, below, at, 0])
    rounded = conditional_round(x, norm_bound=100.0, source=words, tries=1)
    np.testing.assert_array_equal(rounded, [1, 0, -1, -2, 7])


def test_conditional_rounding_keeps_its_bound_and_retries() -> None:
    # Every fraction 1/2: ||rounded||^2 = sum of (x_j +- 1/2)^2, a bound near its median.
    x = np.full(16, 2.5)
    typical = float(np.linalg.norm(x)) ** 2 + 16 / 4
    bound = math.sqrt(typical)
    source = keyed(2)
    results = [conditional_round(x, norm_bound=bound, source=source, tries=60) for _ in range(300)]
    assert all(float(r @ r) <= bound**2 for r in results)
    failures = 0
    for _ in range(100):
        try:
            conditional_round(x, norm_bound=bound, source=source, tries=1)
        except ConditionalRoundingError as error:
            failures += 1
            assert "2.5" not in str(error)
    # About half of single tries exceed the bound: 100 tries all passing has chance 2**-100.
    assert 10 <= failures <= 90


# -- the sum through the residues -----------------------------------------------------------------
def test_without_noise_the_decoded_sum_is_within_the_rounding() -> None:
    # Each client's rounding moves its rotated vector by less than sqrt(D) steps, so the decoded
    # sum is within n sqrt(D) / scale of the true sum of clipped updates, always.
    n, d = 6, 1000
    encoding = Encoding(scale=1e4, clip=1.0, dimension=d)
    rotation = RandomizedHadamard(b"round seed 00001", d)
    source = keyed(3)
    updates = unit_updates(n, d, 7)
    encoded = [
        encode(u, encoding=encoding, rotation=rotation, noise=no_noise, source=source)
        for u in updates
    ]
    decoded = decode(summed([r for r, _ in encoded]), encoding=encoding, rotation=rotation)
    truth = sum(clip_update({"u": u}, 1.0).arrays["u"] for u in updates)
    error = float(np.linalg.norm(decoded - truth))
    assert 0 < error < n * math.sqrt(encoding.padded) / encoding.scale
    assert [c for _, c in encoded] == [bool(np.linalg.norm(u) > 1.0) for u in updates]
    assert any(c for _, c in encoded) and not all(c for _, c in encoded)


@pytest.mark.parametrize("mechanism", [SkellamEvent, DistributedDiscreteGaussianEvent])
def test_the_decoded_sum_has_the_documented_error(mechanism: type) -> None:
    # E ||decoded - truth||^2 <= n D (v + 1/4) / scale^2 (noise plus rounding, unrotated). The
    # measured value sums 1024 coordinates: 25% above the expectation is over 7 standard
    # deviations (relative sd sqrt(2 / 1024) at most, 4.4%): false failures below 1e-12.
    n, d, variance = 5, 1000, 400
    updates = unit_updates(n, d, 8)
    decoded, encoding = noised_sum(
        updates, scale=50.0, variance=variance, mechanism=mechanism, key=4
    )
    truth = sum(clip_update({"u": u}, 1.0).arrays["u"] for u in updates)
    squared = float(np.sum((decoded - truth) ** 2))
    expected = n * encoding.padded * (variance + 0.25) / encoding.scale**2
    # Dropping the 24 padding coordinates removes about 24 / 1024 of it: the lower end.
    assert 0.75 * expected <= squared <= 1.25 * expected


@pytest.mark.parametrize("mechanism", [SkellamEvent, DistributedDiscreteGaussianEvent])
def test_the_noise_on_the_released_sum_has_the_calibrated_variance(mechanism: type) -> None:
    # Zero updates round exactly, so the decoded sum times the scale is the summed noise,
    # unrotated (d = D: nothing dropped, the squared norm kept). Its mean square over D = 4096
    # coordinates is V = n v within 6 standard errors sqrt((V + 2 V^2) / D) (V + 2 V^2 is the
    # variance of a Skellam's square; the discrete Gaussian sum's is below it): false
    # failures below 2e-9.
    n, d, variance = 4, 4096, 250
    zeros = [np.zeros(d)] * n
    decoded, encoding = noised_sum(zeros, scale=8.0, variance=variance, mechanism=mechanism, key=5)
    total_noise = decoded * encoding.scale
    total = n * variance
    mean_square = float(np.mean(total_noise**2))
    assert abs(mean_square - total) <= 6 * math.sqrt((total + 2 * total**2) / d)
    # The noise is really there, in every coordinate's spread, not just on average.
    assert np.std(total_noise) > 0.8 * math.sqrt(total)


def test_lift_is_centred() -> None:
    residues = np.array([0, 1, 127, 128, 129, 255, 256 + 3], dtype=np.uint64)
    np.testing.assert_array_equal(lift(residues, 8), [0, 1, 127, 128, -127, -1, 3])
    np.testing.assert_array_equal(
        lift(np.array([2**31, 2**31 + 1, 2**32 - 1], np.uint32), 32), [2**31, -(2**31) + 1, -1]
    )
    with pytest.raises(ParameterTypeError):
        lift(np.array([1, 2]), 8)  # type: ignore[arg-type]


def test_residues_are_the_noised_integers_mod_m() -> None:
    # Scaled by 1 and a spike of 3 on one coordinate of a 1-dimensional update: the rounded value
    # is exactly +-3 (the sign from the seed), plus the noise, mod 2**bits.
    encoding = Encoding(scale=1.0, clip=10.0, dimension=1, modulus_bits=4)
    rotation = RandomizedHadamard(b"round seed 00004", 1)
    sign = rotation.rotate(np.array([1.0]))[0]
    residues, clipped = encode(
        np.array([3.0]),
        encoding=encoding,
        rotation=rotation,
        noise=lambda size: np.full(size, -20, dtype=np.int64),
        source=keyed(6),
    )
    assert residues.dtype == np.uint32 and not clipped
    assert int(residues[0]) == (int(3 * sign) - 20) % 16
    # What the core's quantized domain of the same modulus accepts as residues.
    domain = QuantizedDomain(modulus_bits=4, names=("update",))
    assert domain.check_residues("update", residues) is residues


def test_refusals_carry_no_values() -> None:
    encoding = Encoding(scale=10.0, clip=1.0, dimension=3)
    rotation = RandomizedHadamard(b"round seed 00005", 3)
    source = keyed(7)
    for bad in ([12345.678, math.nan, 1.0], [98765.4321, math.inf, 0.0]):
        with pytest.raises(InvalidUpdateError) as caught:
            encode(
                np.array(bad), encoding=encoding, rotation=rotation, noise=no_noise, source=source
            )
        assert "12345" not in str(caught.value) and "98765" not in str(caught.value)
    with pytest.raises(InvalidUpdateError, match="shape"):
        encode(np.zeros(4), encoding=encoding, rotation=rotation, noise=no_noise, source=source)
    with pytest.raises(ParameterValueError, match="rotation is for 4"):
        encode(
            np.zeros(3),
            encoding=encoding,
            rotation=RandomizedHadamard(b"round seed 00005", 4),
            noise=no_noise,
            source=source,
        )
    with pytest.raises(ParameterValueError, match="noise must be 4 integers"):
        encode(
            np.zeros(3),
            encoding=encoding,
            rotation=rotation,
            noise=lambda size: np.zeros(size),  # floats
            source=source,
        )
    with pytest.raises(ParameterValueError, match=r"shape \(4,\)"):
        decode(np.zeros(3, np.uint64), encoding=encoding, rotation=rotation)


# -- wrap-around ----------------------------------------------------------------------------------
class RecordedSkellam:
    """Skellam shares of ``variance`` (the accountant's convention) that keep the last draw."""

    def __init__(self, variance: int, source: AesCtrGaussian) -> None:
        self.variance, self.source = variance, source
        self.last = np.zeros(0, dtype=np.int64)

    def __call__(self, size: int) -> NDArray[np.int64]:
        self.last = sample_skellam(Fraction(self.variance, 2), size, source=self.source)
        return self.last


def true_sums(
    updates: list[NDArray[np.float64]], encoding: Encoding, trial: int, noise: RecordedSkellam
) -> NDArray[np.int64]:
    """The integer sum before the wrap, under trial ``trial``'s rotation: each client's rounded
    vector (its residues less its noise, lifted: far inside the interval) plus its noise."""
    rotation = RandomizedHadamard(trial.to_bytes(16, "big"), encoding.dimension)
    total = np.zeros(encoding.padded, dtype=np.int64)
    for update in updates:
        residues, _ = encode(
            update, encoding=encoding, rotation=rotation, noise=noise, source=noise.source
        )
        rounded = lift(residues - noise.last.astype(np.uint32), encoding.modulus_bits)
        assert np.all(np.abs(rounded) <= encoding.scaled_clip + 1)
        total += rounded + noise.last
    return total


def wrapped(total: NDArray[np.int64], encoding: Encoding) -> NDArray[np.bool_]:
    half = encoding.modulus // 2
    out: NDArray[np.bool_] = (total > half) | (total <= -half)
    return out


def test_the_wrap_rate_per_coordinate_is_within_its_bound() -> None:
    # m = 256, 4 clients, D = 4096: the per-coordinate bound is about 7x the true rate (about
    # 1.1%), measured on 5 x 4096 coordinates (over 200 wraps; the bound is 25 standard errors
    # above the expected count).
    n, d, variance = 4, 4096, 600
    encoding = Encoding(scale=40.0, clip=1.0, dimension=d, modulus_bits=8, beta=0.0)
    bound = coordinate_wrap_probability(encoding, clients=n, local_variance=variance)
    noise, updates = RecordedSkellam(variance, keyed(8)), unit_updates(n, d, 9, norm=0.7)
    counts = []
    for trial in range(5):
        total = true_sums(updates, encoding, trial, noise)
        counts.append(int(np.sum(wrapped(total, encoding))))
        # Decoding is exact exactly where nothing wrapped.
        residues = (total & (encoding.modulus - 1)).astype(np.uint64)
        np.testing.assert_array_equal(lift(residues, 8) == total, ~wrapped(total, encoding))
    measured = sum(counts) / (5 * d)
    assert 0.002 < measured <= bound < 0.2


def test_the_wrap_frequency_is_within_wrap_probability() -> None:
    # D = 4, m = 128, 3 clients: the bound is about 0.3, the true frequency about 0.04.
    n, d, variance = 3, 4, 170
    encoding = Encoding(scale=5.0, clip=1.0, dimension=d, modulus_bits=7, beta=0.0)
    bound = wrap_probability(encoding, clients=n, local_variance=variance)
    noise, updates = RecordedSkellam(variance, keyed(9)), unit_updates(n, d, 10, norm=0.7)
    trials = 800
    wraps = sum(
        bool(np.any(wrapped(true_sums(updates, encoding, trial, noise), encoding)))
        for trial in range(trials)
    )
    assert 0 < wraps / trials <= bound < 1


def test_wrap_probability_grows_with_what_it_should() -> None:
    def bound(*, bits: int = 24, clients: int = 100, variance: float = 1e10) -> float:
        encoding = Encoding(scale=2.0**12, clip=1.0, dimension=2**20, modulus_bits=bits)
        return wrap_probability(encoding, clients=clients, local_variance=variance)

    base = bound()  # the summed noise's sd 1e6 against a margin of 2**23: about 1e-9
    assert 1e-12 < base < 1e-6
    assert bound(clients=200) > base and bound(variance=2e10) > base and bound(bits=23) > base
    assert bound(bits=32) < 1e-300 and bound(bits=20) == 1.0
    encoding = Encoding(scale=2.0**12, clip=1.0, dimension=2**20, modulus_bits=24)
    assert fits_modulus(encoding, clients=100, local_variance=1e10, limit=1e-6)
    assert not fits_modulus(encoding, clients=100, local_variance=1e10, limit=1e-12)
    # The discrete Gaussian's tail is lighter than the Skellam's of the same variance.
    gaussian = wrap_probability(
        encoding, clients=100, local_variance=1e10, mechanism=DistributedDiscreteGaussianEvent
    )
    assert 0 < gaussian <= base
    with pytest.raises(ParameterTypeError, match="mechanism"):
        wrap_probability(encoding, clients=1, local_variance=1.0, mechanism=int)


def test_wrap_probability_is_a_bound_on_the_gaussian_tail() -> None:
    # No rotation term to speak of (a tiny clip), discrete Gaussian noise: the bound is the
    # Chernoff bound 2 D exp(-a^2 / (2 V)), a = m/2 - n (1 + clip scale), computed here.
    encoding = Encoding(scale=1.0, clip=1e-6, dimension=8, modulus_bits=12)
    n, sigma2 = 10, 2000.0
    a = 2048 - n * (1 + 1e-6)
    expected = 2 * 8 * math.exp(-(a**2) / (2 * n * sigma2))
    got = wrap_probability(
        encoding, clients=n, local_variance=sigma2, mechanism=DistributedDiscreteGaussianEvent
    )
    assert got == pytest.approx(expected, rel=1e-6)
    # The exact Gaussian tail it bounds is smaller.
    assert got > 16 * 0.5 * math.erfc(a / math.sqrt(2 * n * sigma2))
