"""Tests for the digits split and the IID / Dirichlet partitioners."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray

import flowerpets.examples.digits as digits_pkg
from flowerpets.examples.digits import (
    DigitsData,
    load_digits_split,
    partition_dirichlet,
    partition_iid,
)

NUM_DIGITS = 1797  # size of sklearn's load_digits


@pytest.fixture(scope="module")
def digits() -> DigitsData:
    return load_digits_split()


def _assert_exact_cover(parts: list[NDArray[np.int64]], num_examples: int) -> None:
    """Each part is sorted int64, and together they hold every index exactly once."""
    for part in parts:
        assert part.dtype == np.int64
        assert part.ndim == 1
        assert np.all(np.diff(part) > 0), "each part must be strictly increasing"
    joined = np.sort(np.concatenate(parts)) if parts else np.empty(0, dtype=np.int64)
    np.testing.assert_array_equal(joined, np.arange(num_examples))


def _sort_rows(a: NDArray[np.float64]) -> NDArray[np.float64]:
    return a[np.lexsort(a.T[::-1])]


def _mean_label_entropy(parts: list[NDArray[np.int64]], labels: NDArray[np.int64]) -> float:
    entropies = []
    for part in parts:
        p = np.bincount(labels[part], minlength=10) / part.size
        p = p[p > 0]
        entropies.append(float(-(p * np.log(p)).sum()))
    return float(np.mean(entropies))


# ---------------------------------------------------------------- load_digits_split


def test_split_shapes_and_dtypes(digits: DigitsData) -> None:
    n_test = math.ceil(0.2 * NUM_DIGITS)  # sklearn rounds the test size up
    assert digits.x_train.shape == (NUM_DIGITS - n_test, 64)
    assert digits.x_test.shape == (n_test, 64)
    assert digits.y_train.shape == (NUM_DIGITS - n_test,)
    assert digits.y_test.shape == (n_test,)
    assert digits.x_train.dtype == np.float32
    assert digits.x_test.dtype == np.float32
    assert digits.y_train.dtype == np.int64
    assert digits.y_test.dtype == np.int64
    assert digits.num_classes == 10


def test_split_values_are_pixels_over_16(digits: DigitsData) -> None:
    for x in (digits.x_train, digits.x_test):
        assert x.min() == 0.0
        assert x.max() == 1.0
        # Every value is an integer intensity 0..16 divided by 16.
        np.testing.assert_array_equal(x * 16, np.round(x * 16))
    for y in (digits.y_train, digits.y_test):
        assert set(np.unique(y).tolist()) == set(range(10))


def test_split_is_a_partition_of_the_whole_dataset(digits: DigitsData) -> None:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    expected = np.column_stack([bunch.data / 16.0, bunch.target])
    got = np.vstack(
        [
            np.column_stack([digits.x_train, digits.y_train]),
            np.column_stack([digits.x_test, digits.y_test]),
        ]
    ).astype(np.float64)
    # Compare as multisets of rows: the dataset contains duplicate images.
    np.testing.assert_array_equal(_sort_rows(got), _sort_rows(expected))


@pytest.mark.parametrize("test_fraction", [0.2, 0.5])
def test_split_is_stratified(test_fraction: float) -> None:
    data = load_digits_split(test_fraction=test_fraction, seed=3)
    train_counts = np.bincount(data.y_train, minlength=10)
    test_counts = np.bincount(data.y_test, minlength=10)
    expected = test_fraction * (train_counts + test_counts)
    # Stratification puts each class within one example of its share; a plain random split
    # would typically be off by several.
    assert np.all(np.abs(test_counts - expected) <= 1.0), (test_counts, expected)


def test_split_is_deterministic_per_seed(digits: DigitsData) -> None:
    again = load_digits_split(seed=0)
    other = load_digits_split(seed=1)
    for name in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(again, name), getattr(digits, name))
    assert not np.array_equal(other.y_test, digits.y_test)


def test_split_arrays_are_read_only(digits: DigitsData) -> None:
    with pytest.raises(ValueError, match="read-only"):
        digits.x_train[0, 0] = 5.0
    with pytest.raises(ValueError, match="read-only"):
        digits.y_test[0] = 3


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_split_rejects_bad_test_fraction(bad: float) -> None:
    with pytest.raises(ValueError, match=rf"test_fraction.*{bad!r}"):
        load_digits_split(test_fraction=bad)


def test_split_without_sklearn_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry in sys.modules makes the import fail as if the package were absent.
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"pip install 'flowerpets\[examples\]'"):
        load_digits_split()


def test_package_all_is_sorted_and_importable() -> None:
    assert digits_pkg.__all__ == sorted(digits_pkg.__all__)
    for name in digits_pkg.__all__:
        assert hasattr(digits_pkg, name)


# ---------------------------------------------------------------- partition_iid


@st.composite
def _iid_args(draw: st.DrawFn) -> tuple[int, int, int]:
    num_examples = draw(st.integers(1, 500))
    num_partitions = draw(st.integers(1, min(num_examples, 40)))
    return num_examples, num_partitions, draw(st.integers(0, 2**32 - 1))


@settings(deadline=None)
@given(_iid_args())
def test_iid_is_an_exact_balanced_cover(args: tuple[int, int, int]) -> None:
    num_examples, num_partitions, seed = args
    parts = partition_iid(num_examples, num_partitions, np.random.default_rng(seed))
    assert len(parts) == num_partitions
    _assert_exact_cover(parts, num_examples)
    sizes = [p.size for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_iid_shuffles_and_is_deterministic() -> None:
    parts = partition_iid(100, 2, np.random.default_rng(7))
    assert not np.array_equal(parts[0], np.arange(50)), "indices were not shuffled"
    again = partition_iid(100, 2, np.random.default_rng(7))
    for a, b in zip(parts, again, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(("num_examples", "num_partitions"), [(10, 0), (10, -1), (3, 4)])
def test_iid_rejects_bad_sizes(num_examples: int, num_partitions: int) -> None:
    with pytest.raises(ValueError, match="num_partitions"):
        partition_iid(num_examples, num_partitions, np.random.default_rng(0))


# ---------------------------------------------------------------- partition_dirichlet

_labels = st.lists(st.integers(0, 9), min_size=1, max_size=300)
_alphas = st.floats(0.01, 100.0)
_seeds = st.integers(0, 2**32 - 1)


@settings(deadline=None)
@given(labels=_labels, num_partitions=st.integers(1, 12), alpha=_alphas, seed=_seeds)
def test_dirichlet_is_an_exact_cover(
    labels: list[int], num_partitions: int, alpha: float, seed: int
) -> None:
    # min_size=0 is always feasible, so this isolates the cover property from resampling.
    parts = partition_dirichlet(
        labels, num_partitions, alpha=alpha, rng=np.random.default_rng(seed), min_size=0
    )
    assert len(parts) == num_partitions
    _assert_exact_cover(parts, len(labels))


@settings(max_examples=60, deadline=None)  # a deadline is a wall-clock assertion
@given(
    labels=st.lists(st.integers(0, 9), min_size=60, max_size=300),
    num_partitions=st.integers(1, 6),
    min_size=st.integers(1, 10),
    alpha=st.floats(0.05, 100.0),
    seed=_seeds,
)
def test_dirichlet_respects_min_size_or_says_it_cannot(
    labels: list[int], num_partitions: int, min_size: int, alpha: float, seed: int
) -> None:
    try:
        parts = partition_dirichlet(
            labels, num_partitions, alpha=alpha, rng=np.random.default_rng(seed), min_size=min_size
        )
    except ValueError as exc:
        # The only acceptable failure is the documented give-up, naming the settings.
        assert f"alpha={alpha}" in str(exc)
        assert f"min_size={min_size}" in str(exc)
        return
    _assert_exact_cover(parts, len(labels))
    assert min(p.size for p in parts) >= min_size


def test_dirichlet_on_digits_meets_min_size(digits: DigitsData) -> None:
    parts = partition_dirichlet(
        digits.y_train, 10, alpha=0.1, rng=np.random.default_rng(0), min_size=10
    )
    _assert_exact_cover(parts, digits.y_train.size)
    assert min(p.size for p in parts) >= 10


def test_small_alpha_is_more_label_skewed_than_iid(digits: DigitsData) -> None:
    y = digits.y_train
    iid, skewed, near_iid = [], [], []
    for seed in range(5):
        rng = np.random.default_rng(seed)
        iid.append(_mean_label_entropy(partition_iid(y.size, 10, rng), y))
        skewed.append(_mean_label_entropy(partition_dirichlet(y, 10, alpha=0.1, rng=rng), y))
        near_iid.append(_mean_label_entropy(partition_dirichlet(y, 10, alpha=100.0, rng=rng), y))
    # Measured: iid ~2.28 nats (log 10 = 2.30), alpha=0.1 ~0.95, alpha=100 ~2.30.
    assert np.mean(skewed) < np.mean(iid) - 0.75
    assert abs(np.mean(near_iid) - np.mean(iid)) < 0.1


def test_dirichlet_is_deterministic(digits: DigitsData) -> None:
    a = partition_dirichlet(digits.y_train, 5, alpha=0.5, rng=np.random.default_rng(1))
    b = partition_dirichlet(digits.y_train, 5, alpha=0.5, rng=np.random.default_rng(1))
    for pa, pb in zip(a, b, strict=True):
        np.testing.assert_array_equal(pa, pb)


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan"), float("inf")])
def test_dirichlet_rejects_bad_alpha(alpha: float) -> None:
    with pytest.raises(ValueError, match="alpha"):
        partition_dirichlet([0, 1, 2, 3], 2, alpha=alpha, rng=np.random.default_rng(0), min_size=1)


def test_dirichlet_rejects_bad_sizes() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="num_partitions"):
        partition_dirichlet([0, 1, 2, 3], 0, alpha=1.0, rng=rng, min_size=0)
    with pytest.raises(ValueError, match=r"7 \* 3 exceeds the 20 labels"):
        partition_dirichlet(list(range(10)) * 2, 7, alpha=1.0, rng=rng, min_size=3)
    with pytest.raises(ValueError, match="min_size"):
        partition_dirichlet([0, 1], 1, alpha=1.0, rng=rng, min_size=-1)
    with pytest.raises(ValueError, match="1-D"):
        partition_dirichlet(np.zeros((4, 2)), 2, alpha=1.0, rng=rng, min_size=0)


def test_dirichlet_gives_up_on_infeasible_skew() -> None:
    # One class of 20 split 10/10 needs a share in [0.5, 0.55); Dirichlet(0.01, 0.01) almost
    # never draws one, so every try fails.
    with pytest.raises(ValueError, match=r"alpha=0\.01 with min_size=10 looks infeasible"):
        partition_dirichlet([0] * 20, 2, alpha=0.01, rng=np.random.default_rng(0), min_size=10)
