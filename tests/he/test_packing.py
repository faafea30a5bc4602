"""Flat packing across arrays, chunking by slot count, and the layout's wire form."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowerpets.core import ArrayLayout
from flowerpets.exceptions import InvalidUpdateError
from flowerpets.he._primitives.packing import Layout, chunk_views, peak, select_names


def _model() -> dict[str, np.ndarray]:
    return {
        "fc1.weight": np.arange(12, dtype=np.float32).reshape(3, 4),
        "fc1.bias": np.ones(3, dtype=np.float32),
        "fc2.weight": np.full((2, 2), 0.5),
        "steps": np.array([7], dtype=np.int64),
    }


def test_select_names_exact_and_glob_in_model_order() -> None:
    names = list(_model())
    assert select_names(names, ["*"]) == tuple(names)
    assert select_names(names, ["fc*.weight"]) == ("fc1.weight", "fc2.weight")
    assert select_names(names, ["fc2.weight", "fc1.bias"]) == ("fc1.bias", "fc2.weight")
    with pytest.raises(ValueError, match=r"\['fc3\*'\] match no array"):
        select_names(names, ["fc1.bias", "fc3*"])


def test_layout_packs_all_arrays_into_one_vector_in_order() -> None:
    model = _model()
    layout = Layout.of(model, ["fc2.weight", "fc1.weight", "fc1.bias"])
    assert layout.names == ("fc1.weight", "fc1.bias", "fc2.weight")
    assert layout.size == 12 + 3 + 4
    flat = layout.pack({n: model[n] for n in layout.names}, weight=2.0)
    expected = 2.0 * np.concatenate([model[n].ravel() for n in layout.names])
    np.testing.assert_array_equal(flat, expected)
    # Small arrays share ciphertexts: 19 values in chunks of 8 are 3 ciphertexts, not 3 + 1 + 1.
    assert layout.chunk_sizes(8) == [8, 8, 3] and layout.chunk_count(8) == 3
    assert [c.size for c in chunk_views(flat, 8)] == [8, 8, 3]
    out = layout.unpack(flat, divisor=2.0)
    for name in layout.names:
        assert out[name].dtype == model[name].dtype and out[name].shape == model[name].shape
        np.testing.assert_array_equal(out[name], model[name])


def test_weighting_is_done_in_float64() -> None:
    # float32 values times a weight: the product must not be rounded to float32 first.
    values = np.array([0.1, 1 / 3, 2.7182817], dtype=np.float32)
    layout = Layout.of({"v": values}, ["v"])
    flat = layout.pack({"v": values}, weight=123.456)
    np.testing.assert_array_equal(flat, values.astype(np.float64) * 123.456)


def test_pack_missing_names_are_zeros_unknown_and_bad_shapes_refused() -> None:
    layout = Layout.of(_model(), ["fc1.bias", "fc2.weight"])
    flat = layout.pack({"fc2.weight": np.ones((2, 2))})
    np.testing.assert_array_equal(flat, [0, 0, 0, 1, 1, 1, 1])
    with pytest.raises(KeyError, match="steps"):
        layout.pack({"steps": np.ones(1)})
    with pytest.raises(InvalidUpdateError, match="shape"):
        layout.pack({"fc1.bias": np.ones(4)})
    with pytest.raises(InvalidUpdateError, match="no arrays named"):
        Layout.of(_model(), ["nope"])


def test_peak_refuses_nan_and_inf() -> None:
    assert peak(np.array([1.0, -3.0, 2.0])) == 3.0
    assert peak(np.empty(0)) == 0.0
    for bad in (np.nan, np.inf, -np.inf):
        with pytest.raises(InvalidUpdateError, match="NaN or infinite"):
            peak(np.array([0.0, bad, 1.0]))


@pytest.mark.parametrize(
    ("entries", "match"),
    [
        ((("steps", "<i8", (1,)),), "only floating-point"),
        ((("he.x", "<f4", (1,)),), "reserved"),
        ((("", "<f4", (1,)),), "empty"),
        ((("a", "<f4", (1,)), ("a", "<f4", (2,))), "once"),
        ((("a", "<f4", (-1,)),), "shape"),
        ((("a", ">f4", (1,)),), "floating-point"),
    ],
)
def test_invalid_layouts_are_refused(
    entries: tuple[tuple[str, str, tuple[int, ...]], ...], match: str
) -> None:
    names, dtypes, shapes = zip(*entries, strict=True)
    with pytest.raises(ValueError, match=match):
        Layout(ArrayLayout(names, shapes, dtypes))


def test_layout_json_round_trip_and_digest() -> None:
    layout = Layout.of(_model(), ["fc1.weight", "fc1.bias"])
    text = json.dumps(layout.to_json())
    again = Layout.from_json(json.loads(text))
    assert again == layout and again.digest() == layout.digest()
    assert Layout.of(_model(), ["fc1.weight"]).digest() != layout.digest()
    for bad in ({}, [["a", "<f4"]], [["a", "<f4", "3"]], [[1, "<f4", [3]]], "x"):
        with pytest.raises(ValueError):
            Layout.from_json(bad)


shapes = st.lists(
    st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple), min_size=1, max_size=5
)


@settings(max_examples=60, deadline=None)
@given(
    shapes=shapes,
    weight=st.floats(0.01, 1000),
    seed=st.integers(0, 2**32 - 1),
    slots=st.integers(1, 17),
)
def test_pack_unpack_round_trip(
    shapes: list[tuple[int, ...]], weight: float, seed: int, slots: int
) -> None:
    rng = np.random.default_rng(seed)
    arrays = {f"a{i}": rng.standard_normal(shape) for i, shape in enumerate(shapes)}
    layout = Layout.of(arrays, list(arrays))
    flat = layout.pack(arrays, weight)
    assert flat.size == sum(a.size for a in arrays.values())
    chunks = list(chunk_views(flat, slots))
    assert [c.size for c in chunks] == layout.chunk_sizes(slots)
    assert len(chunks) == -(-flat.size // slots)
    out = layout.unpack(np.concatenate(chunks) if chunks else flat, divisor=weight)
    for name, array in arrays.items():
        np.testing.assert_allclose(out[name], array, rtol=1e-12, atol=1e-300)
