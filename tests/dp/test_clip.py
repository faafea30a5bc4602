"""L2 clipping: the bound holds after the cast, small updates pass unchanged, bad input fails."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from flowerpets.core import ArrayRecord
from flowerpets.dp._primitives.clip import clip_update, enforce_clip, global_norm, update_between
from flowerpets.exceptions import InvalidUpdateError, ParameterValueError


def test_global_norm_concatenates_arrays() -> None:
    assert global_norm({"a": np.array([3.0]), "b": np.array([[4.0]])}) == 5.0
    assert global_norm({}) == 0.0
    huge = {"a": np.full(4, 1e200)}  # the squares overflow; the norm does not
    assert global_norm(huge) == pytest.approx(2e200)
    assert global_norm({"a": np.array([np.inf])}) == math.inf


def test_global_norm_of_a_tiny_update_is_exact_where_its_squares_underflow() -> None:
    # The squares of 3.3e-160 fall into the subnormals (their sum was 3.4e-6 off relative);
    # those of 1e-170 underflow to zero (the norm was 0). Scaled first, both are exact.
    for value in (3.32470381e-160, 1e-170):
        assert global_norm({"a": np.array([value]), "b": np.zeros(2)}) == value
    assert global_norm({"a": np.array([3e-170, 0.0, 4e-170])}) == pytest.approx(5e-170, rel=1e-15)
    assert global_norm({"a": np.zeros(3)}) == 0.0


def test_large_update_is_scaled_to_the_clip_in_its_direction() -> None:
    update = {"w": np.array([3.0, 4.0]), "b": np.array([12.0])}  # norm 13
    clipped = clip_update(update, 1.3)
    assert clipped.norm == 13.0 and not clipped.unclipped
    np.testing.assert_allclose(clipped.arrays["w"], [0.3, 0.4])
    np.testing.assert_allclose(clipped.arrays["b"], [1.2])
    assert global_norm(clipped.arrays) <= 1.3


def test_small_update_is_returned_exactly_and_counts_as_unclipped() -> None:
    update = {"w": np.array([0.1, -0.2])}
    clipped = clip_update(update, 1.0)
    assert clipped.unclipped
    assert np.array_equal(clipped.arrays["w"], update["w"])
    at_clip = clip_update({"w": np.array([3.0, 4.0])}, 5.0)
    assert at_clip.unclipped  # "at most C" counts as unclipped (Andrew et al.)


float_arrays = arrays(
    np.float64,
    st.integers(1, 64),
    elements=st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False),
)


@settings(max_examples=200, deadline=None)
@given(float_arrays, float_arrays, st.floats(1e-6, 1e4), st.sampled_from(["float32", "float64"]))
def test_clipped_norm_never_exceeds_the_clip_after_the_cast(
    a: np.ndarray, b: np.ndarray, clip: float, dtype: str
) -> None:
    clipped = clip_update({"a": a, "b": b}, clip, dtypes={"a": np.dtype(dtype), "b": None})  # type: ignore[dict-item]
    assert clipped.arrays["a"].dtype == np.dtype(dtype)
    assert clipped.arrays["b"].dtype == np.float64  # no dtype given: float64
    assert global_norm(clipped.arrays) <= clip
    norm = global_norm({"a": a, "b": b})
    if norm > 0:
        # Same direction: the result is a non-negative multiple of the update.
        factor = global_norm(clipped.arrays) / norm
        np.testing.assert_allclose(clipped.arrays["b"], b * factor, rtol=1e-5, atol=1e-30)


def test_rounding_up_in_float32_is_caught() -> None:
    # Updates scaled to norm 1 in float64 whose float32 cast has a norm above 1.
    rng = np.random.default_rng(0)
    caught = 0
    for _ in range(50):
        x = rng.standard_normal(1000) * 5.0  # norm ~ 158: clipped
        naive = (x / global_norm({"x": x})).astype(np.float32)
        if global_norm({"x": naive}) > 1.0:
            caught += 1
            clipped = clip_update({"x": x}, 1.0, dtypes={"x": np.dtype(np.float32)})
            assert global_norm(clipped.arrays) <= 1.0
    assert caught > 5  # the naive cast really does overshoot, often


def test_integer_targets_become_float64() -> None:
    clipped = clip_update({"n": np.array([10.0, 0.0])}, 1.0, dtypes={"n": np.dtype(np.int32)})
    assert clipped.arrays["n"].dtype == np.float64
    np.testing.assert_allclose(clipped.arrays["n"], [1.0, 0.0])


@pytest.mark.parametrize("clip", [0.0, -1.0, math.nan, math.inf])
def test_nonsense_clips_are_refused(clip: float) -> None:
    with pytest.raises(ParameterValueError, match=r"clip must be a (finite )?number") as refused:
        clip_update({"w": np.ones(2)}, clip)
    assert "got" not in str(refused.value)  # the clip may be learnt from data: never shown


def test_non_finite_updates_are_refused() -> None:
    with pytest.raises(InvalidUpdateError, match="NaN or infinite"):
        clip_update({"w": np.array([np.nan, 1.0])}, 1.0)


def test_update_between_is_the_exact_float64_difference() -> None:
    received = ArrayRecord({"w": np.array([1.0, 2.0], dtype=np.float32)})
    new = ArrayRecord({"w": np.array([1.5, 1.0], dtype=np.float32)})
    update = update_between(new, received)
    assert update["w"].dtype == np.float64
    assert update["w"].tolist() == [0.5, -1.0]


@pytest.mark.parametrize(
    ("new", "match"),
    [
        ({"w": np.zeros(3)}, "do not match"),
        ({"v": np.zeros(2)}, "do not match"),
        ({"w": np.array([np.nan, 0.0])}, "NaN or infinite"),
        ({"w": np.array([1.0 + 1j, 0.0])}, "not real-valued"),
    ],
)
def test_update_between_refuses_bad_replies(new: dict[str, np.ndarray], match: str) -> None:
    received = ArrayRecord({"w": np.zeros(2)})
    with pytest.raises(InvalidUpdateError, match=match):
        update_between(ArrayRecord(new), received)


@settings(max_examples=200, deadline=None)
@given(float_arrays, st.floats(1e-6, 1e4), st.sampled_from(["float32", "float64"]))
def test_the_servers_check_keeps_every_honest_clip_and_refuses_a_larger_norm(
    a: np.ndarray, clip: float, dtype: str
) -> None:
    dtypes = {"a": np.dtype(dtype)}
    honest = clip_update({"a": a}, clip, dtypes=dtypes).arrays
    kept = enforce_clip(honest, clip, dtypes=dtypes)
    assert kept is not None and global_norm(kept) <= clip
    norm = global_norm({"a": a})
    if norm > 0:
        above = {"a": a * (clip * (1 + 1e-6) / norm)}
        assert enforce_clip(above, clip) is None
