"""ours -> flwr -> ours is the identity for records, metadata, errors and state (hypothesis)."""

from __future__ import annotations

import string

import numpy as np
import pytest
from flwr import app as fl
from flwr.app.metadata import validate_message_type
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from flowerpets.core import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    ErrorCode,
    Message,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flowerpets.exceptions import CodecError, RecordTypeError
from flowerpets.flower import messages as fm
from flowerpets.flower.records import (
    Session,
    array_from_flwr,
    array_to_flwr,
    recorddict_from_flwr,
    recorddict_to_flwr,
)

DTYPES = [
    np.dtype(t)
    for t in ("?", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8", "c8", "c16")
]
INT64 = st.integers(-(2**63), 2**63 - 1)  # what flwr's wire carries (sint64)
FLOATS = st.floats(allow_nan=False, width=64)
TEXT = st.text(max_size=12)
KEYS = st.text(min_size=1, max_size=8)

arrays = st.sampled_from(DTYPES).flatmap(
    lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))
)


def _lists(elem: st.SearchStrategy[object]) -> st.SearchStrategy[list[object]]:
    return st.lists(elem, max_size=4)


config_values = st.one_of(
    INT64, FLOATS, TEXT, st.binary(max_size=16), st.booleans(),
    _lists(INT64), _lists(FLOATS), _lists(TEXT), _lists(st.binary(max_size=8)),
    _lists(st.booleans()),
)  # fmt: skip
metric_values = st.one_of(INT64, FLOATS, _lists(INT64), _lists(FLOATS))

array_records = st.dictionaries(KEYS, arrays, max_size=3).map(
    lambda d: ArrayRecord({k: Array(v) for k, v in d.items()})
)
config_records = st.dictionaries(KEYS, config_values, max_size=4).map(ConfigRecord)
metric_records = st.dictionaries(KEYS, metric_values, max_size=4).map(MetricRecord)
record_dicts = st.dictionaries(
    KEYS, st.one_of(array_records, config_records, metric_records), max_size=4
).map(RecordDict)


def _same_types(a: RecordDict, b: RecordDict) -> None:
    """== compares values; also check no int became a float or a bool an int."""
    for name, rec in a.items():
        if isinstance(rec, ArrayRecord):
            continue
        for key, value in rec.items():
            other = b[name][key]  # type: ignore[index]
            kinds = [type(v) for v in (value if isinstance(value, list) else [value])]
            assert kinds == [type(v) for v in (other if isinstance(other, list) else [other])]


@settings(max_examples=100, deadline=None)
@given(record_dicts)
def test_recorddict_round_trip_is_identity(records: RecordDict) -> None:
    back = recorddict_from_flwr(recorddict_to_flwr(records))
    assert back == records
    _same_types(records, back)


@settings(max_examples=60, deadline=None)
@given(record_dicts)
def test_recorddict_round_trip_through_flwrs_wire_is_identity(records: RecordDict) -> None:
    """Through flwr's own protobuf serde, as a SuperLink carries it."""
    wire = recorddict_from_proto(recorddict_to_proto(recorddict_to_flwr(records)))
    back = recorddict_from_flwr(wire)
    assert back == records
    _same_types(records, back)


@settings(max_examples=100, deadline=None)
@given(arrays)
def test_our_arrays_read_by_flwr_are_the_same_values(value: np.ndarray) -> None:
    theirs = array_to_flwr(Array(value)).numpy()  # flwr's own reader (np.load)
    assert theirs.dtype == value.dtype and theirs.shape == value.shape
    np.testing.assert_array_equal(theirs, value)


@settings(max_examples=100, deadline=None)
@given(arrays)
def test_flwr_arrays_are_read_without_copying(value: np.ndarray) -> None:
    theirs = fl.Array(value)  # flwr's own writer (np.save)
    ours = array_from_flwr(theirs)
    assert ours == Array(value)
    if value.size:
        raw = np.frombuffer(theirs.data, dtype=np.uint8)
        assert np.shares_memory(ours.numpy(), raw)
    assert not ours.numpy().flags.writeable


