"""Frames: serialize and parse both ways, and every malformed input gets a ProtocolError."""

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from monarch_proxy.errors import FrameTooLargeError, ProtocolError
from monarch_proxy.protocol.frames import (
    BATCH_LIMIT,
    HEADER,
    Frame,
    FrameKind,
    batch,
    decode,
    decode_message,
    pack_for_sending,
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)


@given(
    kind=st.sampled_from(list(FrameKind)),
    ident=st.integers(0, 2**64 - 1),
    seq=st.integers(0, 2**64 - 1),
    meta=st.dictionaries(st.text(max_size=8), json_values, max_size=4),
    payload=st.binary(max_size=256),
)
def test_encode_then_decode_gives_the_same_frame(kind, ident, seq, meta, payload):
    frame = decode(Frame(kind, ident, seq, meta, payload).encode())
    assert (frame.kind, frame.id, frame.seq, frame.meta) == (kind, ident, seq, meta)
    assert bytes(frame.payload) == payload


def test_header_layout_is_fixed():
    data = Frame(FrameKind.REQUEST, 7, 3, {"op": "x"}, b"PAY").encode()
    assert data[:24] == struct.pack("!BBHIQQ", 2, 0, 0, len(b'{"op":"x"}'), 7, 3)
    assert data[24:] == b'{"op":"x"}PAY'


def test_payload_is_not_copied_on_decode():
    data = Frame(FrameKind.REPLY, 1, 1, {}, b"x" * 1000).encode()
    assert isinstance(decode(data).payload, memoryview)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "shorter than"),
        (b"\x02" * 10, "shorter than"),
        (HEADER.pack(99, 0, 0, 0, 0, 0), "unknown frame kind 99"),
        (HEADER.pack(2, 2, 0, 0, 0, 0), "reserved header bits"),
        (HEADER.pack(2, 0, 0, 50, 0, 0) + b"{}", "declares 50 bytes of meta"),
        (HEADER.pack(2, 0, 0, 3, 0, 0) + b"{x}", "not valid JSON"),
        (HEADER.pack(2, 0, 0, 2, 0, 0) + b"[]", "must be a JSON object"),
        (HEADER.pack(2, 0, 0, 2, 0, 0) + b"\xff\xfe", "not valid JSON"),
    ],
)
def test_malformed_frames_are_rejected_with_a_reason(data, message):
    with pytest.raises(ProtocolError, match=message):
        decode(data)


def test_frames_over_the_limit_are_rejected_before_parsing():
    data = Frame(FrameKind.REQUEST, 1, 0, {}, b"x" * 100).encode()
    with pytest.raises(FrameTooLargeError) as info:
        decode(data, max_size=64)
    assert info.value.size == len(data) and info.value.max_size == 64


@given(st.binary(max_size=64))
def test_random_bytes_never_raise_anything_but_protocol_error(data):
    try:
        decode(data)
    except ProtocolError:
        pass


def test_batches_carry_several_messages_in_order():
    small = [Frame(FrameKind.REPLY, i, i, {"i": i}, b"x" * i).encode() for i in range(1, 6)]
    big = Frame(FrameKind.REPLY, 9, 9, {}, b"y" * (BATCH_LIMIT + 1)).encode()
    packed = pack_for_sending([*small[:3], big, *small[3:]])
    assert len(packed) == 3 and packed[1] is big  # big ones travel alone, order is kept
    frames = [f for message in packed for f in decode_message(message, max_size=1 << 30)]
    assert [f.id for f in frames] == [1, 2, 3, 9, 4, 5]
    assert pack_for_sending(small[:1]) == small[:1]  # a lone message is not wrapped


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"\x00\x00", "inside a length prefix"),
        (b"\x00\x00\x00\x09abc", "past its end"),
    ],
)
def test_malformed_batches_are_rejected(payload, message):
    with pytest.raises(ProtocolError, match=message):
        decode_message(Frame(FrameKind.BATCH, payload=payload).encode(), max_size=1 << 20)


def test_batches_do_not_nest():
    inner = batch([Frame(FrameKind.ACK).encode(), Frame(FrameKind.ACK).encode()])
    with pytest.raises(ProtocolError, match="do not nest"):
        decode_message(batch([inner, Frame(FrameKind.ACK).encode()]), max_size=1 << 20)
