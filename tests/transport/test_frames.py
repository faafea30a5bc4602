"""The transport's frames: exact layout, round trips, bounds, and fuzzed decoding."""

from __future__ import annotations

import contextlib
import hashlib
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowerpets.core import ArrayRecord, ConfigRecord, Error, ErrorCode, Message, RecordDict
from flowerpets.core.codec import CodecLimits, encode_message, encode_record_dict
from flowerpets.exceptions import (
    CodecError,
    CorruptMessageError,
    FrameError,
    MessageTooLargeError,
    TruncatedMessageError,
)
from flowerpets.transport._frames import (
    CHUNK_OVERHEAD,
    MAGIC,
    Bye,
    ByeCode,
    Challenge,
    Chunk,
    Head,
    Heartbeat,
    Hello,
    Reassembler,
    Welcome,
    chunk_frames,
    decode_frame,
    digest,
    digest_of,
    encode_content,
    envelope_parts,
    open_envelope,
)

BIG = 1 << 30


def test_hello_layout_is_exactly_as_documented() -> None:
    hello = Hello(
        bytes(range(32)), 1_700_000_000_123, b"N" * 16, 65536, 1 << 30, b"C" * 16, b"S" * 64
    )
    expected = (
        b"FPTX\x02\x01"
        + bytes(range(32))
        + struct.pack("<q", 1_700_000_000_123)
        + b"N" * 16
        + struct.pack("<I", 65536)
        + struct.pack("<Q", 1 << 30)
        + b"C" * 16
        + b"S" * 64
    )
    assert hello.encode() == expected
    assert hello.prefix() == expected[:-64]
    assert decode_frame(expected, max_frame=BIG) == hello


def test_head_chunk_heartbeat_bye_layouts() -> None:
    head = Head(7, 1000, b"D" * 32, b"S" * 64)
    assert head.encode() == b"FPTX\x02\x03" + struct.pack("<QQ", 7, 1000) + b"D" * 32 + b"S" * 64
    chunk = Chunk(7, 512, b"data")
    assert chunk.encode() == b"FPTX\x02\x04" + struct.pack("<QQ", 7, 512) + b"data"
    assert len(chunk.encode()) == CHUNK_OVERHEAD + 4
    beat = Heartbeat(8, -5)
    assert beat.encode() == b"FPTX\x02\x05" + struct.pack("<Qq", 8, -5) + bytes(64)
    assert Challenge(b"C" * 16).encode() == b"FPTX\x02\x07" + b"C" * 16
    bye = Bye(ByeCode.SHUTDOWN, "bye é")
    assert bye.encode() == b"FPTX\x02\x06\x02" + struct.pack("<I", 6) + "bye é".encode()


@pytest.mark.parametrize(
    "frame",
    [
        Challenge(b"c" * 16),
        Hello(b"k" * 32, 1, b"n" * 16, 1024, 2048, b"c" * 16, b"s" * 64),
        Head(1, 2, b"d" * 32),
        Heartbeat(3, 4, b"s" * 64),
        Bye(ByeCode.RUN_FINISHED, "the run is over"),
        Bye(ByeCode.REPLACED),
        Welcome(1, 2, b"s" * 16, 500, 2000, 1 << 20, 1 << 30, ConfigRecord({"seed": 7, "x": "y"})),
        Welcome(5, 6, b"t" * 16, 1, 2, 3, 4),
    ],
)
def test_round_trip(frame: object) -> None:
    data = frame.encode()  # type: ignore[attr-defined]
    assert decode_frame(data, max_frame=BIG) == frame


def test_a_chunk_decodes_to_a_view_of_its_data() -> None:
    decoded = decode_frame(Chunk(1, 0, b"abc").encode(), max_frame=BIG)
    assert isinstance(decoded, Chunk)
    assert isinstance(decoded.data, memoryview) and bytes(decoded.data) == b"abc"


