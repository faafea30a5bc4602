"""Scikit-learn's 8x8 handwritten digits, split and partitioned across simulated clients."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from numpy.typing import ArrayLike, NDArray

from flowerpets._validation import integer, real
from flowerpets.exceptions import MissingDependencyError, ParameterValueError

__all__ = ["DigitsData", "load_digits_split", "partition_dirichlet", "partition_iid"]

NUM_CLASSES = 10
NUM_FEATURES = 64
# Pixel intensities in load_digits are integers 0..16.
_MAX_PIXEL = 16.0
# Resampling bound for partition_dirichlet: past this, the settings are treated as infeasible.
_MAX_DIRICHLET_TRIES = 100

_S = TypeVar("_S", bound=np.generic)


# eq=False: the generated __eq__ would compare arrays elementwise and raise on truth-testing.
@dataclass(frozen=True, eq=False)
class DigitsData:
    """A train/test split of the digits: x is float32 (n, 64) in [0, 1], y is int64 in 0..9.

    The arrays are read-only, so clients sharing one split cannot corrupt each other's data.
    """

    x_train: NDArray[np.float32]
    y_train: NDArray[np.int64]
    x_test: NDArray[np.float32]
    y_test: NDArray[np.int64]

    @property
    def num_classes(self) -> int:
        """Number of label classes (10)."""
        return NUM_CLASSES


def load_digits_split(*, test_fraction: float = 0.2, seed: int = 0) -> DigitsData:
    """Load the digits bundled with scikit-learn and split them, stratified by label."""
    real("test_fraction", test_fraction, above=0, below=1)  # NaN never passes
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:
        raise MissingDependencyError(
            "the digits example needs scikit-learn; install the examples extra with "
            "pip install 'flowerpets[examples]'"
        ) from exc

    bunch = load_digits()
    x = np.asarray(bunch.data, dtype=np.float32) / np.float32(_MAX_PIXEL)
    y = np.asarray(bunch.target, dtype=np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    return DigitsData(
        x_train=_frozen(np.ascontiguousarray(x_train, dtype=np.float32)),
        y_train=_frozen(np.ascontiguousarray(y_train, dtype=np.int64)),
        x_test=_frozen(np.ascontiguousarray(x_test, dtype=np.float32)),
        y_test=_frozen(np.ascontiguousarray(y_test, dtype=np.int64)),
    )


def partition_iid(
    num_examples: int, num_partitions: int, rng: np.random.Generator
) -> list[NDArray[np.int64]]:
    """Shuffle ``range(num_examples)`` into ``num_partitions`` sorted parts.

    Part sizes differ by at most one.
    """
    integer("num_partitions", num_partitions, at_least=1)
    # An empty partition would be a client with nothing to train on.
    if num_examples < num_partitions:
        raise ParameterValueError(
            f"num_examples ({num_examples}) must be >= num_partitions ({num_partitions})"
        )
    order = rng.permutation(num_examples).astype(np.int64)
    return [np.sort(part) for part in np.array_split(order, num_partitions)]


def partition_dirichlet(
    labels: ArrayLike,
    num_partitions: int,
    *,
    alpha: float,
    rng: np.random.Generator,
    min_size: int = 10,
) -> list[NDArray[np.int64]]:
    """Label-skewed split: each class is divided among partitions by Dirichlet(alpha) shares.

    Smaller ``alpha`` gives more skew. The whole draw is repeated until every partition holds
    at least ``min_size`` examples; a ValueError is raised if that does not happen within a
    bounded number of tries.
    """
    labels_arr = np.asarray(labels)
    if labels_arr.ndim != 1:
        raise ParameterValueError(f"labels must be 1-D, got shape {labels_arr.shape}")
    real("alpha", alpha, above=0)
    integer("num_partitions", num_partitions, at_least=1)
    integer("min_size", min_size, at_least=0)
    num_examples = labels_arr.shape[0]
    if num_partitions * min_size > num_examples:
        raise ParameterValueError(
            f"num_partitions * min_size = {num_partitions} * {min_size} exceeds the "
            f"{num_examples} labels"
        )

    _, inverse = np.unique(labels_arr, return_inverse=True)
    by_class = [np.flatnonzero(inverse == c) for c in range(int(inverse.max(initial=-1)) + 1)]
    concentration = np.full(num_partitions, alpha)
    for _ in range(_MAX_DIRICHLET_TRIES):
        # Seeded with an empty array so that concatenating a partition with no chunks works.
        parts = [[np.empty(0, dtype=np.intp)] for _ in range(num_partitions)]
        for members in by_class:
            shuffled = rng.permutation(members)
            shares = rng.dirichlet(concentration)
            # Drop the last cut so the final chunk absorbs rounding and every index is used.
            cuts = (np.cumsum(shares)[:-1] * shuffled.size).astype(np.intp)
            for part, chunk in zip(parts, np.split(shuffled, cuts), strict=True):
                part.append(chunk)
        merged = [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
        if min(m.size for m in merged) >= min_size:
            return merged
    raise ParameterValueError(
        f"partition_dirichlet: alpha={alpha} with min_size={min_size} looks infeasible: no draw "
        f"in {_MAX_DIRICHLET_TRIES} tries gave all {num_partitions} partitions of "
        f"{num_examples} examples at least min_size each; raise alpha or lower min_size"
    )


def _frozen(arr: NDArray[_S]) -> NDArray[_S]:
    arr.flags.writeable = False
    return arr
