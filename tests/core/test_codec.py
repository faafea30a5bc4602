"""Tests of the wire format: round trips, the exact layout, limits and fuzzing.

Frames used to probe the parser are built here from the layout documented in
``flowerpets.core.codec`` (not with the codec's own writer), so these tests also
check that the documentation describes what the code reads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import struct
import time
import tracemalloc
import zlib
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from flowerpets.core.codec import (
    DEFAULT_LIMITS,
    FORMAT_VERSION,
    CodecLimits,
    decode_array,
    decode_message,
    decode_record_dict,
    encode_array,
    encode_message,
    encode_record_dict,
)
from flowerpets.core.message import Error, ErrorCode, Message, Metadata
from flowerpets.core.records import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flowerpets.exceptions import (
    CodecError,
    CorruptMessageError,
    MessageTooLargeError,
    ParameterTypeError,
    ParameterValueError,
    TruncatedMessageError,
    UnsupportedVersionError,
)

# =============================================================================
# Helpers: exact equality, and an independent frame builder from the documented layout
# =============================================================================

ALLOWED_DTYPES = ["|b1", "|i1", "|u1", "<i2", "<i4", "<i8", "<u2", "<u4", "<u8"]
ALLOWED_DTYPES += ["<f2", "<f4", "<f8", "<c8", "<c16"]
BIG_ENDIAN_DTYPES = [s.replace("<", ">") for s in ALLOWED_DTYPES if s.startswith("<")]


def assert_value_equal(a: Any, b: Any, where: str) -> None:
    """Equal with the same Python type (True is not 1) and bit-identical floats."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, list):
        assert len(a) == len(b), f"{where}: list lengths differ"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_value_equal(x, y, f"{where}[{i}]")
    elif isinstance(a, float):
        assert struct.pack("<d", a) == struct.pack("<d", b), f"{where}: {a!r} != {b!r}"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_array_equal(a: Array, b: Array, where: str) -> None:
    """Same values bit for bit; a big-endian original comes back little-endian."""
    expected = a.numpy().astype(a.dtype.newbyteorder("<"))
    assert b.dtype == expected.dtype, f"{where}: dtype {b.dtype} != {expected.dtype}"
    assert b.shape == expected.shape, f"{where}: shape {b.shape} != {expected.shape}"
    assert b.numpy().tobytes() == expected.tobytes(), f"{where}: data differs"


def assert_records_equal(a: RecordDict, b: RecordDict) -> None:
    assert type(b) is RecordDict
    assert list(a) == list(b), "record names or their order differ"
    for name in a:
        ra, rb = a[name], b[name]
        assert type(ra) is type(rb), f"record {name!r}: {type(ra)} != {type(rb)}"
        assert list(ra) == list(rb), f"record {name!r}: keys or their order differ"
        for key in ra:
            if isinstance(ra, ArrayRecord):
                assert_array_equal(ra[key], rb[key], f"{name}/{key}")
            else:
                assert_value_equal(ra[key], rb[key], f"{name}/{key}")


def assert_messages_equal(a: Message, b: Message) -> None:
    for field in ("run_id", "message_id", "src_node_id", "dst_node_id", "round"):
        assert_value_equal(getattr(a.metadata, field), getattr(b.metadata, field), field)
    for field in ("message_type", "reply_to_message_id", "stage", "created_at"):
        assert_value_equal(getattr(a.metadata, field), getattr(b.metadata, field), field)
    assert (a.error is None) == (b.error is None)
    if a.error is not None:
        assert b.error is not None
        assert type(b.error.code) is ErrorCode
        assert b.error == a.error
    else:
        assert a.content is not None and b.content is not None
        assert_records_equal(a.content, b.content)


def roundtrip(message: Message, limits: CodecLimits = DEFAULT_LIMITS) -> Message:
    decoded = decode_message(encode_message(message, limits=limits), limits=limits)
    assert_messages_equal(message, decoded)
    return decoded


def u8(v: int) -> bytes:
    return struct.pack("<B", v)


def u32(v: int) -> bytes:
    return struct.pack("<I", v)


def u64(v: int) -> bytes:
    return struct.pack("<Q", v)


def i64(v: int) -> bytes:
    return struct.pack("<q", v)


def f64(v: float) -> bytes:
    return struct.pack("<d", v)


def s(text: str | bytes) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return u32(len(data)) + data


def frame(body: bytes, magic: bytes = b"FPMG", version: int = 1) -> bytes:
    """magic | version | total u64 | body | crc32, as the module docstring says."""
    head = magic + u8(version) + u64(13 + len(body) + 4)
    return head + body + u32(zlib.crc32(head + body))


def reseal(data: bytes | bytearray) -> bytes:
    """Fix the total length and the CRC of an edited frame, so the parser sees it."""
    body = bytes(data[13:-4])
    return frame(body, magic=bytes(data[:4]), version=data[4])


def metadata_body(message_id: str = "m", message_type: str = "train") -> bytes:
    # run_id, message_id, src, dst, round, message_type, reply_to, stage, created_at
    return (
        u64(1) + s(message_id) + u64(0) + u64(2) + u64(3) + s(message_type) + s("") + s("")
    ) + f64(0.25)


def content_frame(records: bytes) -> bytes:
    """A message frame whose content is the given RecordDict body."""
    return frame(metadata_body() + u8(1) + records)


def config_frame(value: bytes, key: str = "k") -> bytes:
    """A message holding one ConfigRecord 'c' whose entry ``key`` is the given value."""
    return content_frame(u32(1) + s("c") + u8(3) + u32(1) + s(key) + value)


def metric_frame(value: bytes) -> bytes:
    return content_frame(u32(1) + s("m") + u8(2) + u32(1) + s("k") + value)


