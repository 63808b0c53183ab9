import pytest

from monarch_sync.exceptions import FrameTooLarge, SyncProtocolError
from monarch_sync.frames import (
    Frame,
    FrameDecoder,
    FrameType,
    bitmap_from_indices,
    decode_blob,
    decode_json,
    encode_blob_header,
    encode_frame,
    encode_json,
    indices_from_bitmap,
)

SAMPLE = [
    encode_json(FrameType.HELLO, {"push_id": "p", "mac": "ab"}),
    encode_blob_header(7, 5) + b"hello",
    encode_frame(FrameType.HEARTBEAT),
    encode_frame(FrameType.NEED, bitmap_from_indices({0, 9}, 10)),
]


def feed(chunks: list[bytes]) -> list[Frame]:
    dec = FrameDecoder()
    out: list[Frame] = []
    for c in chunks:
        dec.receive_data(c)
        out += dec.frames()
    return out


@pytest.mark.parametrize("mode", ["whole", "bytewise", "trailing"])
def test_decoder_yields_same_frames_for_any_chunking(mode: str) -> None:
    data = b"".join(SAMPLE)
    if mode == "whole":
        chunks = [data]
    elif mode == "bytewise":
        chunks = [data[i : i + 1] for i in range(len(data))]
    else:
        chunks = [data + SAMPLE[0][:3]]
    frames = feed(chunks)
    assert [f.type for f in frames] == [
        FrameType.HELLO,
        FrameType.BLOB,
        FrameType.HEARTBEAT,
        FrameType.NEED,
    ]
    assert decode_json(frames[0]) == {"push_id": "p", "mac": "ab"}
    assert decode_blob(frames[1]) == (7, b"hello")
    assert indices_from_bitmap(frames[3].payload, 10) == {0, 9}


def test_trailing_partial_frame_stays_buffered() -> None:
    dec = FrameDecoder()
    dec.receive_data(SAMPLE[1] + SAMPLE[0][:4])
    assert len(dec.frames()) == 1
    assert dec.buffered == 4


def test_oversized_frame_is_refused_before_buffering() -> None:
    dec = FrameDecoder(max_frame=100)
    dec.receive_data(encode_frame(FrameType.BLOB, b"x" * 101)[:5])
    with pytest.raises(FrameTooLarge) as info:
        dec.frames()
    assert info.value.size == 101


def test_unknown_frame_type_is_a_protocol_error() -> None:
    dec = FrameDecoder()
    dec.receive_data(b"\xff\x00\x00\x00\x00")
    with pytest.raises(SyncProtocolError):
        dec.frames()


def test_bitmap_rejects_wrong_length_and_out_of_range() -> None:
    assert indices_from_bitmap(bitmap_from_indices(range(0, 20, 3), 20), 20) == set(range(0, 20, 3))
    with pytest.raises(SyncProtocolError):
        indices_from_bitmap(b"\x00", 20)
    with pytest.raises(SyncProtocolError):
        indices_from_bitmap(b"\x80", 7)
