"""Records: typed writes, immutable arrays, copies that do not alias."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from flowerpets import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flowerpets.core import ArrayLayout
from flowerpets.core.codec import decode_array, encode_array
from flowerpets.exceptions import RecordTypeError

NUMERIC_DTYPES = [
    "bool",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "float16",
    "float32",
    "float64",
    "complex64",
    "complex128",
]


@pytest.mark.parametrize("dtype", NUMERIC_DTYPES)
def test_array_holds_every_numeric_dtype_and_is_read_only(dtype: str) -> None:
    source = np.arange(6).reshape(2, 3).astype(dtype)
    array = Array(source)
    assert array.dtype == np.dtype(dtype)
    assert array.shape == (2, 3)
    with pytest.raises(ValueError, match="read-only"):
        array.numpy()[0, 0] = 1


def test_array_copies_by_default_so_later_writes_do_not_leak_in() -> None:
    source = np.zeros(4, dtype=np.float32)
    array = Array(source)
    source[0] = 7
    assert array.numpy()[0] == 0


def test_array_without_copy_shares_memory_but_still_refuses_writes() -> None:
    source = np.zeros(4, dtype=np.float32)
    array = Array(source, copy=False)
    assert np.shares_memory(array.numpy(), source)
    with pytest.raises(ValueError):
        array.numpy()[0] = 1


def test_array_makes_non_contiguous_input_contiguous() -> None:
    source = np.arange(12, dtype=np.int32).reshape(3, 4).T
    array = Array(source, copy=False)
    assert array.numpy().flags.c_contiguous
    np.testing.assert_array_equal(array.numpy(), source)


@pytest.mark.parametrize("bad", [np.array(["a", "b"]), np.array([object()]), [b"x"]])
def test_array_refuses_non_numeric_dtypes(bad: object) -> None:
    with pytest.raises(RecordTypeError, match="numeric"):
        Array(bad)  # type: ignore[arg-type]


def test_array_equality_compares_dtype_shape_and_values_with_nan() -> None:
    a = Array(np.array([1.0, np.nan]))
    assert a == Array(np.array([1.0, np.nan]))
    assert a != Array(np.array([1.0, np.nan], dtype=np.float32))
    assert a != Array(np.array([[1.0, np.nan]]))
    assert a != Array(np.array([2.0, np.nan]))


@given(hnp.arrays(dtype=hnp.scalar_dtypes(), shape=hnp.array_shapes(min_dims=0, max_dims=4)))
def test_array_byte_encoding_round_trips(data: np.ndarray) -> None:
    if data.dtype.kind not in "biufc":
        return
    array = Array(data)
    assert decode_array(encode_array(array)) == array


def test_array_byte_encoding_is_stable_across_byte_orders() -> None:
    little = Array(np.arange(5, dtype="<i4"))
    big = Array(np.arange(5, dtype=">i4"))
    assert big == little and big.dtype.isnative
    assert encode_array(little) == encode_array(big)


def test_array_record_keeps_order_and_wraps_numpy() -> None:
    record = ArrayRecord()
    record["z"] = np.ones(2)
    record["a"] = Array(np.zeros(3))
    assert list(record) == ["z", "a"]
    assert isinstance(record["z"], Array)
    assert record.num_parameters == 5
    assert record.layout() == ArrayLayout(("z", "a"), ((2,), (3,)), ("<f8", "<f8"))


@pytest.mark.parametrize("value", [[1, 2], 3.0, "x", None])
def test_array_record_refuses_non_arrays(value: object) -> None:
    with pytest.raises(RecordTypeError, match="ArrayRecord\\['w'\\]"):
        ArrayRecord({"w": value})


@pytest.mark.parametrize("key", ["", 3, None, b"k"])
def test_records_refuse_bad_keys(key: object) -> None:
    for record in (ArrayRecord(), MetricRecord(), ConfigRecord(), RecordDict()):
        with pytest.raises(RecordTypeError, match="keys"):
            record[key] = 1  # type: ignore[index]


def test_metric_record_accepts_numbers_and_lists_of_one_type() -> None:
    record = MetricRecord({"n": np.int64(3), "loss": np.float32(0.5), "hist": [1, 2, 3]})
    assert record["n"] == 3 and type(record["n"]) is int
    assert type(record["loss"]) is float
    assert record["hist"] == [1, 2, 3]


@pytest.mark.parametrize(
    "value", [True, "0.5", b"1", [1, 2.0], [True, False], {"a": 1}, None, np.zeros(2)]
)
def test_metric_record_refuses_other_values(value: object) -> None:
    with pytest.raises(RecordTypeError, match="MetricRecord"):
        MetricRecord({"m": value})


def test_config_record_keeps_bool_distinct_from_int() -> None:
    record = ConfigRecord({"flag": True, "n": 1, "names": ["a", "b"], "blob": b"\x00"})
    assert record["flag"] is True
    assert type(record["n"]) is int
    with pytest.raises(RecordTypeError, match="mix"):
        record["mixed"] = [1, True]
    with pytest.raises(RecordTypeError, match="ConfigRecord"):
        record["obj"] = object()


def test_record_dict_holds_records_only_and_checks_types_on_read() -> None:
    content = RecordDict({"arrays": ArrayRecord(), "metrics": MetricRecord()})
    with pytest.raises(RecordTypeError, match="RecordDict"):
        content["raw"] = {"a": 1}
    assert content.get_typed("arrays", ArrayRecord) is content["arrays"]
    with pytest.raises(RecordTypeError, match="expected ConfigRecord"):
        content.get_typed("arrays", ConfigRecord)
    with pytest.raises(KeyError, match="no ConfigRecord named 'config'"):
        content.get_typed("config", ConfigRecord)
    assert set(content.array_records) == {"arrays"}
    assert set(content.metric_records) == {"metrics"}


@given(st.dictionaries(st.text(min_size=1, max_size=5), st.integers(-10, 10), max_size=5))
def test_deep_copy_does_not_alias_mappings(values: dict[str, int]) -> None:
    original = RecordDict({"config": ConfigRecord(values)})
    clone = original.deep_copy()
    added = "added" + "".join(values)  # a key the drawn values cannot hold
    clone.get_typed("config", ConfigRecord)[added] = 1
    assert added not in original.get_typed("config", ConfigRecord)
    assert clone.get_typed("config", ConfigRecord) != original.get_typed("config", ConfigRecord)
