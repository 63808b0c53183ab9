"""Binary frames of the monarch-proxy wire protocol.

Each WebSocket binary message carries exactly one frame:

    offset  size  field
    0       1     kind      FrameKind
    1       1     flags     bit 0 (MORE): the payload continues in the next CHUNK message
    2       2     reserved  must be 0
    4       4     meta_len  length of the JSON meta object
    8       8     id        request id (requests and their replies), else 0
    16      8     seq       server->client: sequence number of a reliable frame;
                            client->server: highest server seq the client has received (an ack)
    24      M     meta      UTF-8 JSON object: small routing fields (op, handles, error text)
    24+M    ...   payload   opaque bytes, usually a pickle (never base64, never pickled twice)

The meta object is JSON so the gateway can validate a request before it unpickles anything; the
payload is raw so large arguments cost one copy each way.

Large frames travel in pieces of at most ``PIECE_SIZE`` bytes: the first message is the frame's
own header and meta (with ``"$size"``, the whole payload's length, and the MORE flag) and the
start of the payload; CHUNK messages with the same id and seq carry the rest, MORE set on all
but the last. Pieces of different frames may interleave, so a 64 MiB argument never holds up the
small calls beside it, and no WebSocket message is ever large (Python WebSocket stacks copy a
growing buffer for each big message).

Under load the writers pack several small messages into one BATCH message (a header, then each
message prefixed with its 4-byte length), which saves the per-message cost of the WebSocket
layer on both ends. Receivers unpack a BATCH and handle its messages in order, as if each had
come alone.
"""

from __future__ import annotations

import enum
import json
import struct
from dataclasses import dataclass, field
from typing import Any

from monarch_proxy.errors import FrameTooLargeError, ProtocolError, SessionLimitError

HEADER = struct.Struct("!BBHIQQ")

# Protocol versions this implementation speaks (inclusive range).
MIN_VERSION = 1
MAX_VERSION = 1

DEFAULT_MAX_FRAME_SIZE = 256 * 1024 * 1024
MAX_META_SIZE = 1024 * 1024
PIECE_SIZE = 1024 * 1024
FLAG_MORE = 0x01
SIZE_KEY = "$size"
LENGTH = struct.Struct("!I")
BATCH_LIMIT = 256 * 1024  # messages up to this size are packed together by the writers
# Frames a peer may leave half sent in pieces at once (each may be up to the frame size).
DEFAULT_MAX_PARTIAL_FRAMES = 16


class FrameKind(enum.IntEnum):
    # client -> server
    HELLO = 1
    REQUEST = 2
    RELEASE = 3
    ACK = 4
    BYE = 5
    # server -> client
    WELCOME = 16
    REPLY = 17
    FAILURE = 18
    ITEM = 19
    LOG = 20
    ERROR = 21
    MEMBERS = 22  # the meshes' workers changed (one lost, one replaced): meta says how they stand
    FAULT = 23  # an actor or process of one of the session's meshes failed (Monarch's supervision)
    # either direction
    CHUNK = 32
    BATCH = 33


# Server frames that are sequenced, buffered until acked, and replayed after a resume.
RELIABLE_KINDS = frozenset({FrameKind.REPLY, FrameKind.FAILURE, FrameKind.ITEM})


@dataclass(frozen=True, slots=True)
class Frame:
    kind: FrameKind
    id: int = 0
    seq: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    payload: bytes | memoryview = b""
    more: bool = False  # set on decoded pieces that the next CHUNK continues

    def encode(self) -> bytes:
        """Serialize to the bytes of one WebSocket message."""
        return b"".join(self._pieces_of(self.meta, self.payload, 0))

    def pieces(self, piece_size: int = PIECE_SIZE) -> list[bytes]:
        """Serialize to one or more WebSocket messages of at most ``piece_size`` payload bytes."""
        payload = memoryview(self.payload)
        if len(payload) <= piece_size:
            return [self.encode()]
        out = [
            b"".join(
                self._pieces_of(
                    {**self.meta, SIZE_KEY: len(payload)}, payload[:piece_size], FLAG_MORE
                )
            )
        ]
        for start in range(piece_size, len(payload), piece_size):
            flags = FLAG_MORE if start + piece_size < len(payload) else 0
            out.append(
                HEADER.pack(FrameKind.CHUNK, flags, 0, 0, self.id, self.seq)
                + payload[start : start + piece_size]
            )
        return out

    def _pieces_of(
        self, meta: dict[str, Any], payload: bytes | memoryview, flags: int
    ) -> tuple[bytes, bytes, bytes | memoryview]:
        encoded = json.dumps(meta, separators=(",", ":")).encode() if meta else b""
        header = HEADER.pack(self.kind, flags, 0, len(encoded), self.id, self.seq)
        return header, encoded, payload