@pytest.mark.parametrize(
    ("data", "error", "match"),
    [
        (b"FPT", FrameError, "shorter than the 6-byte header"),
        (b"XXXX\x02\x01" + bytes(200), FrameError, "bad magic"),
        (b"FPTX\x01\x01" + bytes(200), FrameError, "version 1; this build speaks version 2"),
        (b"FPTX\x02\x09", FrameError, "unknown frame kind 9"),
        (b"FPTX\x02\x01" + bytes(10), FrameError, "HELLO frame body is 10 bytes"),
        (Head(1, 2, b"d" * 32).encode() + b"x", FrameError, "HEAD frame body"),
        (b"FPTX\x02\x04" + bytes(15), FrameError, "CHUNK frame body is 15 bytes"),
        (b"FPTX\x02\x07" + bytes(15), FrameError, "CHALLENGE frame body is 15 bytes"),
        (b"FPTX\x02\x06\x09" + struct.pack("<I", 0), FrameError, "unknown code 9"),
        (b"FPTX\x02\x06\x01" + struct.pack("<I", 99), FrameError, "expected 104"),
        (b"FPTX\x02\x06\x01" + struct.pack("<I", 5000), FrameError, "more than 4096"),
        (bytes(1000), MessageTooLargeError, "more than the limit of 999"),
    ],
)
def test_malformed_frames_get_a_typed_error(data: bytes, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        decode_frame(data, max_frame=999)


def test_a_welcome_with_a_broken_run_config_is_a_frame_error() -> None:
    data = bytearray(Welcome(1, 2, b"s" * 16, 1, 2, 3, 4, ConfigRecord({"a": 1})).encode())
    data[-1] ^= 0xFF  # the config frame's CRC
    with pytest.raises(FrameError, match="run config does not decode"):
        decode_frame(bytes(data), max_frame=BIG)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_decoding_any_bytes_raises_only_codec_errors(data: bytes) -> None:
    with contextlib.suppress(CodecError):
        decode_frame(data, max_frame=250)


@settings(max_examples=200, deadline=None)
@given(kind=st.integers(1, 6), body=st.binary(max_size=200))
def test_decoding_any_body_of_any_kind_raises_only_codec_errors(kind: int, body: bytes) -> None:
    with contextlib.suppress(CodecError):
        decode_frame(MAGIC + bytes([1, kind]) + body, max_frame=BIG)


# -- chunking and reassembly ---------------------------------------------------------------------
def message_frames(seq: int, data: bytes, max_chunk: int) -> list[Head | Chunk]:
    frames: list[Head | Chunk] = [Head(seq, len(data), digest(data))]
    for raw in chunk_frames(seq, [data], max_chunk):
        decoded = decode_frame(raw, max_frame=BIG)
        assert isinstance(decoded, Chunk)
        frames.append(decoded)
    return frames


@given(st.binary(min_size=1, max_size=5000), st.integers(1, 700))
@settings(max_examples=100, deadline=None)
def test_chunks_reassemble_to_the_message(data: bytes, max_chunk: int) -> None:
    frames = message_frames(3, data, max_chunk)
    assert len(frames) == 1 + -(-len(data) // max_chunk)
    assert all(len(f.data) <= max_chunk for f in frames[1:] if isinstance(f, Chunk))
    again = Reassembler(len(data))
    for _ in range(2):  # one reassembler, message after message
        head, *chunks = frames
        assert isinstance(head, Head)
        again.head(head)
        out = None
        for chunk in chunks:
            assert isinstance(chunk, Chunk)
            assert out is None
            out = again.chunk(chunk)
        assert out == data
        assert not again.busy


def test_reassembly_refuses_what_breaks_the_order_or_the_bounds() -> None:
    data = bytes(range(100))
    head, first, second = message_frames(1, data, 60)
    assert isinstance(head, Head) and isinstance(first, Chunk) and isinstance(second, Chunk)
    r = Reassembler(100)
    with pytest.raises(FrameError, match="without its HEAD"):
        r.chunk(first)
    with pytest.raises(MessageTooLargeError, match="101 bytes was announced, more than"):
        r.head(Head(1, 101, head.digest))
    with pytest.raises(FrameError, match="announces 0 bytes"):
        r.head(Head(1, 0, head.digest))
    r.head(head)
    with pytest.raises(FrameError, match="began before message 1 was complete"):
        r.head(Head(2, 5, head.digest))
    with pytest.raises(FrameError, match="offset 60, expected 0"):
        r.chunk(second)
    with pytest.raises(FrameError, match="a chunk of message 9 arrived inside message 1"):
        r.chunk(Chunk(9, 0, b"x"))
    with pytest.raises(FrameError, match="an empty chunk"):
        r.chunk(Chunk(1, 0, b""))
    r.chunk(first)
    with pytest.raises(FrameError, match="run past the announced 100 bytes"):
        r.chunk(Chunk(1, 60, bytes(41)))
    r2 = Reassembler(100)
    r2.head(Head(1, 100, hashlib.sha256(b"something else").digest()))
    r2.chunk(first)
    with pytest.raises(FrameError, match="do not match the announced digest"):
        r2.chunk(second)


def test_without_digest_checks_only_the_order_and_bounds_are_checked() -> None:
    # What a node does with the server's HEADs, whose digest is zeros (TLS covers them).
    data = bytes(range(100))
    head, first, second = message_frames(1, data, 60)
    assert isinstance(head, Head) and isinstance(first, Chunk) and isinstance(second, Chunk)
    r = Reassembler(100, check_digest=False)
    r.head(Head(1, 100, bytes(32)))
    assert r.chunk(first) is None
    assert r.chunk(second) == data
    with pytest.raises(FrameError, match="offset 60, expected 0"):
        r.head(Head(2, 100, bytes(32)))
        r.chunk(Chunk(2, 60, b"x"))


# -- envelopes -----------------------------------------------------------------------------------
def sample_message() -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord({"w": np.arange(12, dtype=np.float32).reshape(3, 4)}),
            "config": ConfigRecord({"lr": 0.1, "name": "x"}),
        }
    )
    return Message.create(content, message_type="train", dst_node_id=9, round=2, run_id=5)


