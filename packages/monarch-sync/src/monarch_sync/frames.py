"""Wire framing, free of I/O.

Every frame is ``type:u8 | length:u32 | payload | tag:16``: ``length`` counts the payload, and
the tag is the frame's MAC (see :mod:`.protocol`; zeros on the one frame sent before keys
exist, CHALLENGE). TCP has no message boundaries, so :class:`FrameDecoder` keeps its own buffer:
feed it bytes with :meth:`receive_data` and take complete frames from :meth:`frames`. Control
payloads are small JSON objects. Blob data travels in BLOBS frames that carry a run of up to
:data:`MAX_BATCH_BLOBS` blobs (at most :data:`MAX_BATCH_BYTES` of data, or a single larger
blob)::

    count:u16 | count x (index:u32 size:u32 tag:16) | data of the first blob | data of the next

so the per-frame work (header, MAC, decode, await) is paid once per run, not once per blob. Each
index points into the manifest's blob table, so the digest never travels twice; each ``tag`` is
the blob's own MAC (:class:`~monarch_sync.protocol.BlobTags`), made once where the blob enters
the push and forwarded unchanged. The frame's MAC covers the table (with the tags), not the data
(:func:`blobs_covered`). Need-sets travel as bitmaps over that table. Frame types and error
codes each live in one enum here.
"""

from __future__ import annotations

import enum
import json
import struct
from collections.abc import Iterable
from typing import Any, NamedTuple

from .exceptions import FrameTooLarge, SyncProtocolError

__all__ = [
    "MAX_BATCH_BLOBS",
    "MAX_BATCH_BYTES",
    "MAX_FRAME",
    "TAG_SIZE",
    "ErrorCode",
    "Frame",
    "FrameDecoder",
    "FrameType",
    "Payload",
    "bitmap_from_indices",
    "blobs_covered",
    "blobs_table",
    "blobs_table_size",
    "decode_blobs",
    "decode_json",
    "encode_frame",
    "encode_json_payload",
    "indices_from_bitmap",
]

HEADER = struct.Struct("!BI")
TAG_SIZE = 16  # bytes of MAC after every payload
BATCH_COUNT = struct.Struct("!H")
ENTRY_FORMAT = f"II{TAG_SIZE}s"  # index, size, the blob's tag
BATCH_ENTRY = struct.Struct(f"!{ENTRY_FORMAT}")
FRAME_LEN = struct.Struct("!I")
MAX_FRAME = 64 * 1024 * 1024  # manifests of very large trees travel in one frame
PREALLOC = 4 * 1024 * 1024  # split frames up to this size are buffered in one allocation
MAX_BATCH_BLOBS = 64  # blobs per BLOBS frame
MAX_BATCH_BYTES = 256 * 1024  # data per BLOBS frame, unless it holds a single (larger) blob


class FrameType(enum.IntEnum):
    """Every frame type; who may send which, in which state, is the table in :mod:`.protocol`."""

    CHALLENGE = 1  # agent -> connector: 16-byte nonce (the only frame without a MAC)
    HELLO = 2  # connector -> agent: 16-byte nonce | json {"push_id", "sender"}
    MANIFEST = 3  # u32 json length | json {"tree", ...} | manifest bytes
    NEED = 4  # bitmap of blob indices still missing in the subtree
    BLOBS = 5  # u16 count | count x (u32 index, u32 size, tag) | data, data, ...
    REFETCH = 6  # u32 index: that blob arrived corrupted, send it again
    NODE_DONE = 7  # one node's result, relayed upwards for progress
    RESULT = 8  # final list of node results for a subtree
    HEARTBEAT = 9
    ERROR = 10  # {"code": ErrorCode, "message"}
    MANIFEST_WANTED = 11  # child cannot apply the manifest patch: send the full manifest


class ErrorCode(enum.StrEnum):
    """The ``code`` of an ERROR frame, and of a connection the core failed."""

    BAD_TOKEN = "bad_token"  # the peer's MAC does not verify under our token
    BAD_MAC = "bad_mac"  # a frame after the handshake failed authentication
    BAD_FRAME = "bad_frame"  # malformed bytes: unknown type, bad length, bad payload
    UNEXPECTED = "unexpected"  # a frame type not allowed in the connection's state
    TOO_LARGE = "too_large"  # a frame over the limit (small before authentication)
    BAD_PUSH_ID = "bad_push_id"  # push id not 1-64 of [A-Za-z0-9_-]
    BUSY = "busy"  # the agent serves another push that goes first (see Agent)
    FAILED = "failed"  # the node failed its push (message says why)
    REPARENTED = "reparented"  # an ancestor adopted the node: this parent is not needed


Payload = bytes | memoryview  # frames decoded without copying are memoryviews


class Frame(NamedTuple):
    type: FrameType
    payload: Payload
    tag: Payload = b""


def encode_frame(ftype: FrameType, payload: bytes = b"", tag: bytes = bytes(TAG_SIZE)) -> bytes:
    """One whole frame (tests and CHALLENGE; the protocol core tags every other frame)."""
    return HEADER.pack(ftype, len(payload)) + payload + tag