def array_body(dtype: str, shape: tuple[int, ...], nbytes: int, data: bytes, offset: int) -> bytes:
    """An Array body starting at frame offset ``offset`` (padding depends on it)."""
    head = u8(len(dtype)) + dtype.encode() + u8(len(shape))
    head += b"".join(u64(d) for d in shape) + u64(nbytes)
    pad = -(offset + len(head)) % 8
    return head + bytes(pad) + data


def array_frame(
    dtype: str, shape: tuple[int, ...], data: bytes, nbytes: int | None = None
) -> bytes:
    n = len(data) if nbytes is None else nbytes
    return frame(array_body(dtype, shape, n, data, 13), magic=b"FPAR")


def make_metadata(**changes: Any) -> Metadata:
    fields: dict[str, Any] = {
        "run_id": 11,
        "message_id": "9f" * 16,
        "src_node_id": 0,
        "dst_node_id": 12345678901234,
        "round": 7,
        "message_type": "train",
        "reply_to_message_id": "",
        "stage": "",
        "created_at": 1712345678.123456,
    }
    fields.update(changes)
    return Metadata(**fields)


def make_message(content: RecordDict, **changes: Any) -> Message:
    return Message(metadata=make_metadata(**changes), content=content)


def sample_content() -> RecordDict:
    return RecordDict(
        {
            "arrays": ArrayRecord(
                {
                    "w": np.arange(12, dtype=np.float32).reshape(3, 4),
                    "b": np.array([1, -1], dtype=np.int8),
                    "flag": np.array(True),
                }
            ),
            "metrics": MetricRecord({"loss": 0.125, "num-examples": 60, "hist": [1, 2, 3]}),
            "config": ConfigRecord({"lr": 0.01, "stage": "share", "key": b"\x00\xff", "on": True}),
        }
    )


# =============================================================================
# Round trips
# =============================================================================


SCALAR_AND_LIST_VALUES: list[Any] = [
    0,
    -1,
    2**63 - 1,
    -(2**63),
    0.0,
    -0.0,
    1.5,
    math.inf,
    -math.inf,
    math.nan,
    [],
    [1, -2, 2**63 - 1, -(2**63)],
    [0.5, -0.0, math.nan, math.inf],
]
CONFIG_ONLY_VALUES: list[Any] = [
    True,
    False,
    "",
    "héllo wörld ✓ 🌸",
    b"",
    bytes(range(256)),
    ["a", "", "ü"],
    [b"", b"\x00", b"xyz"],
    [True, False, True],
]


@pytest.mark.parametrize("value", SCALAR_AND_LIST_VALUES, ids=repr)
def test_metric_values_roundtrip(value: Any) -> None:
    roundtrip(make_message(RecordDict({"m": MetricRecord({"v": value})})))


@pytest.mark.parametrize("value", SCALAR_AND_LIST_VALUES + CONFIG_ONLY_VALUES, ids=repr)
def test_config_values_roundtrip(value: Any) -> None:
    roundtrip(make_message(RecordDict({"c": ConfigRecord({"v": value})})))


def test_bool_and_int_stay_distinct() -> None:
    content = RecordDict({"c": ConfigRecord({"t": True, "one": 1, "f": False, "zero": 0})})
    config = roundtrip(make_message(content)).require_content()["c"]
    assert config["t"] is True
    assert config["f"] is False
    assert type(config["one"]) is int and config["one"] == 1
    assert type(config["zero"]) is int and config["zero"] == 0
    lists = RecordDict({"c": ConfigRecord({"b": [True, False], "i": [1, 0]})})
    decoded = roundtrip(make_message(lists)).require_content()["c"]
    assert [type(x) for x in decoded["b"]] == [bool, bool]
    assert [type(x) for x in decoded["i"]] == [int, int]


def test_full_message_roundtrip_and_metadata_exact() -> None:
    message = make_message(
        sample_content(),
        reply_to_message_id="ab" * 16,
        stage="secagg/share-keys",
        created_at=0.1 + 0.2,
        run_id=2**64 - 1,
        src_node_id=2**63,
    )
    decoded = roundtrip(message)
    assert decoded.metadata == message.metadata
    assert decoded.content == RecordDict(sample_content())


@pytest.mark.parametrize("code", list(ErrorCode))
def test_error_messages_roundtrip(code: ErrorCode) -> None:
    message = Message(metadata=make_metadata(), error=Error(code, f"why {code.name} ✗"))
    decoded = roundtrip(message)
    assert decoded.error is not None and decoded.error.code is code
    assert decoded.content is None


def test_empty_content_and_empty_records() -> None:
    roundtrip(make_message(RecordDict()))
    empty = RecordDict({"a": ArrayRecord(), "m": MetricRecord(), "c": ConfigRecord()})
    decoded = roundtrip(make_message(empty)).require_content()
    assert [type(r) for r in decoded.values()] == [ArrayRecord, MetricRecord, ConfigRecord]


@pytest.mark.parametrize("dtype", ALLOWED_DTYPES + BIG_ENDIAN_DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (0, 3), (3, 0, 2), (5,), (2, 3, 4)])
def test_every_dtype_and_shape_roundtrips(dtype: str, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=int(np.prod(shape)) * np.dtype(dtype).itemsize, dtype=np.uint8)
    if dtype == "|b1":
        raw &= 1
    values = raw.view(dtype).reshape(shape)
    array = Array(values)
    decoded = decode_array(encode_array(array))
    assert_array_equal(array, decoded, dtype)
    assert decoded.dtype.str == dtype.replace(">", "<")
    # The same inside a message.
    roundtrip(make_message(RecordDict({"a": ArrayRecord({"x": array})})))


def array_holding(data: np.ndarray[Any, Any]) -> Array:
    """An Array around ``data`` as is, bypassing the constructor's normalisation.

    ``Array`` converts non-native byte order when it is built, so on a
    little-endian host this is the only way to hand the encoder big-endian data;
    the encoder must not rely on that normalisation (a big-endian host keeps '>').
    """
    array = Array.__new__(Array)
    array._data = data
    return array


