"""The randomized Hadamard rotation: H S / sqrt(D) exactly, orthonormal, its inverse, its seed."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.linalg import hadamard

from flowerpets.dp._primitives import rotation
from flowerpets.dp._primitives.rotation import RandomizedHadamard, padded_dimension
from flowerpets.exceptions import ParameterTypeError, ParameterValueError

SEED = bytes(range(16))


def documented_signs(seed: bytes, padded: int) -> np.ndarray:
    """The module docstring's derivation, written again from the text."""
    message = (
        b"flowerpets dp: randomized Hadamard signs v1"
        + len(seed).to_bytes(8, "big")
        + seed
        + padded.to_bytes(8, "big")
    )
    digest = hashlib.shake_256(message).digest((padded + 7) // 8)
    bits = [(digest[j // 8] >> (j % 8)) & 1 for j in range(padded)]
    return np.array([-1.0 if b else 1.0 for b in bits])


@pytest.mark.parametrize(
    ("d", "padded"), [(0, 1), (1, 1), (2, 2), (3, 4), (5, 8), (1024, 1024), (1025, 2048)]
)
def test_padded_dimension_is_the_next_power_of_two(d: int, padded: int) -> None:
    assert padded_dimension(d) == padded


@pytest.mark.parametrize("block", [4, 16, 64])
@pytest.mark.parametrize("log", [1, 2, 3, 4, 5, 8, 9])
def test_the_blocked_transform_is_the_hadamard_matrix(
    monkeypatch: pytest.MonkeyPatch, block: int, log: int
) -> None:
    # Small blocks send every path through small vectors: many blocks, narrow levels as
    # strided vectors, the wide levels by chunks of columns (more rows than a block too).
    monkeypatch.setattr(rotation, "_FWHT_BLOCK", block)
    n = 1 << log
    x = np.random.default_rng(log).standard_normal(n)
    y = x.copy()
    rotation._fwht(y)
    np.testing.assert_allclose(y, hadamard(n) @ x, rtol=0, atol=1e-12 * n)


@pytest.mark.parametrize("d", [1, 2, 3, 7, 8, 33, 256, 600])
def test_the_rotation_is_the_documented_matrix(d: int) -> None:
    rotation = RandomizedHadamard(SEED, d)
    big = rotation.padded
    expected = hadamard(big) @ np.diag(documented_signs(SEED, big)) / np.sqrt(big)
    columns = np.stack([rotation.rotate(e) for e in np.eye(d)], axis=1)
    np.testing.assert_allclose(columns, expected[:, :d], rtol=0, atol=1e-13)
    # U^T on the whole padded space, then the padding dropped.
    rows = np.stack([rotation.unrotate(e) for e in np.eye(big)], axis=1)
    np.testing.assert_allclose(rows, expected.T[:d, :], rtol=0, atol=1e-13)


vectors = st.integers(min_value=1, max_value=3000).flatmap(
    lambda d: st.tuples(st.just(d), st.integers(0, 2**32 - 1), st.binary(min_size=16, max_size=40))
)


@settings(max_examples=60, deadline=None)
@given(vectors)
def test_orthonormal_with_an_exact_inverse(case: tuple[int, int, bytes]) -> None:
    d, draw, seed = case
    rng = np.random.default_rng(draw)
    x, y = rng.standard_normal(d) * rng.uniform(1e-3, 1e3), rng.standard_normal(d)
    rotation = RandomizedHadamard(seed, d)
    rx, ry = rotation.rotate(x), rotation.rotate(y)
    assert rx.shape == (padded_dimension(d),)
    scale = np.linalg.norm(x)
    # float64 rounding only: a few ulps per butterfly level (log2 D <= 12).
    tolerance = 64 * np.finfo(np.float64).eps
    assert abs(np.linalg.norm(rx) - scale) <= tolerance * scale
    assert abs(rx @ ry - x @ y) <= tolerance * scale * np.linalg.norm(y)
    np.testing.assert_allclose(rotation.unrotate(rx), x, rtol=0, atol=tolerance * scale)


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 11), st.integers(0, 2**32 - 1))
def test_unrotate_then_rotate_is_the_identity_on_a_power_of_two(log: int, draw: int) -> None:
    big = 1 << log
    y = np.random.default_rng(draw).standard_normal(big)
    rotation = RandomizedHadamard(SEED, big)
    np.testing.assert_allclose(rotation.rotate(rotation.unrotate(y)), y, rtol=0, atol=1e-12)


def test_the_signs_come_from_the_seed_alone() -> None:
    x = np.random.default_rng(0).standard_normal(1000)
    same = RandomizedHadamard(SEED, 1000).rotate(x), RandomizedHadamard(SEED, 1000).rotate(x)
    assert np.array_equal(*same)
    other = RandomizedHadamard(SEED[:-1] + b"\xff", 1000).rotate(x)
    longer = RandomizedHadamard(SEED + b"\x00", 1000).rotate(x)
    assert not np.allclose(same[0], other) and not np.allclose(same[0], longer)


def test_the_signs_are_balanced() -> None:
    # 2**16 fair signs: the count of -1 within 6 standard deviations (128) of half.
    signs = documented_signs(b"balanced signs!!", 1 << 16)
    assert abs(int(np.sum(signs < 0)) - (1 << 15)) <= 6 * 128
    e0 = np.zeros(1 << 16)
    e0[0] = 1.0
    # U e_0 = S_00 H e_0 / sqrt(D): the first sign, and nothing else, on every coordinate.
    rotated = RandomizedHadamard(b"balanced signs!!", 1 << 16).rotate(e0)
    np.testing.assert_array_equal(rotated, signs[0] / 256.0)


def test_a_spike_is_spread_evenly() -> None:
    # The point of the rotation: all the norm in one coordinate becomes 1/sqrt(D) on each.
    x = np.zeros(3000)
    x[1234] = 5.0
    rotated = RandomizedHadamard(SEED, 3000).rotate(x)
    np.testing.assert_allclose(np.abs(rotated), 5.0 / np.sqrt(4096), rtol=1e-14)


def test_refusals() -> None:
    with pytest.raises(ParameterValueError, match="at least 16 bytes"):
        RandomizedHadamard(b"short", 10)
    with pytest.raises(ParameterTypeError):
        RandomizedHadamard("not bytes" * 4, 10)  # type: ignore[arg-type]
    with pytest.raises(ParameterValueError):
        RandomizedHadamard(SEED, 0)
    rotation = RandomizedHadamard(SEED, 10)
    with pytest.raises(ParameterValueError, match=r"shape \(10,\)"):
        rotation.rotate(np.zeros(16))
    with pytest.raises(ParameterValueError, match=r"shape \(16,\)"):
        rotation.unrotate(np.zeros(10))


def test_unrotate_leaves_its_input_alone_unless_told() -> None:
    rotation = RandomizedHadamard(SEED, 100)
    y = np.random.default_rng(3).standard_normal(128)
    kept = y.copy()
    expected = rotation.unrotate(y)
    assert np.array_equal(y, kept)  # the default copies
    got = rotation.unrotate(y, overwrite_input=True)
    np.testing.assert_array_equal(got, expected)
    assert np.shares_memory(got, y)  # the transform ran in y itself