def test_an_array_forwarded_within_a_session_is_not_copied_again() -> None:
    theirs = fl.Array(np.arange(5.0))
    session = Session()
    ours = array_from_flwr(theirs, session)
    assert array_to_flwr(ours, session) is theirs
    assert array_to_flwr(Array(ours.numpy() + 1), session) is not theirs


def test_fortran_and_big_endian_flwr_arrays_are_read_by_value() -> None:
    value = np.asfortranarray(np.arange(6.0).reshape(2, 3)).astype(">f8")
    ours = array_from_flwr(fl.Array(value))
    np.testing.assert_array_equal(ours.numpy(), value)


@pytest.mark.parametrize(
    ("array", "error"),
    [
        (fl.Array(dtype="float64", shape=(1,), stype="torch.raw", data=b"\0" * 8), RecordTypeError),
        (fl.Array(dtype="float64", shape=(2,), stype="numpy.ndarray", data=b"junk"), CodecError),
        (fl.Array(np.array(["a", "b"])), RecordTypeError),
    ],
)
def test_unreadable_flwr_arrays_get_typed_errors(array: fl.Array, error: type) -> None:
    with pytest.raises(error):
        array_from_flwr(array)


def test_a_truncated_payload_or_a_lying_shape_is_refused() -> None:
    good = fl.Array(np.arange(4.0))
    short = fl.Array(dtype=good.dtype, shape=good.shape, stype=good.stype, data=good.data[:-8])
    liar = fl.Array(dtype=good.dtype, shape=(5,), stype=good.stype, data=good.data)
    for bad in (short, liar):
        with pytest.raises(CodecError):
            array_from_flwr(bad)


# -- metadata -------------------------------------------------------------------------------
message_types = st.one_of(
    st.sampled_from(
        ["train", "evaluate", "query", "train.x", "he-keys", "query.flowerpets_he_keys"]
    ),
    st.text(min_size=1, max_size=20),
    st.from_regex(r"query\.flowerpets_x?[0-9a-f]{0,8}", fullmatch=True),
)
metadata = st.builds(
    Metadata,
    run_id=st.integers(0, 2**64 - 1),
    message_id=st.text(string.hexdigits, max_size=32),
    src_node_id=st.integers(0, 2**64 - 1),
    dst_node_id=st.integers(0, 2**64 - 1),
    round=INT64,
    message_type=message_types,
    reply_to_message_id=st.text(string.hexdigits, max_size=32),
    stage=TEXT,
    created_at=st.floats(0, 2e9),
)


@settings(max_examples=100, deadline=None)
@given(metadata, st.floats(1, 1e6))
def test_metadata_round_trip_is_identity(md: Metadata, ttl: float) -> None:
    theirs = fm.metadata_to_flwr(md, ttl=ttl)  # flwr validates the message type here
    assert validate_message_type(theirs.message_type)
    assert theirs.ttl == ttl
    assert fm.metadata_from_flwr(theirs) == md


@settings(max_examples=100, deadline=None)
@given(message_types, message_types)
def test_message_type_mapping_is_injective(a: str, b: str) -> None:
    if a != b:
        assert fm.message_type_to_flwr(a) != fm.message_type_to_flwr(b)


def test_known_types_keep_readable_names() -> None:
    assert fm.message_type_to_flwr("train") == "train"
    assert fm.message_type_to_flwr("he-keys") == "query.flowerpets_he_keys"
    assert fm.message_type_from_flwr("query.flowerpets_he_keys") == "he-keys"


@pytest.mark.parametrize(
    "reserved",
    [
        "query.flowerpets_",
        "query.flowerpets_x",
        "query.flowerpets_x747261696e",
        "query.flowerpets_xzz",
    ],
)
def test_reserved_flwr_types_that_none_of_ours_maps_to_are_refused(reserved: str) -> None:
    # "...x747261696e" decodes to "train", which travels as plain "train": not canonical.
    with pytest.raises(CodecError):
        fm.message_type_from_flwr(reserved)


@settings(max_examples=200, deadline=None)
@given(INT64, TEXT)
def test_group_id_carries_round_and_stage(rnd: int, stage: str) -> None:
    gid = fm.group_id(rnd, stage)
    assert fm.parse_group_id(gid) == (rnd, stage)
    assert fm.group_id(*fm.parse_group_id(gid)) == gid