def test_big_endian_input_encodes_like_little_endian() -> None:
    values = np.arange(6, dtype=np.float64).reshape(2, 3)
    expected = encode_array(Array(values))
    assert encode_array(Array(values.astype(">f8"))) == expected
    raw_big = array_holding(values.astype(">f8"))
    assert raw_big.dtype.str == ">f8"
    assert encode_array(raw_big) == expected
    assert decode_array(encode_array(raw_big)) == Array(values)
    for dtype in BIG_ENDIAN_DTYPES:
        data = np.arange(4).astype(dtype)
        assert encode_array(array_holding(data)) == encode_array(
            Array(data.astype("<" + dtype[1:]))
        )


def test_non_contiguous_inputs_roundtrip_in_c_order() -> None:
    base = np.arange(24, dtype=np.int32).reshape(4, 6)
    for view in (base[:, ::2], base.T, np.asfortranarray(base), base[::-1]):
        assert not view.flags.c_contiguous
        decoded = decode_array(encode_array(Array(view, copy=False)))
        assert decoded.shape == view.shape
        np.testing.assert_array_equal(decoded.numpy(), view)


def test_unicode_keys_and_order_kept() -> None:
    names = ["z", "\N{GREEK SMALL LETTER ALPHA}", "中文", "🌸", "a b", "A"]
    content = RecordDict({n: MetricRecord({k: i for i, k in enumerate(names)}) for n in names})
    decoded = roundtrip(make_message(content)).require_content()
    assert list(decoded) == names
    assert list(decoded["🌸"]) == names


def test_record_dict_and_array_frames() -> None:
    records = sample_content()
    decoded = decode_record_dict(encode_record_dict(records))
    assert_records_equal(records, decoded)
    array = Array(np.linspace(0, 1, 7, dtype=np.float16))
    assert decode_array(encode_array(array)) == array


def test_frames_of_one_kind_are_refused_as_another() -> None:
    message = encode_message(make_message(sample_content()))
    records = encode_record_dict(sample_content())
    array = encode_array(Array(np.zeros(3)))
    with pytest.raises(CorruptMessageError, match="RecordDict frame"):
        decode_message(records)
    with pytest.raises(CorruptMessageError, match="Message frame"):
        decode_record_dict(message)
    with pytest.raises(CorruptMessageError, match="bad magic"):
        decode_message(array)
    with pytest.raises(CorruptMessageError, match="bad magic"):
        decode_array(message)


def test_decoded_arrays_are_zero_copy_read_only_views() -> None:
    data = encode_message(make_message(sample_content()))
    for buffer in (data, bytearray(data), memoryview(data)):
        arrays = decode_message(buffer).require_content()["arrays"]
        assert isinstance(arrays, ArrayRecord)
        w = arrays["w"].numpy()
        assert np.shares_memory(w, np.frombuffer(buffer, dtype=np.uint8))
        assert not w.flags.writeable
        assert w.flags.aligned
        with pytest.raises(ValueError, match="read-only"):
            w[0, 0] = 1.0


def test_decode_from_a_slice_of_a_larger_buffer() -> None:
    data = encode_record_dict(sample_content())
    big = bytearray(b"xx" + data + b"yy")
    decoded = decode_record_dict(memoryview(big)[2:-2])
    assert_records_equal(sample_content(), decoded)