def encode_json_payload(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def decode_json(frame: Frame) -> Any:
    try:
        return json.loads(bytes(frame.payload))
    except ValueError as exc:
        raise SyncProtocolError(f"bad JSON in {frame.type.name} frame") from exc


BlobItem = tuple[int, int, bytes]  # index, size, the blob's tag


def blobs_table(items: list[BlobItem]) -> bytes:
    """The table that opens a BLOBS payload of ``(index, size, tag)`` items, in order.

    The caller sends each blob's data right after it, as further parts of the frame (no copy).
    """
    count = len(items)
    if not 1 <= count <= MAX_BATCH_BLOBS:
        raise ValueError(f"a BLOBS frame holds 1 to {MAX_BATCH_BLOBS} blobs, not {count}")
    return struct.pack(f"!H{ENTRY_FORMAT * count}", count, *[v for item in items for v in item])


def blobs_table_size(payload: Payload) -> int:
    """Bytes of the table that opens a BLOBS payload, as its count announces (at least 2)."""
    if len(payload) < BATCH_COUNT.size:
        return BATCH_COUNT.size
    return BATCH_COUNT.size + BATCH_COUNT.unpack_from(payload)[0] * BATCH_ENTRY.size


def blobs_covered(payload: Payload, *, length: int | None = None) -> bytes:
    """What the frame MAC of a BLOBS frame covers: ``length:u32 | table`` (count and entries,
    tags included), not the data: each blob's tag covers its own.

    ``payload``: the payload, or its first bytes up to the table's end at least (a sender's
    first part, the table) with ``length`` the whole payload's. A received table cut short or
    announcing more than is there covers bytes the sender never tagged, so the MAC fails
    before the parser sees the frame.
    """
    n = len(payload) if length is None else length
    return FRAME_LEN.pack(n) + bytes(payload[: blobs_table_size(payload)])


def decode_blobs(frame: Frame) -> list[tuple[int, Payload, bytes]]:
    """``(index, data, tag)`` for every blob of a BLOBS frame; data are slices of the payload."""
    payload = frame.payload
    n = len(payload)
    if n < BATCH_COUNT.size:
        raise SyncProtocolError("BLOBS frame shorter than its count")
    (count,) = BATCH_COUNT.unpack_from(payload)
    if not 1 <= count <= MAX_BATCH_BLOBS:
        raise SyncProtocolError(f"BLOBS frame announces {count} blobs")
    pos = BATCH_COUNT.size + count * BATCH_ENTRY.size
    if n < pos:
        raise SyncProtocolError("BLOBS frame shorter than its table")
    table = struct.unpack_from(f"!{ENTRY_FORMAT * count}", payload, BATCH_COUNT.size)
    if sum(table[1::3]) != n - pos:
        raise SyncProtocolError("BLOBS frame sizes do not add up to its length")
    if count > 1 and n - pos > MAX_BATCH_BYTES:
        raise SyncProtocolError(f"BLOBS frame carries more than {MAX_BATCH_BYTES} bytes")
    out: list[tuple[int, Payload, bytes]] = []
    view = payload if isinstance(payload, memoryview) else memoryview(payload)
    for k in range(0, 3 * count, 3):
        end = pos + table[k + 1]
        out.append((table[k], view[pos:end], table[k + 2]))
        pos = end
    return out


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
        self._partial = bytearray()  # header bytes of a frame split across chunks
        self._body: bytearray | None = None  # its payload, preallocated once the header is in
        self._filled = 0
        self._size = 0
        self._kind = FrameType.HEARTBEAT
        self.max_frame = max_frame
        self._chunks: list[bytes] = []

    @property
    def _max(self) -> int:
        return self.max_frame

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
        """Type and size of payload plus tag."""
        ftype, size = HEADER.unpack_from(buf, pos)
        if size > self._max:
            raise FrameTooLarge(size, self._max)
        try:
            return FrameType(ftype), size + TAG_SIZE
        except ValueError:
            raise SyncProtocolError(f"unknown frame type {ftype}") from None

    @staticmethod
    def _frame(kind: FrameType, body: memoryview) -> Frame:
        return Frame(kind, body[:-TAG_SIZE], body[-TAG_SIZE:])

    def _start_body(self, kind: FrameType, size: int, head: Payload) -> None:
        """A split frame's header is in: buffer its payload (``head`` is its first bytes)."""
        self._kind, self._size = kind, size
        # Preallocated and filled in place (one copy); a very large frame (a manifest) grows as
        # it arrives instead, so a bare header cannot make us allocate MAX_FRAME up front.
        self._body = bytearray(size) if size <= PREALLOC else bytearray()
        self._fill(head)

    def _fill(self, data: Payload) -> None:
        body = self._body
        assert body is not None
        if len(body) == self._size:  # preallocated
            body[self._filled : self._filled + len(data)] = data
        else:
            body += data
        self._filled += len(data)

    def _parse(self, data: bytes, out: list[Frame]) -> None:
        view = memoryview(data)
        n = len(data)
        pos = 0
        partial = self._partial
        if partial or self._body is not None:  # finish the frame that straddles chunks first
            if self._body is None:
                take = min(HEADER.size - len(partial), n)
                partial += view[:take]
                pos = take
                if len(partial) < HEADER.size:
                    return
                kind, size = self._header(partial, 0)
                partial.clear()
                self._start_body(kind, size, b"")
            take = min(self._size - self._filled, n - pos)
            self._fill(view[pos : pos + take])
            pos += take
            if self._filled < self._size:
                return
            assert self._body is not None
            out.append(self._frame(self._kind, memoryview(self._body)))
            self._body = None
            self._filled = 0
        while n - pos >= HEADER.size:
            kind, size = self._header(data, pos)
            end = pos + HEADER.size + size
            if end > n:
                self._start_body(kind, size, view[pos + HEADER.size :])
                return
            out.append(self._frame(kind, view[pos + HEADER.size : end]))
            pos = end
        if pos < n:
            partial += view[pos:]

    @property
    def buffered(self) -> int:
        split = HEADER.size + self._filled if self._body is not None else len(self._partial)
        return split + sum(len(c) for c in self._chunks)
