"""ArrayLayout: one description of names, shapes and dtypes, with a stable encoding."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from flowerpets.core import ArrayLayout, ArrayRecord
from flowerpets.he._primitives.packing import Layout

ARRAYS = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3)}
# Pinned: HE's wire header carries this encoding and digest, so it must never drift.
DIGEST = "6db1ee577c4cc26548474454f9b877a41aaec05ab91e434e5db6b1abf480f6d1"


def test_encoding_is_pinned() -> None:
    layout = ArrayLayout.of(ARRAYS)
    assert layout.to_json() == [["w", "<f4", [2, 3]], ["b", "<f8", [3]]]
    text = json.dumps(layout.to_json(), separators=(",", ":"))
    assert layout.digest() == hashlib.sha256(text.encode()).hexdigest() == DIGEST


def test_he_layout_encodes_as_the_core_layout() -> None:
    he = Layout.of(ARRAYS, ["w", "b"])
    assert he.arrays == ArrayLayout.of(ARRAYS)
    assert he.to_json() == he.arrays.to_json()
    assert he.digest() == DIGEST
    assert Layout.from_json(he.to_json()) == he


def test_of_keeps_order_and_selects_names() -> None:
    layout = ArrayLayout.of(ARRAYS, ["b"])
    assert layout == ArrayLayout(("b",), ((3,),), ("<f8",))
    assert ArrayLayout.of(ARRAYS).named_shapes == (("w", (2, 3)), ("b", (3,)))
    assert ArrayLayout.of(ARRAYS).shape_map() == {"w": (2, 3), "b": (3,)}
    assert (ArrayLayout.of(ARRAYS).size, ArrayLayout.of(ARRAYS).sizes) == (9, (6, 3))


def test_array_record_layout() -> None:
    record = ArrayRecord({"w": np.zeros((2, 3), np.float32), "b": np.zeros(3)})
    assert record.layout() == ArrayLayout.of(ARRAYS)


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ((("a", "a"), ((1,), (1,)), ("<f4", "<f4")), ValueError, "once"),
        ((("a",), ((1,), (2,)), ("<f4",)), ValueError, "one shape and one dtype"),
        ((("a",), ((-1,),), ("<f4",)), ValueError, "shape"),
        ((("a",), ((True,),), ("<f4",)), ValueError, "shape"),
        ((("a",), ([1],), ("<f4",)), ValueError, "shape"),
        (((1,), ((1,),), ("<f4",)), TypeError, "str"),
        ((("a",), ((1,),), (np.float32,)), TypeError, "dtype"),
    ],
)
def test_refuses_malformed(args: tuple[object, ...], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        ArrayLayout(*args)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "value", [{}, [["a", "<f4"]], [["a", "<f4", 3]], [[1, "<f4", [3]]], [["a", "<f4", [-1]]]]
)
def test_from_json_refuses_malformed(value: object) -> None:
    with pytest.raises(ValueError):
        ArrayLayout.from_json(value)


@given(
    st.lists(
        st.tuples(
            st.text(min_size=1, max_size=5),
            st.sampled_from(["<f4", "<f8", "<i8", "|b1"]),
            st.lists(st.integers(0, 9), max_size=3).map(tuple),
        ),
        max_size=5,
        unique_by=lambda t: t[0],
    )
)
def test_json_round_trip(items: list[tuple[str, str, tuple[int, ...]]]) -> None:
    layout = ArrayLayout(
        tuple(n for n, _, _ in items), tuple(s for _, _, s in items), tuple(d for _, d, _ in items)
    )
    again = ArrayLayout.from_json(json.loads(json.dumps(layout.to_json())))
    assert again == layout
    assert again.digest() == layout.digest()