def test_decode_accepts_unusual_memoryviews() -> None:
    expected = Array(np.arange(5, dtype=np.int64))
    data = encode_array(expected)
    assert decode_array(memoryview(data).cast("c")) == expected
    assert decode_array(memoryview(data).cast("b")) == expected
    assert len(data) % 2 == 0
    assert decode_array(memoryview(data).cast("B", shape=[2, len(data) // 2])) == expected
    words = np.frombuffer(data + bytes(-len(data) % 4), dtype=np.uint32)
    if len(data) % 4:
        with pytest.raises(CorruptMessageError, match="unexpected bytes"):
            decode_array(memoryview(words))  # the zero bytes that fill the last word
    else:
        assert decode_array(memoryview(words)) == expected
    strided = np.zeros(2 * len(data), dtype=np.uint8)
    strided[::2] = np.frombuffer(data, dtype=np.uint8)
    assert decode_array(memoryview(strided[::2])) == expected  # non-contiguous: copied first


def test_encoding_is_deterministic() -> None:
    message = make_message(sample_content())
    assert encode_message(message) == encode_message(message)
    copy = make_message(sample_content())
    assert encode_message(copy) == encode_message(message)


# =============================================================================
# The exact bytes (known answers): the format cannot change silently
# =============================================================================


def known_message() -> Message:
    metadata = Metadata(
        run_id=1,
        message_id="ab",
        src_node_id=0,
        dst_node_id=7,
        round=3,
        message_type="train",
        created_at=0.5,
    )
    content = RecordDict(
        {
            "a": ArrayRecord({"w": np.array([1, -2], dtype=np.int16)}),
            "m": MetricRecord({"n": 4}),
            "c": ConfigRecord({"f": True}),
        }
    )
    return Message(metadata=metadata, content=content)


KNOWN_MESSAGE_HEX = "".join(
    [
        "46504d47",  # magic "FPMG"
        "01",  # version 1
        "a900000000000000",  # total length 169
        "0100000000000000",  # run_id 1
        "020000006162",  # message_id "ab"
        "0000000000000000",  # src_node_id 0
        "0700000000000000",  # dst_node_id 7
        "0300000000000000",  # round 3
        "05000000747261696e",  # message_type "train"
        "00000000",  # reply_to_message_id ""
        "00000000",  # stage ""
        "000000000000e03f",  # created_at 0.5
        "01",  # content tag: RecordDict
        "03000000",  # 3 records
        "01000000610101000000",  # "a": ArrayRecord, 1 entry
        "0100000077",  # key "w"
        "033c6932",  # dtype "<i2"
        "010200000000000000",  # ndim 1, shape (2,)
        "0400000000000000",  # nbytes 4
        "000000",  # padding: data starts at offset 120
        "0100feff",  # data: 1, -2
        "010000006d0201000000",  # "m": MetricRecord, 1 entry
        "010000006e010400000000000000",  # "n": int 4
        "01000000630301000000",  # "c": ConfigRecord, 1 entry
        "01000000660501",  # "f": bool True
        "ef1c3a63",  # crc32 of all of the above
    ]
)

KNOWN_ERROR_HEX = "".join(
    [
        "46504d47015d00000000000000",  # "FPMG", version 1, total 93
        "0100000000000000020000006162",  # run_id, message_id
        "000000000000000007000000000000000300000000000000",  # src, dst, round
        "05000000747261696e0000000000000000",  # type, reply_to, stage
        "000000000000e03f",  # created_at
        "0206000000040000006c617465",  # Error: TIMEOUT (6), "late"
        "ee0c8e0e",  # crc32
    ]
)

KNOWN_ARRAY_HEX = "".join(
    [
        "46504152013c00000000000000",  # "FPAR", version 1, total 60
        "033c6634",  # dtype "<f4" (the input was big-endian)
        "0202000000000000000100000000000000",  # ndim 2, shape (2, 1)
        "0800000000000000",  # nbytes 8
        "000000000000",  # padding: data starts at offset 48
        "0000c03f00000040",  # 1.5, 2.0
        "86e7a2ef",  # crc32
    ]
)


def test_known_answer_message() -> None:
    assert FORMAT_VERSION == 1, "a new version needs new known answers"
    data = encode_message(known_message())
    assert data.hex() == KNOWN_MESSAGE_HEX
    assert_messages_equal(known_message(), decode_message(bytes.fromhex(KNOWN_MESSAGE_HEX)))


def test_known_answer_error_message() -> None:
    message = Message(metadata=known_message().metadata, error=Error(ErrorCode.TIMEOUT, "late"))
    assert encode_message(message).hex() == KNOWN_ERROR_HEX
    assert_messages_equal(message, decode_message(bytes.fromhex(KNOWN_ERROR_HEX)))


def test_known_answer_array() -> None:
    array = Array(np.array([[1.5], [2.0]], dtype=">f4"))
    assert encode_array(array).hex() == KNOWN_ARRAY_HEX
    assert decode_array(bytes.fromhex(KNOWN_ARRAY_HEX)) == Array(np.array([[1.5], [2.0]], "<f4"))


def test_independent_frame_builder_matches_the_encoder() -> None:
    # The test-side builder (written from the docstring) and the codec agree.
    data = config_frame(u8(0x15) + u32(3) + b"\x01\x00\x01", key="k")
    decoded = decode_message(data)
    assert decoded.require_content()["c"]["k"] == [True, False, True]
    message = Message(
        metadata=Metadata(
            run_id=1,
            message_id="m",
            src_node_id=0,
            dst_node_id=2,
            round=3,
            message_type="train",
            created_at=0.25,
        ),
        content=RecordDict({"c": ConfigRecord({"k": [True, False, True]})}),
    )
    assert encode_message(message) == data


# =============================================================================
# Malformed input: each check, with the error it must raise
# =============================================================================


def test_bad_magic_and_unknown_version() -> None:
    data = bytearray(encode_message(known_message()))
    with pytest.raises(CorruptMessageError, match="bad magic"):
        decode_message(b"XPMG" + data[4:])
    data[4] = 2
    with pytest.raises(UnsupportedVersionError, match="version 2"):
        decode_message(bytes(data))
    # A future version is refused even when its CRC is right and its layout differs.
    with pytest.raises(UnsupportedVersionError):
        decode_message(frame(b"anything at all", version=FORMAT_VERSION + 1))


def test_crc_mismatch() -> None:
    data = bytearray(encode_message(known_message()))
    data[-1] ^= 0x01
    with pytest.raises(CorruptMessageError, match="CRC"):
        decode_message(bytes(data))


def test_trailing_garbage() -> None:
    data = encode_message(known_message())
    with pytest.raises(CorruptMessageError, match="unexpected bytes after"):
        decode_message(data + b"\x00")
    # Extra bytes inside a frame whose length and CRC cover them.
    with pytest.raises(CorruptMessageError, match="unexpected bytes after the message"):
        decode_message(reseal(data[:-4] + b"\x00" + data[-4:]))


def test_frame_length_too_small() -> None:
    data = bytearray(encode_message(known_message()))
    data[5:13] = u64(3)
    with pytest.raises(CorruptMessageError, match=r"frame length 3 .* too small"):
        decode_message(bytes(data))


def test_empty_and_tiny_inputs() -> None:
    with pytest.raises(TruncatedMessageError):
        decode_message(b"")
    with pytest.raises(TruncatedMessageError):
        decode_message(b"FPM")
    with pytest.raises(CorruptMessageError):
        decode_message(b"\x00")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (config_frame(u8(0x03) + s(b"\xff\xfe")), "not valid UTF-8"),
        (config_frame(u8(0x03) + s(b"\xed\xa0\x80")), "not valid UTF-8"),  # a surrogate
        (config_frame(u8(0x05) + u8(2)), "not 0 or 1"),
        (config_frame(u8(0x15) + u32(2) + b"\x01\x07"), "not 0 or 1"),
        (config_frame(u8(0x00) + u8(0)), "unknown type tag 0x00"),
        (config_frame(u8(0x16) + u32(0)), "unknown type tag 0x16"),
        (config_frame(u8(0x01) + i64(1), key=""), "is empty"),
        (metric_frame(u8(0x03) + s("x")), "not allowed in a MetricRecord"),
        (metric_frame(u8(0x05) + u8(1) + bytes(3)), "not allowed in a MetricRecord"),
        (content_frame(u32(1) + s("r") + u8(4) + u32(0)), "unknown kind 4"),
        (content_frame(u32(1) + s("") + u8(2) + u32(1) + s("k") + u8(1) + i64(1)), "is empty"),
        (content_frame(u32(2) + (s("r") + u8(3) + u32(0)) * 2), "'r' .* is repeated"),
        (
            content_frame(u32(1) + s("r") + u8(2) + u32(2) + (s("k") + u8(1) + i64(1)) * 2),
            "'k' .* is repeated",
        ),
        (frame(metadata_body() + u8(3)), "unknown content tag 3"),
        (frame(metadata_body() + u8(0)), "unknown content tag 0"),
        (frame(metadata_body() + u8(2) + u32(99) + s("")), "unknown error code 99"),
        (frame(u64(1) + s(b"\xc3")), "message_id at byte offset 25 is not valid UTF-8"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_malformed_bodies_are_corrupt(data: bytes, message: str) -> None:
    with pytest.raises(CorruptMessageError, match=message):
        decode_message(data)


def test_error_names_the_byte_offset() -> None:
    data = config_frame(u8(0x03) + s(b"ok\xff"))
    start = data.index(b"ok\xff")
    with pytest.raises(CorruptMessageError, match=f"byte offset {start + 2} "):
        decode_message(data)


@pytest.mark.parametrize(
    ("data", "error", "message"),
    [
        (array_frame("<f16", (1,), bytes(16)), CorruptMessageError, "dtype b'<f16'"),
        (array_frame("|O8", (1,), bytes(8)), CorruptMessageError, "dtype b'|O8'"),
        (array_frame(">f4", (1,), bytes(4)), CorruptMessageError, "dtype b'>f4'"),
        (array_frame("", (1,), bytes(4)), CorruptMessageError, "dtype length 0"),
        (array_frame("<f4", (2,), bytes(4)), CorruptMessageError, "does not match shape"),
        (array_frame("<f4", (1,), bytes(8)), CorruptMessageError, "does not match shape"),
        (array_frame("|b1", (3,), b"\x01\x00\x02"), CorruptMessageError, "not all 0 or 1"),
        (
            array_frame("<f8", (0, 2**62, 4), b""),  # no data, but numpy cannot hold the shape
            CorruptMessageError,
            "too large",
        ),
        (
            array_frame("<u8", (2**32, 2**32), b"", nbytes=0),
            CorruptMessageError,
            "too large",
        ),
        (
            array_frame("|u1", (2**31, 2**31), b"", nbytes=2**64 - 1),
            CorruptMessageError,
            "does not match shape",
        ),
        (
            array_frame("|u1", (2**32,), b"", nbytes=2**32),  # claims 4 GiB of data
            TruncatedMessageError,
            "array data",
        ),
        (
            frame(b"\x03<f4" + u8(200) + bytes(8), magic=b"FPAR"),
            MessageTooLargeError,
            "ndim 200",
        ),
        (frame(b"\x03<f4" + u8(2) + bytes(8), magic=b"FPAR"), TruncatedMessageError, "shape"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_malformed_arrays(data: bytes, error: type[CodecError], message: str) -> None:
    with pytest.raises(error, match=message):
        decode_array(data)


def test_empty_arrays_with_huge_dimensions_up_to_numpys_bound() -> None:
    # numpy's bound: the non-zero dimensions times the item size stay below 2**63.
    largest = (2**63 - 1) // 8
    decoded = decode_array(array_frame("<f4", (2, 0, largest), b""))
    assert decoded.shape == (2, 0, largest)
    assert decoded.size == 0
    with pytest.raises(CorruptMessageError, match="too large"):
        decode_array(array_frame("<f4", (2, 0, largest + 1), b""))


def test_non_zero_padding_is_corrupt() -> None:
    data = bytearray(encode_array(Array(np.array([1.5], dtype=np.float32))))
    # dtype (4) + ndim (1) + shape (8) + nbytes (8) end at 34; 6 bytes of padding follow.
    assert data[34:40] == bytes(6)
    data[36] = 1
    with pytest.raises(CorruptMessageError, match="non-zero padding at byte offset 36"):
        decode_array(reseal(data))


# =============================================================================
# Limits
# =============================================================================


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(CodecLimits)])
@pytest.mark.parametrize(
    "bad, error",
    [
        (0, ParameterValueError),
        (-1, ParameterValueError),
        (1.5, ParameterTypeError),
        (True, ParameterTypeError),
        ("1", ParameterTypeError),
    ],
)
def test_limits_are_validated(field: str, bad: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match=f"CodecLimits.{field} must be an int"):
        CodecLimits(**{field: bad})


def test_limits_upper_bounds() -> None:
    with pytest.raises(ValueError, match="max_ndim must be at most 64"):
        CodecLimits(max_ndim=65)
    with pytest.raises(ValueError, match="max_key_bytes must be at most"):
        CodecLimits(max_key_bytes=2**32)
    assert CodecLimits(max_message_bytes=2**40).max_message_bytes == 2**40


def test_max_message_bytes_on_encode_and_decode() -> None:
    message = make_message(sample_content())
    data = encode_message(message)
    exact = CodecLimits(max_message_bytes=len(data))
    assert encode_message(message, limits=exact) == data
    assert_messages_equal(message, decode_message(data, limits=exact))
    tight = CodecLimits(max_message_bytes=len(data) - 1)
    with pytest.raises(MessageTooLargeError, match="max_message_bytes"):
        encode_message(message, limits=tight)
    with pytest.raises(MessageTooLargeError, match="max_message_bytes"):
        decode_message(data, limits=tight)


def test_oversized_array_fails_before_it_is_copied() -> None:
    big = Array(np.zeros(1_000_000, dtype=np.float64))  # 8 MB
    limits = CodecLimits(max_message_bytes=1 << 20)
    tracemalloc.start()
    try:
        with pytest.raises(MessageTooLargeError):
            encode_message(make_message(RecordDict({"a": ArrayRecord({"x": big})})), limits=limits)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_oversized_big_endian_array_fails_before_conversion() -> None:
    big = array_holding(np.zeros(1_000_000, dtype=">f8"))
    tracemalloc.start()
    try:
        with pytest.raises(MessageTooLargeError):
            encode_array(big, limits=CodecLimits(max_message_bytes=1 << 20))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


LIMIT_CASES: list[tuple[str, int, RecordDict, str]] = [
    (
        "max_records",
        2,
        RecordDict({n: MetricRecord() for n in "abc"}),
        "number of records|record count",
    ),
    (
        "max_entries_per_record",
        2,
        RecordDict({"m": MetricRecord({k: 1 for k in "abc"})}),
        "entries|entry count",
    ),
    ("max_key_bytes", 3, RecordDict({"abcd": MetricRecord()}), "record key"),
    ("max_key_bytes", 3, RecordDict({"m": MetricRecord({"é" * 2: 1})}), "key"),
    ("max_string_bytes", 4, RecordDict({"c": ConfigRecord({"s": "hello"})}), "'s'"),
    ("max_string_bytes", 4, RecordDict({"c": ConfigRecord({"b": [b"", b"hello"]})}), "'b'"),
    ("max_list_items", 3, RecordDict({"m": MetricRecord({"l": [1.0] * 4})}), "list length"),
    ("max_list_items", 3, RecordDict({"c": ConfigRecord({"l": ["a"] * 4})}), "list length"),
    (
        "max_ndim",
        3,
        RecordDict({"a": ArrayRecord({"x": np.zeros((1, 1, 1, 1))})}),
        "ndim",
    ),
]


@pytest.mark.parametrize(("field", "limit", "content", "message"), LIMIT_CASES)
def test_each_limit_on_encode_and_decode(
    field: str, limit: int, content: RecordDict, message: str
) -> None:
    limits = CodecLimits(**{field: limit})
    msg = make_message(content, message_id="m", message_type="t")
    with pytest.raises(MessageTooLargeError, match=message) as on_encode:
        encode_message(msg, limits=limits)
    assert field in str(on_encode.value)
    data = encode_message(msg)  # the default limits allow it
    with pytest.raises(MessageTooLargeError, match=message) as on_decode:
        decode_message(data, limits=limits)
    assert field in str(on_decode.value)
    assert "byte offset" in str(on_decode.value)


def test_limits_at_the_bound_are_accepted() -> None:
    limits = CodecLimits(
        max_records=1, max_entries_per_record=2, max_key_bytes=2, max_string_bytes=3
    )
    content = RecordDict({"c": ConfigRecord({"ab": "xyz", "é": [b"abc"]})})
    roundtrip(make_message(content, message_id="id", message_type="t"), limits)
    limits = CodecLimits(max_ndim=3, max_list_items=2)
    content = RecordDict(
        {"a": ArrayRecord({"x": np.zeros((1, 2, 3))}), "m": MetricRecord({"l": [1, 2]})}
    )
    roundtrip(make_message(content), limits)


def test_metadata_strings_are_bounded_by_max_key_bytes() -> None:
    message = make_message(RecordDict(), message_id="m", stage="s" * 20)
    with pytest.raises(MessageTooLargeError, match=r"metadata\.stage"):
        encode_message(message, limits=CodecLimits(max_key_bytes=10))
    with pytest.raises(MessageTooLargeError, match=r"metadata\.stage"):
        decode_message(encode_message(message), limits=CodecLimits(max_key_bytes=10))


# Each length or count is refused where it is read (the "at byte offset" in the
# message), not after the parser has run through the rest of the input.
HUGE_LENGTHS = [
    pytest.param(
        config_frame(u8(0x03) + u32(0x7FFFFFFF)),
        MessageTooLargeError,
        r"entry 'k' at byte offset \d+ is 2147483647 bytes, more than max_string_bytes",
        id="str-over-max_string_bytes",
    ),
    pytest.param(
        config_frame(u8(0x04) + u32(0xFFFFFF)),
        TruncatedMessageError,
        r"entry 'k' at byte offset \d+ needs 16777215 bytes",
        id="bytes-16MiB-absent",
    ),
    pytest.param(
        config_frame(u8(0x11) + u32(9_999_999)),
        TruncatedMessageError,
        "list length at byte offset .* is 9999999, but 9999999 items need at least",
        id="int-list-absent",
    ),
    pytest.param(
        config_frame(u8(0x11) + u32(0xFFFFFFFF)),
        MessageTooLargeError,
        "list length at byte offset .* more than max_list_items",
        id="int-list-over-limit",
    ),
    pytest.param(
        config_frame(u8(0x13) + u32(9_999_999)),
        TruncatedMessageError,
        "list length at byte offset .* items need at least 39999996 bytes",
        id="str-list-absent",
    ),
    pytest.param(
        content_frame(u32(4096)),
        TruncatedMessageError,
        "record count at byte offset 76 is 4096, but",
        id="records-absent",
    ),
    pytest.param(
        content_frame(u32(1) + s("r") + u8(1) + u32(100_000)),
        TruncatedMessageError,
        "record 'r' entry count at byte offset 86 is 100000, but",
        id="entries-absent",
    ),
    pytest.param(
        content_frame(u32(0xFFFFFFFF)),
        MessageTooLargeError,
        "record count at byte offset 76 is 4294967295, more than max_records",
        id="records-over-limit",
    ),
    pytest.param(
        frame(u64(1) + u32(0xFFFFFFF0)),
        MessageTooLargeError,
        "message_id at byte offset 21 is 4294967280 bytes, more than max_key_bytes",
        id="key-over-limit",
    ),
    pytest.param(
        frame(u64(1) + u32(1000)),
        TruncatedMessageError,
        "message_id at byte offset 25 needs 1000 bytes",
        id="key-absent",
    ),
]


@pytest.mark.parametrize(("data", "error", "message"), HUGE_LENGTHS)
def test_huge_length_fields_fail_fast_without_allocating(
    data: bytes, error: type[CodecError], message: str
) -> None:
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(error, match=message):
            decode_message(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - started < 1.0
    assert peak < 64 * 1024, f"decoding a {len(data)}-byte input allocated {peak} bytes"


def test_huge_total_length_in_header() -> None:
    data = bytearray(encode_message(known_message()))
    data[5:13] = u64(2**64 - 1)
    with pytest.raises(MessageTooLargeError, match="max_message_bytes"):
        decode_message(bytes(data))
    data[5:13] = u64(2**20)
    with pytest.raises(TruncatedMessageError, match="input ends after 169 bytes"):
        decode_message(bytes(data))


# =============================================================================
# Values the format cannot represent are refused on encode
# =============================================================================


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"run_id": -1}, "run_id"),
        ({"src_node_id": 2**64}, "src_node_id"),
        ({"dst_node_id": -5}, "dst_node_id"),
        ({"round": -1}, "round"),
        ({"round": True}, "round"),
        ({"created_at": 10**400}, "created_at"),
        ({"created_at": "now"}, "created_at"),
        ({"stage": "\udcff"}, "UTF-8"),
        ({"message_type": 3}, "message_type"),
    ],
)
def test_bad_metadata_is_refused_on_encode(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(CodecError, match=message):
        encode_message(make_message(RecordDict(), **changes))


@pytest.mark.parametrize(
    "record",
    [
        MetricRecord({"v": 2**63}),
        MetricRecord({"v": -(2**63) - 1}),
        MetricRecord({"v": [1, 2**64]}),
        ConfigRecord({"v": 2**100}),
        ConfigRecord({"v": [0, -(2**70)]}),
        ConfigRecord({"v": "\ud800"}),
        ConfigRecord({"v": ["ok", "\ud800"]}),
    ],
)
def test_unrepresentable_values_are_refused_on_encode(
    record: MetricRecord | ConfigRecord,
) -> None:
    with pytest.raises(CodecError, match="'v'"):
        encode_message(make_message(RecordDict({"r": record})))


def test_long_double_arrays_are_refused() -> None:
    if np.dtype(np.longdouble).itemsize == 8:
        pytest.skip("long double is double on this platform")
    with pytest.raises(CodecError, match="no portable encoding"):
        encode_array(Array(np.zeros(2, dtype=np.longdouble)))


# =============================================================================
# Performance: arrays are copied once on encode and never on decode
# =============================================================================


def test_large_array_encode_is_a_copy_and_decode_is_zero_copy() -> None:
    weights = Array(np.random.default_rng(1).random(1_000_000, dtype=np.float32))
    content = RecordDict({"arrays": ArrayRecord({"w": weights})})
    message = make_message(content)

    def best_of(n: int, fn: Any) -> float:
        times = []
        for _ in range(n):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
        return min(times)

    data = encode_message(message)
    assert len(data) < 4_000_000 + 400
    # A per-element Python loop over a million floats takes far longer than this.
    assert best_of(5, lambda: encode_message(message)) < 0.1
    assert best_of(5, lambda: decode_message(data)) < 0.05
    decoded = decode_message(data).require_content()["arrays"]
    assert isinstance(decoded, ArrayRecord)
    assert np.shares_memory(decoded["w"].numpy(), np.frombuffer(data, dtype=np.uint8))
    assert decoded["w"] == weights


# =============================================================================
# Property tests: arbitrary messages round-trip
# =============================================================================

keys = st.text(min_size=1, max_size=6)
ints64 = st.integers(-(2**63), 2**63 - 1)
floats = st.floats(allow_nan=True, allow_infinity=True)
metric_values = st.one_of(
    ints64, floats, st.lists(ints64, max_size=5), st.lists(floats, max_size=5)
)
config_scalars = st.one_of(
    ints64, floats, st.text(max_size=8), st.binary(max_size=8), st.booleans()
)
config_values = st.one_of(
    config_scalars,
    st.lists(ints64, max_size=4),
    st.lists(floats, max_size=4),
    st.lists(st.text(max_size=4), max_size=4),
    st.lists(st.binary(max_size=4), max_size=4),
    st.lists(st.booleans(), max_size=4),
)
arrays = hnp.arrays(
    dtype=st.sampled_from(ALLOWED_DTYPES + BIG_ENDIAN_DTYPES).map(np.dtype),
    shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=4),
).map(Array)
array_records = st.dictionaries(keys, arrays, max_size=3).map(ArrayRecord)
metric_records = st.dictionaries(keys, metric_values, max_size=4).map(MetricRecord)
config_records = st.dictionaries(keys, config_values, max_size=4).map(ConfigRecord)
record_dicts = st.dictionaries(
    keys, st.one_of(array_records, metric_records, config_records), max_size=4
).map(RecordDict)
u64s = st.integers(0, 2**64 - 1)
metadata = st.builds(
    Metadata,
    run_id=u64s,
    message_id=st.text(max_size=40),
    src_node_id=u64s,
    dst_node_id=u64s,
    round=u64s,
    message_type=st.text(max_size=12),
    reply_to_message_id=st.text(max_size=40),
    stage=st.text(max_size=12),
    created_at=floats,
)
errors = st.builds(Error, st.sampled_from(ErrorCode), st.text(max_size=30))
messages = st.one_of(
    st.builds(Message, metadata=metadata, content=record_dicts),
    st.builds(Message, metadata=metadata, error=errors),
)

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(messages)
def test_any_message_roundtrips(message: Message) -> None:
    data = encode_message(message)
    decoded = decode_message(data)
    assert_messages_equal(message, decoded)
    assert encode_message(decoded) == data  # decoding then encoding is the identity


@FAST
@given(record_dicts)
def test_any_record_dict_roundtrips(records: RecordDict) -> None:
    assert_records_equal(records, decode_record_dict(encode_record_dict(records)))


@FAST
@given(arrays)
def test_any_array_roundtrips(array: Array) -> None:
    decoded = decode_array(encode_array(array))
    assert_array_equal(array, decoded, "array")
    assert decoded.numpy().flags.aligned


# =============================================================================
# Fuzzing: nothing but CodecError, whatever the input
# =============================================================================


def decode_or_codec_error(data: bytes) -> Message | None:
    """Decode; a CodecError is fine, anything else fails the test (by propagating)."""
    try:
        message = decode_message(data)
    except CodecError:
        return None
    # Anything the decoder accepts, the encoder can write again, identically decodable.
    again = decode_message(encode_message(message))
    assert_messages_equal(message, again)
    return message


DECODERS = [decode_message, decode_record_dict, decode_array]


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300), st.sampled_from(DECODERS))
def test_random_bytes(data: bytes, decode: Any) -> None:
    with pytest.raises(CodecError):
        decode(data)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300), st.sampled_from([b"FPMG", b"FPRD", b"FPAR"]))
