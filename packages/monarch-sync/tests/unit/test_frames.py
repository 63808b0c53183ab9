import struct

import pytest

from monarch_sync.exceptions import FrameTooLarge, SyncProtocolError
from monarch_sync.frames import (
    MAX_BATCH_BLOBS,
    MAX_BATCH_BYTES,
    Frame,
    FrameDecoder,
    FrameType,
    bitmap_from_indices,
    blobs_table,
    decode_blobs,
    decode_json,
    encode_frame,
    encode_json_payload,
    indices_from_bitmap,
)

TAG = bytes(range(16))


def blobs_frame(items: list[tuple[int, bytes]]) -> bytes:
    table = blobs_table([(i, len(d), TAG) for i, d in items])
    return encode_frame(FrameType.BLOBS, table + b"".join(d for _, d in items))


SAMPLE = [
    encode_frame(FrameType.HELLO, encode_json_payload({"push_id": "p", "sender": "ab"})),
    blobs_frame([(7, b"hello")]),
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
        FrameType.BLOBS,
        FrameType.HEARTBEAT,
        FrameType.NEED,
    ]
    assert decode_json(frames[0]) == {"push_id": "p", "sender": "ab"}
    assert decode_blobs(frames[1]) == [(7, b"hello", TAG)]
    assert indices_from_bitmap(frames[3].payload, 10) == {0, 9}


def test_trailing_partial_frame_stays_buffered() -> None:
    dec = FrameDecoder()
    dec.receive_data(SAMPLE[1] + SAMPLE[0][:4])
    assert len(dec.frames()) == 1
    assert dec.buffered == 4


def test_oversized_frame_is_refused_before_buffering() -> None:
    dec = FrameDecoder(max_frame=100)
    dec.receive_data(encode_frame(FrameType.BLOBS, b"x" * 101)[:5])
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


BATCH = [(3, b"abc"), (0, b""), (70000, b"z" * 1000), (9, b"tail")]


@pytest.mark.parametrize("step", [None, 1, 7, 500])
def test_blobs_frame_round_trips_for_any_chunking(step: int | None) -> None:
    data = blobs_frame(BATCH) + encode_frame(FrameType.HEARTBEAT) + blobs_frame(BATCH[:1])
    chunks = [data] if step is None else [data[i : i + step] for i in range(0, len(data), step)]
    frames = feed(chunks)
    assert [f.type for f in frames] == [FrameType.BLOBS, FrameType.HEARTBEAT, FrameType.BLOBS]
    assert [(i, bytes(d)) for i, d, _ in decode_blobs(frames[0])] == BATCH
    assert [(i, bytes(d)) for i, d, _ in decode_blobs(frames[2])] == BATCH[:1]


def test_split_frame_is_assembled_in_one_buffer() -> None:
    data = blobs_frame([(1, b"x" * 5000)])
    dec = FrameDecoder()
    dec.receive_data(data[:3])
    dec.receive_data(data[3:2000])
    assert dec.frames() == []
    assert dec.buffered == 2000
    dec.receive_data(data[2000:])
    (frame,) = dec.frames()
    assert decode_blobs(frame) == [(1, b"x" * 5000, TAG)]
    assert dec.buffered == 0


def test_large_split_frame_grows_as_it_arrives() -> None:
    payload = b"m" * (5 * 1024 * 1024)
    data = encode_frame(FrameType.MANIFEST, payload)
    frames = feed([data[i : i + 1_000_000] for i in range(0, len(data), 1_000_000)])
    assert len(frames) == 1 and bytes(frames[0].payload) == payload


def test_blobs_table_refuses_empty_and_oversized_batches() -> None:
    with pytest.raises(ValueError):
        blobs_table([])
    with pytest.raises(ValueError):
        blobs_table([(i, 1, TAG) for i in range(MAX_BATCH_BLOBS + 1)])


def _blobs_payload(table: list[int], count: int | None = None, data: bytes = b"") -> Frame:
    """A BLOBS payload whose table lists ``table`` as (index, size) pairs, each with TAG."""
    n = len(table) // 2 if count is None else count
    entries = b"".join(struct.pack("!II", *table[k : k + 2]) + TAG for k in range(0, len(table), 2))
    return Frame(FrameType.BLOBS, struct.pack("!H", n) + entries + data)


@pytest.mark.parametrize(
    "frame",
    [
        Frame(FrameType.BLOBS, b""),  # no count
        Frame(FrameType.BLOBS, b"\x00"),  # half a count
        _blobs_payload([], count=0),  # empty batch
        _blobs_payload([1, 1] * (MAX_BATCH_BLOBS + 1), data=b"x" * (MAX_BATCH_BLOBS + 1)),
        _blobs_payload([1, 2], count=2, data=b"ab"),  # table shorter than announced
        _blobs_payload([1, 3], data=b"ab"),  # sizes exceed the data
        _blobs_payload([1, 1], data=b"ab"),  # trailing bytes
        _blobs_payload(
            [1, MAX_BATCH_BYTES, 2, 1], data=b"x" * (MAX_BATCH_BYTES + 1)
        ),  # several blobs over the byte cap
    ],
)
def test_malformed_blobs_frame_is_a_protocol_error(frame: Frame) -> None:
    with pytest.raises(SyncProtocolError):
        decode_blobs(frame)


def test_single_large_blob_may_exceed_the_batch_byte_cap() -> None:
    data = b"y" * (MAX_BATCH_BYTES + 10)
    (frame,) = feed([blobs_frame([(5, data)])])
    assert decode_blobs(frame) == [(5, data, TAG)]
