"""Streaming weighted sums: exact where they can be, and a bad update changes nothing."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from flowerpets import ArrayRecord, MetricRecord
from flowerpets.core import MetricMean, WeightedSum
from flowerpets.exceptions import InvalidUpdateError

floats = st.floats(-1e6, 1e6, allow_nan=False, width=32)


@given(
    st.lists(
        st.tuples(hnp.arrays(np.float32, (3, 2), elements=floats), st.integers(0, 1000)),
        min_size=1,
        max_size=8,
    )
)
def test_weighted_sum_matches_numpy(updates: list[tuple[np.ndarray, int]]) -> None:
    total = WeightedSum()
    for x, w in updates:
        total.add(ArrayRecord({"w": x}), w)
    expected = sum(w * x.astype(np.float64) for x, w in updates)
    np.testing.assert_allclose(total.result()["w"].numpy(), expected, rtol=1e-12, atol=1e-6)
    assert total.total_weight == sum(w for _, w in updates)
    assert total.count == len(updates)


@given(
    st.lists(
        hnp.arrays(np.int64, 5, elements=st.integers(-(2**40), 2**40)), min_size=1, max_size=10
    )
)
def test_integer_sums_are_exact(histograms: list[np.ndarray]) -> None:
    total = WeightedSum()
    for h in histograms:
        total.add(ArrayRecord({"h": h}), 1)
    result = total.result()["h"].numpy()
    assert result.dtype == np.int64
    assert result.tolist() == [sum(int(h[i]) for h in histograms) for i in range(5)]


@pytest.mark.parametrize(
    ("update", "weight", "message"),
    [
        ({"w": np.array([1.0, np.nan, 0, 0])}, 1, "NaN or infinite"),
        ({"w": np.array([np.inf, 0, 0, 0])}, 1, "NaN or infinite"),
        ({"w": np.zeros(3)}, 1, "expected names and shapes"),
        ({"v": np.zeros(4)}, 1, "expected names and shapes"),
        ({"w": np.zeros(4), "b": np.zeros(1)}, 1, "expected names and shapes"),
        ({"w": np.zeros(4)}, -1, "finite and >= 0"),
        ({"w": np.zeros(4)}, float("nan"), "finite and >= 0"),
        ({"w": np.zeros(4)}, True, "must be a number"),
    ],
)
def test_bad_update_is_refused_and_leaves_the_sum_untouched(
    update: dict[str, np.ndarray], weight: float, message: str
) -> None:
    total = WeightedSum(expected=ArrayRecord({"w": np.zeros(4)}))
    total.add(ArrayRecord({"w": np.arange(4.0)}), 2)
    before = total.result()["w"].numpy().copy()
    with pytest.raises(InvalidUpdateError, match=message):
        total.add(ArrayRecord(update), weight)
    np.testing.assert_array_equal(total.result()["w"].numpy(), before)
    assert total.total_weight == 2 and total.count == 1


def test_first_update_fixes_the_shape_without_expected() -> None:
    total = WeightedSum()
    total.add(ArrayRecord({"w": np.zeros(2)}))
    with pytest.raises(InvalidUpdateError):
        total.add(ArrayRecord({"w": np.zeros(3)}))


def test_integer_sum_becomes_float_when_a_float_weight_arrives() -> None:
    total = WeightedSum()
    total.add(ArrayRecord({"h": np.array([1, 2])}), 1)
    total.add(ArrayRecord({"h": np.array([1, 1])}), 0.5)
    np.testing.assert_allclose(total.result()["h"].numpy(), [1.5, 2.5])


def test_metric_mean_weights_metrics_and_sums_the_weight_key() -> None:
    mean = MetricMean(weight_key="num-examples")
    mean.add(MetricRecord({"num-examples": 10, "loss": 1.0, "hist": [1, 2]}), 10)
    mean.add(MetricRecord({"num-examples": 30, "loss": 3.0, "acc": 0.5}), 30)
    out = mean.result()
    assert out["num-examples"] == 40
    assert out["loss"] == pytest.approx((10 * 1 + 30 * 3) / 40)
    assert out["acc"] == 0.5
    assert "hist" not in out