def test_flwr_strategies_group_ids_are_our_rounds() -> None:
    assert fm.parse_group_id("3") == (3, "")
    assert fm.parse_group_id("") == (0, "")
    assert fm.parse_group_id("2:secagg+/unmask") == (2, "secagg+/unmask")


@pytest.mark.parametrize("bad", ["x", "01", "+1", " 1", "1:", "-0", "1.0"])
def test_foreign_group_ids_are_refused(bad: str) -> None:
    with pytest.raises(CodecError):
        fm.parse_group_id(bad)


# -- errors ---------------------------------------------------------------------------------
@settings(max_examples=100, deadline=None)
@given(
    st.sampled_from(list(ErrorCode)),
    st.one_of(TEXT, st.from_regex(r"flwr error code -?[0-9]{1,4}: .{0,5}", fullmatch=True)),
)
def test_our_errors_round_trip(code: ErrorCode, reason: str) -> None:
    assert fm.error_from_flwr(fm.error_to_flwr(Error(code, reason))) == Error(code, reason)


@settings(max_examples=100, deadline=None)
@given(st.one_of(st.integers(0, 12), st.integers(995, 1012), INT64), TEXT)
def test_flwr_errors_round_trip(code: int, reason: str) -> None:
    back = fm.error_to_flwr(fm.error_from_flwr(fl.Error(code=code, reason=reason)))
    assert (back.code, back.reason) == (code, reason)


def test_error_codes_keep_their_meaning() -> None:
    assert fm.error_to_flwr(Error(ErrorCode.NODE_UNAVAILABLE)).code == 5  # flwr's NODE_UNAVAILABLE
    assert fm.error_to_flwr(Error(ErrorCode.REFUSED)).code == 1005
    gone = fm.error_from_flwr(fl.Error(code=3, reason="expired"))  # flwr's MESSAGE_UNAVAILABLE
    assert gone.code is ErrorCode.NODE_UNAVAILABLE and gone.reason.endswith("expired")
    assert fm.error_from_flwr(fl.Error(code=4)).code is ErrorCode.TIMEOUT


# -- messages and state ---------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(metadata, record_dicts)
def test_message_round_trip_is_identity(md: Metadata, content: RecordDict) -> None:
    ours = Message(metadata=md, content=content)
    back = fm.message_from_flwr(fm.message_to_flwr(ours))
    assert back.metadata == md and back.content == content
    failed = Message(metadata=md, error=Error(ErrorCode.REFUSED, "no"))
    assert fm.message_from_flwr(fm.message_to_flwr(failed)).error == failed.error


@settings(max_examples=60, deadline=None)
@given(record_dicts, record_dicts)
def test_state_round_trips_both_ways(state: RecordDict, old: RecordDict) -> None:
    theirs = recorddict_to_flwr(old)
    fm.write_state(state, theirs)
    assert list(theirs.keys()) == list(state.keys())
    assert fm.state_from_flwr(theirs) == state
    again = recorddict_to_flwr(RecordDict())
    fm.write_state(fm.state_from_flwr(theirs), again)
    assert fm.state_from_flwr(again) == state


def test_context_maps_ids_configs_and_state() -> None:
    state = recorddict_to_flwr(RecordDict({"s": ConfigRecord({"k": b"\x00"})}))
    theirs = fl.Context(
        run_id=3, node_id=2**64 - 1, node_config={"partition-id": 1}, state=state,
        run_config={"lr": 0.1, "name": "x", "on": True},
    )  # fmt: skip
    ours = fm.context_from_flwr(theirs)
    assert isinstance(ours, Context)
    assert (ours.run_id, ours.node_id) == (3, 2**64 - 1)
    assert dict(ours.node_config) == {"partition-id": 1}
    assert dict(ours.run_config) == {"lr": 0.1, "name": "x", "on": True}
    assert ours.state == RecordDict({"s": ConfigRecord({"k": b"\x00"})})


def test_flwr_values_we_refuse_get_typed_errors() -> None:
    with pytest.raises(RecordTypeError):
        recorddict_from_flwr(fl.RecordDict({"c": fl.ConfigRecord({"": 1})}))