def test_an_envelope_is_a_metadata_frame_then_a_content_frame() -> None:
    limits = CodecLimits()
    message = sample_message()
    content = encode_content(message, limits)
    assert content == encode_record_dict(message.require_content())
    parts = envelope_parts(message, content, limits)
    meta = encode_message(Message(metadata=message.metadata, content=RecordDict()))
    assert parts == [struct.pack("<I", len(meta)), meta, content]
    opened = open_envelope(b"".join(parts), limits)
    assert opened.metadata == message.metadata
    assert opened.content == message.content
    error = message.error_reply(Error(ErrorCode.REFUSED, "no"))
    assert encode_content(error, limits) is None
    error_parts = envelope_parts(error, None, limits)
    assert len(error_parts) == 2
    assert open_envelope(b"".join(error_parts), limits).error == Error(ErrorCode.REFUSED, "no")


def test_one_content_frame_serves_many_envelopes() -> None:
    limits = CodecLimits()
    first = sample_message()
    content = encode_content(first, limits)
    second = Message.create(
        first.require_content(), message_type="train", dst_node_id=10, round=2, run_id=5
    )
    a = envelope_parts(first, content, limits)
    b = envelope_parts(second, content, limits)
    assert a[-1] is b[-1]  # the same bytes object, not a copy
    assert open_envelope(b"".join(b), limits).metadata.dst_node_id == 10


def test_malformed_envelopes_get_typed_errors() -> None:
    limits = CodecLimits()
    message = sample_message()
    parts = envelope_parts(message, encode_content(message, limits), limits)
    whole = b"".join(parts)
    with pytest.raises(TruncatedMessageError, match="ends inside its header"):
        open_envelope(b"\x01\x00", limits)
    with pytest.raises(TruncatedMessageError, match="runs past"):
        open_envelope(struct.pack("<I", 10**6) + whole[4:], limits)
    with pytest.raises(TruncatedMessageError):
        open_envelope(whole[:-10], limits)
    error = message.error_reply(Error(ErrorCode.REFUSED, "no"))
    with pytest.raises(CorruptMessageError, match="error message carries 7 bytes"):
        open_envelope(b"".join(envelope_parts(error, None, limits)) + bytes(7), limits)
    full = encode_message(message)  # a metadata frame that carries the records itself
    with pytest.raises(CorruptMessageError, match="carries records itself"):
        open_envelope(struct.pack("<I", len(full)) + full + parts[2], limits)
    with pytest.raises(MessageTooLargeError, match="more than max_message_bytes=100"):
        envelope_parts(message, parts[2], CodecLimits(max_message_bytes=100))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_opening_any_bytes_raises_only_codec_errors(data: bytes) -> None:
    with contextlib.suppress(CodecError):
        open_envelope(data, CodecLimits())


@given(st.lists(st.binary(max_size=300), max_size=6), st.integers(1, 200))
@settings(max_examples=100, deadline=None)
def test_chunks_cut_across_parts(parts: list[bytes], max_chunk: int) -> None:
    data = b"".join(parts)
    chunks = [decode_frame(raw, max_frame=BIG) for raw in chunk_frames(4, parts, max_chunk)]
    assert all(isinstance(c, Chunk) for c in chunks)
    assert b"".join(bytes(c.data) for c in chunks) == data  # type: ignore[union-attr]
    assert [c.offset for c in chunks] == list(range(0, len(data), max_chunk))  # type: ignore[union-attr]
    assert digest_of(parts) == digest(data)