def decode(data: bytes | memoryview, *, max_size: int = DEFAULT_MAX_FRAME_SIZE) -> Frame:
    """Parse one frame; raise :class:`ProtocolError` naming what is wrong.

    The payload is returned as a memoryview into ``data`` so large payloads are not copied.
    """
    view = memoryview(data)
    if len(view) > max_size:
        raise FrameTooLargeError(len(view), max_size)
    if len(view) < HEADER.size:
        raise ProtocolError(
            f"frame of {len(view)} bytes is shorter than the {HEADER.size}-byte header"
        )
    kind_byte, flags, reserved, meta_len, ident, seq = HEADER.unpack_from(view)
    try:
        kind = FrameKind(kind_byte)
    except ValueError:
        raise ProtocolError(f"unknown frame kind {kind_byte}") from None
    if flags & ~FLAG_MORE or reserved:
        raise ProtocolError(f"reserved header bits set in a {kind.name} frame")
    if meta_len > MAX_META_SIZE or HEADER.size + meta_len > len(view):
        raise ProtocolError(
            f"{kind.name} frame declares {meta_len} bytes of meta but carries "
            f"{len(view) - HEADER.size}"
        )
    meta = parse_meta(bytes(view[HEADER.size : HEADER.size + meta_len]), kind) if meta_len else {}
    return Frame(kind, ident, seq, meta, view[HEADER.size + meta_len :], bool(flags & FLAG_MORE))


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


_DECODER = json.JSONDecoder(parse_constant=_no_constant)  # built once: loads() would per call