def test_random_bodies_in_valid_frames(body: bytes, magic: bytes) -> None:
    data = frame(body, magic=magic)
    for decode in DECODERS:
        with contextlib.suppress(CodecError):
            decode(data)


def test_every_truncation_is_truncated() -> None:
    for data in (
        encode_message(make_message(sample_content())),
        encode_message(Message(metadata=make_metadata(), error=Error(ErrorCode.REFUSED, "no"))),
        encode_array(Array(np.arange(3))),
    ):
        decode = decode_array if data[:4] == b"FPAR" else decode_message
        for n in range(len(data)):
            with pytest.raises(TruncatedMessageError):
                decode(data[:n])


def expected_flip_error(position: int) -> tuple[type[CodecError], ...]:
    if position == 4:
        return (UnsupportedVersionError,)
    if 5 <= position < 13:  # the frame length: a longer claim looks like a truncation
        return (CorruptMessageError, TruncatedMessageError, MessageTooLargeError)
    return (CorruptMessageError,)


def test_every_single_byte_change_is_detected() -> None:
    data = encode_message(make_message(sample_content()))
    for position in range(len(data)):
        for xor in (0x01, 0x80, 0xFF):
            mutated = bytearray(data)
            mutated[position] ^= xor
            with pytest.raises(expected_flip_error(position)):
                decode_message(bytes(mutated))


