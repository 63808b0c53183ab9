"""Wire framing, free of I/O.

Every frame is ``type:u8 | length:u32 | payload``. TCP has no message boundaries, so
:class:`FrameDecoder` keeps its own buffer: feed it bytes with :meth:`receive_data` and take
complete frames from :meth:`frames`. Control payloads are small JSON objects; BLOB payloads are
``index:u32 | bytes`` where the index points into the manifest's blob table, so the digest never
travels twice. Need-sets travel as bitmaps over that same table.
"""

from __future__ import annotations

import enum
import json
import struct
from collections.abc import Iterable
from typing import Any, NamedTuple

from .exceptions import FrameTooLarge, SyncProtocolError

__all__ = [
    "MAX_FRAME",
    "Frame",
    "FrameDecoder",
    "FrameType",
    "Payload",
    "bitmap_from_indices",
    "decode_blob",
    "decode_json",
    "encode_blob_header",
    "encode_frame",
    "encode_json",
    "indices_from_bitmap",
]

HEADER = struct.Struct("!BI")
BLOB_INDEX = struct.Struct("!I")
MAX_FRAME = 64 * 1024 * 1024  # manifests of very large trees travel in one frame


class FrameType(enum.IntEnum):
    CHALLENGE = 1  # agent -> connector: {"nonce": hex}
    HELLO = 2  # connector -> agent: {"mac", "push_id", "sender"}
    MANIFEST = 3  # u32 json length | json {"tree", ...} | manifest bytes
    NEED = 4  # bitmap of blob indices still missing in the subtree
    BLOB = 5  # u32 index | data
    DONE = 6  # parent has offered every blob
    REFETCH = 7  # u32 index: that blob arrived corrupted, send it again
    NODE_DONE = 8  # one node's result, relayed upwards for progress
    RESULT = 9  # final list of node results for a subtree
    HEARTBEAT = 10
    ERROR = 11  # {"code", "message"}
    MANIFEST_WANTED = 12  # child cannot apply the manifest patch: send the full manifest


Payload = bytes | memoryview  # frames decoded without copying are memoryviews


class Frame(NamedTuple):
    type: FrameType
    payload: Payload


def encode_frame(ftype: FrameType, payload: bytes = b"") -> bytes:
    return HEADER.pack(ftype, len(payload)) + payload


def encode_json(ftype: FrameType, obj: Any) -> bytes:
    return encode_frame(ftype, json.dumps(obj, separators=(",", ":")).encode())


def decode_json(frame: Frame) -> Any:
    try:
        return json.loads(bytes(frame.payload))
    except ValueError as exc:
        raise SyncProtocolError(f"bad JSON in {frame.type.name} frame") from exc


def encode_blob_header(index: int, size: int) -> bytes:
    """Header for a BLOB frame; the caller writes the data right after it (no copy)."""
    return HEADER.pack(FrameType.BLOB, BLOB_INDEX.size + size) + BLOB_INDEX.pack(index)


def decode_blob(frame: Frame) -> tuple[int, Payload]:
    if len(frame.payload) < BLOB_INDEX.size:
        raise SyncProtocolError("BLOB frame shorter than its index")
    (index,) = BLOB_INDEX.unpack_from(frame.payload)
    return index, frame.payload[BLOB_INDEX.size :]


def bitmap_from_indices(indices: Iterable[int], count: int) -> bytes:
    bits = bytearray((count + 7) // 8)
    for i in indices:
        bits[i >> 3] |= 1 << (i & 7)
    return bytes(bits)


def indices_from_bitmap(bits: Payload, count: int) -> set[int]:
    if len(bits) != (count + 7) // 8:
        raise SyncProtocolError(f"need bitmap of {len(bits)} bytes for {count} blobs")
    out: set[int] = set()
    for byte_i, byte in enumerate(bits):
        if byte:
            base = byte_i << 3
            for bit in range(8):
                if byte >> bit & 1:
                    out.add(base + bit)
    if out and max(out) >= count:
        raise SyncProtocolError("need bitmap names a blob past the table")
    return out


class FrameDecoder:
    """Incremental frame parser. Malformed input raises :class:`SyncProtocolError`.

    Frames that lie whole inside one received chunk are returned as memoryview slices of it
    (no copy); only a frame split across chunks is assembled in a buffer.
    """

    def __init__(self, *, max_frame: int = MAX_FRAME) -> None:
        self._partial = bytearray()
        self._chunks: list[bytes] = []
        self._max = max_frame

    def receive_data(self, data: bytes) -> None:
        if data:
            self._chunks.append(data)

    def frames(self) -> list[Frame]:
        out: list[Frame] = []
        chunks, self._chunks = self._chunks, []
        for data in chunks:
            self._parse(data, out)
        return out

    def _header(self, buf: bytes | bytearray | memoryview, pos: int) -> tuple[FrameType, int]:
        ftype, size = HEADER.unpack_from(buf, pos)
        if size > self._max:
            raise FrameTooLarge(size, self._max)
        try:
            return FrameType(ftype), size
        except ValueError:
            raise SyncProtocolError(f"unknown frame type {ftype}") from None

    def _parse(self, data: bytes, out: list[Frame]) -> None:
        view = memoryview(data)
        n = len(data)
        pos = 0
        partial = self._partial
        if partial:  # finish the frame that straddles the previous chunk first
            if len(partial) < HEADER.size:
                take = min(HEADER.size - len(partial), n)
                partial += view[:take]
                pos = take
                if len(partial) < HEADER.size:
                    return
            kind, size = self._header(partial, 0)
            take = min(HEADER.size + size - len(partial), n - pos)
            partial += view[pos : pos + take]
            pos += take
            if len(partial) < HEADER.size + size:
                return
            out.append(Frame(kind, bytes(partial[HEADER.size :])))
            partial.clear()
        while n - pos >= HEADER.size:
            kind, size = self._header(data, pos)
            end = pos + HEADER.size + size
            if end > n:
                break
            out.append(Frame(kind, view[pos + HEADER.size : end]))
            pos = end
        if pos < n:
            partial += view[pos:]

    @property
    def buffered(self) -> int:
        return len(self._partial) + sum(len(c) for c in self._chunks)