def parse_meta(raw: bytes, kind: FrameKind) -> dict[str, Any]:
    """A frame's JSON meta object; every way JSON can be wrong becomes a :class:`ProtocolError`.

    Strict JSON only: ``NaN`` and ``Infinity`` are refused, an integer past Python's limit of
    4,300 digits (a ValueError) and deep nesting (a RecursionError in the parser) are refused
    like any other malformed meta. Fields are type- and range-checked where they are used.
    """
    try:
        meta = _DECODER.decode(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError too
        raise ProtocolError(f"{kind.name} frame meta is not valid JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise ProtocolError(f"{kind.name} frame meta must be a JSON object")
    return meta


def batch(messages: list[bytes]) -> bytes:
    """Pack messages into one BATCH message (a single message is returned as it is)."""
    if len(messages) == 1:
        return messages[0]
    parts = [HEADER.pack(FrameKind.BATCH, 0, 0, 0, 0, 0)]
    for message in messages:
        parts += (LENGTH.pack(len(message)), message)
    return b"".join(parts)


def unbatch(frame: Frame) -> list[memoryview]:
    """The messages inside a BATCH frame."""
    view, messages, offset = memoryview(frame.payload), [], 0
    while offset < len(view):
        if offset + LENGTH.size > len(view):
            raise ProtocolError("BATCH frame ends inside a length prefix")
        (length,) = LENGTH.unpack_from(view, offset)
        offset += LENGTH.size
        if offset + length > len(view):
            raise ProtocolError(f"BATCH frame announces {length} bytes past its end")
        messages.append(view[offset : offset + length])
        offset += length
    return messages


def decode_message(data: bytes | memoryview, *, max_size: int) -> list[Frame]:
    """Every frame (or piece) in one WebSocket message: one, or the contents of a BATCH."""
    frame = decode(data, max_size=max_size)
    if frame.kind is not FrameKind.BATCH:
        return [frame]
    inner = [decode(message, max_size=max_size) for message in unbatch(frame)]
    if any(f.kind is FrameKind.BATCH for f in inner):
        raise ProtocolError("BATCH frames do not nest")
    return inner


def pack_for_sending(messages: list[bytes]) -> list[bytes]:
    """Group queued messages, in order, into as few WebSocket messages as is useful."""
    out: list[bytes] = []
    run: list[bytes] = []
    run_size = 0
    for message in messages:
        if len(message) > BATCH_LIMIT:
            if run:
                out.append(batch(run))
                run, run_size = [], 0
            out.append(message)
            continue
        if run_size + len(message) > BATCH_LIMIT and run:
            out.append(batch(run))
            run, run_size = [], 0
        run.append(message)
        run_size += len(message)
    if run:
        out.append(batch(run))
    return out


class Reassembler:
    """Joins a frame sent in pieces back into one :class:`Frame`.

    ``feed`` takes each decoded message and returns the complete frame once its last piece is
    in (at once for a frame sent whole). The declared size is checked against ``max_size``
    first; the pieces are kept as they came and joined once, at the end.
    """

    def __init__(
        self,
        max_size: int = DEFAULT_MAX_FRAME_SIZE,
        *,
        max_partial_frames: int = DEFAULT_MAX_PARTIAL_FRAMES,
        max_partial_bytes: int | None = None,
    ) -> None:
        self.max_size = max_size
        # Security limits: a peer that starts frames and never finishes them holds at most this
        # many frames, and this many declared bytes, in memory (SessionLimitError past them).
        self.max_partial_frames = max_partial_frames
        self.max_partial_bytes = 2 * max_size if max_partial_bytes is None else max_partial_bytes
        self.partial_bytes = 0  # declared sizes of the frames half received
        # (id, seq) -> first piece, declared size, bytes so far, the pieces' payloads
        self._partial: dict[tuple[int, int], tuple[Frame, int, int, list[bytes | memoryview]]] = {}

    def feed(self, frame: Frame) -> Frame | None:
        key = (frame.id, frame.seq)
        if frame.kind is FrameKind.CHUNK:
            if key not in self._partial:
                raise ProtocolError(
                    f"CHUNK for id {frame.id} seq {frame.seq} without a first piece"
                )
            first, size, filled, parts = self._partial[key]
            filled += len(frame.payload)
            if filled > size or (not frame.more and filled != size):
                raise ProtocolError(
                    f"pieces of {first.kind.name} {frame.id} do not add up to "
                    f"its declared {size} bytes"
                )
            parts.append(frame.payload)
            if frame.more:
                self._partial[key] = (first, size, filled, parts)
                return None
            del self._partial[key]
            self.partial_bytes -= size
            return Frame(first.kind, first.id, first.seq, first.meta, b"".join(parts))
        if not frame.more:
            return frame
        size = frame.meta.pop(SIZE_KEY, None)
        if not isinstance(size, int) or size < len(frame.payload):
            raise ProtocolError(
                f"first piece of {frame.kind.name} {frame.id} has no valid {SIZE_KEY}"
            )
        if size > self.max_size:
            raise FrameTooLargeError(size, self.max_size)
        if key in self._partial:
            raise ProtocolError(f"{frame.kind.name} {frame.id} started twice")
        if len(self._partial) >= self.max_partial_frames:
            raise SessionLimitError(
                "partial_frames", len(self._partial) + 1, self.max_partial_frames
            )
        if self.partial_bytes + size > self.max_partial_bytes:
            raise SessionLimitError(
                "partial_bytes", self.partial_bytes + size, self.max_partial_bytes
            )
        self.partial_bytes += size
        self._partial[key] = (frame, size, len(frame.payload), [frame.payload])
        return None

    def reset(self) -> None:
        """Drop half-received frames (the connection they came on is gone)."""
        self._partial.clear()
        self.partial_bytes = 0