# Messages whose content is not empty, so that mutations reach the record parser.
messages_with_content = st.builds(
    Message,
    metadata=metadata,
    content=st.dictionaries(
        keys, st.one_of(array_records, metric_records, config_records), min_size=1, max_size=4
    ).map(RecordDict),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages, st.data())
def test_random_byte_flips_fail_the_crc(message: Message, data: st.DataObject) -> None:
    encoded = bytearray(encode_message(message))
    positions = data.draw(
        st.lists(st.integers(13, len(encoded) - 1), min_size=1, max_size=4, unique=True)
    )
    for position in positions:
        encoded[position] ^= data.draw(st.integers(1, 255))
    with pytest.raises(CorruptMessageError):
        decode_message(bytes(encoded))


mutation = st.one_of(
    st.tuples(st.just("set"), st.integers(0, 10**6), st.sampled_from([0, 1, 0x7F, 0x80, 0xFF])),
    st.tuples(st.just("set"), st.integers(0, 10**6), st.integers(0, 255)),
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.integers(0, 255)),
    st.tuples(st.just("delete"), st.integers(0, 10**6), st.just(0)),
)


@settings(max_examples=700, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(messages, messages_with_content),
    st.lists(mutation, min_size=1, max_size=6),
    st.booleans(),
)
def test_mutations_behind_a_valid_crc(
    message: Message, mutations: list[tuple[str, int, int]], after_metadata: bool
) -> None:
    """Mutate the body, then fix the length and CRC so the parser itself is exercised.

    With ``after_metadata`` the mutations land after the metadata (which is most
    of a small message), so the content parser gets its share.
    """
    body = bytearray(encode_message(message)[13:-4])
    low = 0
    if after_metadata:
        no_content = Message(metadata=message.metadata, content=RecordDict())
        low = len(encode_message(no_content)) - 13 - 4 - 4  # metadata (then the content tag)
    for op, where, value in mutations:
        if op == "set" and len(body) > low:
            body[low + where % (len(body) - low)] = value
        elif op == "insert":
            body.insert(low + where % (len(body) - low + 1), value)
        elif op == "delete" and len(body) > low:
            del body[low + where % (len(body) - low)]
    decode_or_codec_error(frame(bytes(body)))


def test_mutations_of_every_byte_behind_a_valid_crc() -> None:
    """Deterministic companion of the above: each body byte set to telling values."""
    encoded = encode_message(make_message(sample_content(), stage="st"))
    body = encoded[13:-4]
    outcomes: dict[str, int] = {}
    for position in range(len(body)):
        for value in (0x00, 0x01, 0x7F, 0x80, 0xFF):
            if body[position] == value:
                continue
            mutated = bytearray(body)
            mutated[position] = value
            try:
                decode_message(frame(bytes(mutated)))
                outcome = "decoded"
            except CodecError as exc:
                outcome = type(exc).__name__
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
    # Both the value-changing and the structure-breaking paths were exercised.
    assert outcomes.get("decoded", 0) > 0
    assert outcomes.get("CorruptMessageError", 0) > 0
    assert outcomes.get("TruncatedMessageError", 0) > 0
    assert outcomes.get("MessageTooLargeError", 0) > 0
