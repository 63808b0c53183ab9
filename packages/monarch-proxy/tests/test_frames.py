"""Frames: serialize and parse both ways, and every malformed input gets a ProtocolError."""

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from monarch_proxy.errors import FrameTooLargeError, ProtocolError
from monarch_proxy.protocol.frames import HEADER, Frame, FrameKind, decode

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
