"""Binary frames of the monarch-proxy wire protocol.

Each WebSocket binary message carries exactly one frame:

    offset  size  field
    0       1     kind      FrameKind
    1       1     flags     reserved, must be 0
    2       2     reserved  must be 0
    4       4     meta_len  length of the JSON meta object
    8       8     id        request id (requests and their replies), else 0
    16      8     seq       server->client: sequence number of a reliable frame;
                            client->server: highest server seq the client has received (an ack)
    24      M     meta      UTF-8 JSON object: small routing fields (op, handles, error text)
    24+M    ...   payload   opaque bytes, usually a pickle (never base64, never pickled twice)

The meta object is JSON so the gateway can validate a request before it unpickles anything; the
payload is raw so large arguments cost one copy each way.
"""

from __future__ import annotations

import enum
import json
import struct
from dataclasses import dataclass, field
from typing import Any

from monarch_proxy.errors import FrameTooLargeError, ProtocolError

HEADER = struct.Struct("!BBHIQQ")

# Protocol versions this implementation speaks (inclusive range).
MIN_VERSION = 1
MAX_VERSION = 1

DEFAULT_MAX_FRAME_SIZE = 256 * 1024 * 1024
MAX_META_SIZE = 1024 * 1024


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


CLIENT_KINDS = frozenset({FrameKind.HELLO, FrameKind.REQUEST, FrameKind.RELEASE, FrameKind.ACK,
                          FrameKind.BYE})
SERVER_KINDS = frozenset(FrameKind) - CLIENT_KINDS
# Server frames that are sequenced, buffered until acked, and replayed after a resume.
RELIABLE_KINDS = frozenset({FrameKind.REPLY, FrameKind.FAILURE, FrameKind.ITEM})


@dataclass(frozen=True, slots=True)
class Frame:
    kind: FrameKind
    id: int = 0
    seq: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    payload: bytes | memoryview = b""

    def encode(self) -> bytes:
        """Serialize to the bytes of one WebSocket message."""
        meta = json.dumps(self.meta, separators=(",", ":")).encode() if self.meta else b""
        header = HEADER.pack(self.kind, 0, 0, len(meta), self.id, self.seq)
        # One join: the payload is copied once, whatever its size.
        return b"".join((header, meta, self.payload))


def decode(data: bytes | memoryview, *, max_size: int = DEFAULT_MAX_FRAME_SIZE) -> Frame:
    """Parse one frame; raise :class:`ProtocolError` naming what is wrong.

    The payload is returned as a memoryview into ``data`` so large payloads are not copied.
    """
    view = memoryview(data)
    if len(view) > max_size:
        raise FrameTooLargeError(len(view), max_size)
    if len(view) < HEADER.size:
        raise ProtocolError(f"frame of {len(view)} bytes is shorter than the {HEADER.size}-byte header")
    kind_byte, flags, reserved, meta_len, ident, seq = HEADER.unpack_from(view)
    try:
        kind = FrameKind(kind_byte)
    except ValueError:
        raise ProtocolError(f"unknown frame kind {kind_byte}") from None
    if flags or reserved:
        raise ProtocolError(f"reserved header bits set in a {kind.name} frame")
    if meta_len > MAX_META_SIZE or HEADER.size + meta_len > len(view):
        raise ProtocolError(
            f"{kind.name} frame declares {meta_len} bytes of meta but carries "
            f"{len(view) - HEADER.size}"
        )
    meta: dict[str, Any] = {}
    if meta_len:
        try:
            meta = json.loads(bytes(view[HEADER.size : HEADER.size + meta_len]))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ProtocolError(f"{kind.name} frame meta is not valid JSON: {exc}") from None
        if not isinstance(meta, dict):
            raise ProtocolError(f"{kind.name} frame meta must be a JSON object")
    return Frame(kind, ident, seq, meta, view[HEADER.size + meta_len :])
