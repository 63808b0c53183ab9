"""Gateway side of a session, without I/O.

A session outlives its connections: when a client drops, the gateway keeps the session (its
handles, running calls and the replies they produce) for a grace period. Every reply-bearing
frame gets a sequence number and stays buffered until the client acknowledges it, so a client
that reconnects with ``HELLO{session, last_seq}`` is sent exactly what it missed. Requests carry
increasing ids, so the session also tells the client the last request it received and ignores
requests sent twice.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from monarch_proxy.errors import ProtocolError, ProtocolVersionError
from monarch_proxy.protocol.events import Departed, Released, Requested
from monarch_proxy.protocol.frames import (
    CLIENT_KINDS,
    DEFAULT_MAX_FRAME_SIZE,
    MAX_VERSION,
    MIN_VERSION,
    Frame,
    FrameKind,
    Reassembler,
    decode_message,
)

ServerEvent = Requested | Released | Departed

# How far request ids may run ahead of the last contiguous one (pieces of big requests can make
# later small ones complete first); bounds the memory a misbehaving client can make us hold.
MAX_REQUESTS_AHEAD = 1 << 16


def negotiate(hello: Frame, supported: tuple[int, int] = (MIN_VERSION, MAX_VERSION)) -> int:
    """Pick the highest protocol version both sides speak, from a HELLO frame."""
    if hello.kind is not FrameKind.HELLO:
        raise ProtocolError(f"the first frame must be HELLO, not {hello.kind.name}")
    try:
        low, high = (int(v) for v in hello.meta["versions"])
    except (KeyError, TypeError, ValueError):
        raise ProtocolError("HELLO frame must carry versions: [min, max]") from None
    chosen = min(high, supported[1])
    if chosen < max(low, supported[0]):
        raise ProtocolVersionError.between((low, high), supported)
    return chosen


def error_frame(code: str, message: str) -> bytes:
    """A connection-level ERROR frame, sent just before the gateway closes the connection."""
    return Frame(FrameKind.ERROR, meta={"code": code, "message": message}).encode()


class ServerSession:
    def __init__(
        self, session_id: str, version: int, *, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    ) -> None:
        self.session_id = session_id
        self.version = version
        self.max_frame_size = max_frame_size
        self.last_request = 0  # every request id up to here has been received
        self._requests_ahead: set[int] = set()  # received ids beyond a gap (pieces interleave)
        self._seq = 0
        self._unacked: deque[tuple[int, list[bytes]]] = deque()
        self.unacked_bytes = 0
        self._reassembler = Reassembler(max_frame_size)

    def welcome(self, *, resumed: bool) -> bytes:
        meta = {
            "version": self.version,
            "session": self.session_id,
            "resumed": resumed,
            "max_frame_size": self.max_frame_size,
            "last_request": self.last_request,
        }
        return Frame(FrameKind.WELCOME, meta=meta).encode()

    def resume(self, hello: Frame) -> list[bytes]:
        """Acknowledge what the reconnecting client already has; return what it missed."""
        try:
            last_seq = int(hello.meta.get("last_seq", 0))
        except (TypeError, ValueError):
            raise ProtocolError("HELLO last_seq must be an integer") from None
        self._acknowledge(last_seq)
        self._reassembler.reset()
        return [piece for _, pieces in self._unacked for piece in pieces]

    def receive(self, data: bytes | memoryview) -> list[ServerEvent]:
        """Parse one client message. Raises :class:`ProtocolError` if it is malformed."""
        return [
            event
            for piece in decode_message(data, max_size=self.max_frame_size)
            for event in self._receive_frame(piece)
        ]

    def _receive_frame(self, piece: Frame) -> list[ServerEvent]:
        if piece.kind is not FrameKind.CHUNK and (
            piece.kind not in CLIENT_KINDS or piece.kind is FrameKind.HELLO
        ):
            raise ProtocolError(f"unexpected {piece.kind.name} frame in an open session")
        frame = self._reassembler.feed(piece)
        if frame is None:
            return []
        self._acknowledge(frame.seq)
        if frame.kind is FrameKind.REQUEST:
            if frame.id <= self.last_request or frame.id in self._requests_ahead:
                return []  # sent again after a resume; we already have it
            if frame.id > self.last_request + MAX_REQUESTS_AHEAD:
                raise ProtocolError(
                    f"request id {frame.id} is far ahead of {self.last_request}; request ids "
                    "must count up from 1"
                )
            self._requests_ahead.add(frame.id)
            while self.last_request + 1 in self._requests_ahead:
                self.last_request += 1
                self._requests_ahead.discard(self.last_request)
            op = frame.meta.get("op")
            if not isinstance(op, str):
                raise ProtocolError(f"request {frame.id} has no op")
            return [Requested(frame.id, op, frame.meta, frame.payload)]
        if frame.kind is FrameKind.RELEASE:
            handles = frame.meta.get("handles")
            if not isinstance(handles, list) or not all(isinstance(h, int) for h in handles):
                raise ProtocolError("RELEASE frame must carry handles: [int, ...]")
            return [Released(handles)]
        if frame.kind is FrameKind.BYE:
            return [Departed()]
        return []  # ACK: already applied above

    # Reliable frames: each returns the messages to send, in order.
    def reply(self, request_id: int, meta: dict[str, Any], payload: bytes = b"") -> list[bytes]:
        return self._reliable(FrameKind.REPLY, request_id, meta, payload)

    def failure(self, request_id: int, meta: dict[str, Any], payload: bytes = b"") -> list[bytes]:
        return self._reliable(FrameKind.FAILURE, request_id, meta, payload)

    def item(self, request_id: int, meta: dict[str, Any], payload: bytes = b"") -> list[bytes]:
        return self._reliable(FrameKind.ITEM, request_id, meta, payload)

    @staticmethod
    def log(stream: str, text: str) -> bytes:
        return Frame(FrameKind.LOG, meta={"stream": stream}, payload=text.encode()).encode()

    @staticmethod
    def members(state: dict[str, Any]) -> bytes:
        return Frame(FrameKind.MEMBERS, meta=state).encode()

    def _reliable(
        self, kind: FrameKind, request_id: int, meta: dict[str, Any], payload: bytes
    ) -> list[bytes]:
        self._seq += 1
        pieces = Frame(kind, request_id, self._seq, meta, payload).pieces()
        self._unacked.append((self._seq, pieces))
        self.unacked_bytes += sum(len(p) for p in pieces)
        return pieces

    def _acknowledge(self, seq: int) -> None:
        if seq > self._seq:
            raise ProtocolError(f"client acknowledged seq {seq}, but only {self._seq} were sent")
        while self._unacked and self._unacked[0][0] <= seq:
            self.unacked_bytes -= sum(len(p) for p in self._unacked.popleft()[1])
