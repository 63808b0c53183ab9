"""Client side of a session, without I/O.

The adapter feeds every received WebSocket message to :meth:`ClientSession.receive` and sends
whatever bytes the methods return. The session owns request ids, the table of requests still
waiting for a reply (kept encoded so they can be sent again after a reconnect) and the highest
server sequence number seen, which it acknowledges on every frame it sends.
"""

from __future__ import annotations

from typing import Any

from monarch_proxy.errors import FrameTooLargeError, ProtocolError
from monarch_proxy.protocol.events import (
    Failed,
    Logged,
    MembershipChanged,
    Rejected,
    Replied,
    Streamed,
    Welcomed,
)
from monarch_proxy.protocol.frames import (
    DEFAULT_MAX_FRAME_SIZE,
    MAX_VERSION,
    MIN_VERSION,
    SERVER_KINDS,
    Frame,
    FrameKind,
    Reassembler,
    decode_message,
)

ClientEvent = Welcomed | Replied | Failed | Streamed | Logged | MembershipChanged | Rejected


class ClientSession:
    def __init__(
        self,
        *,
        versions: tuple[int, int] = (MIN_VERSION, MAX_VERSION),
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
    ) -> None:
        self.versions = versions
        self.session_id: str | None = None
        self.version: int | None = None
        # Until WELCOME says otherwise, assume the gateway takes what we take.
        self.max_frame_size = max_frame_size
        self.receive_limit = max_frame_size
        self._next_id = 1
        self._pending: dict[int, list[bytes]] = {}  # encoded pieces, kept to replay on resume
        self._reassembler = Reassembler(max_frame_size)
        self._last_seq = 0  # every server seq up to here has been received
        self._seen_ahead: set[int] = set()  # received seqs beyond a gap (frames may interleave)
        self._acked_seq = 0

    @property
    def pending_ids(self) -> list[int]:
        return list(self._pending)

    def hello(self) -> bytes:
        """The first frame on every connection: a new session, or a resume of the current one."""
        meta: dict[str, Any] = {"versions": list(self.versions), "client": "monarch-proxy"}
        if self.session_id is not None:
            meta["session"] = self.session_id
            meta["last_seq"] = self._last_seq
        return Frame(FrameKind.HELLO, meta=meta).encode()

    def request(
        self, op: str, meta: dict[str, Any], payload: bytes = b""
    ) -> tuple[int, list[bytes]]:
        """Allocate a request id and encode the request as messages to send in order.

        Raises :class:`FrameTooLargeError` (using no id) if it is over the gateway's limit.
        """
        if len(payload) > self.max_frame_size:
            raise FrameTooLargeError(len(payload), self.max_frame_size)
        request_id = self._next_id
        pieces = Frame(
            FrameKind.REQUEST, request_id, self._take_ack(), {"op": op, **meta}, payload
        ).pieces()
        self._next_id += 1
        self._pending[request_id] = pieces
        return request_id, pieces

    def forget(self, request_id: int) -> None:
        """Stop tracking a request (e.g. it could not be sent and was failed locally)."""
        self._pending.pop(request_id, None)

    def release(self, handles: list[int]) -> bytes:
        return Frame(FrameKind.RELEASE, seq=self._take_ack(), meta={"handles": handles}).encode()

    def ack(self) -> bytes | None:
        """An ACK frame if the gateway has not yet heard of everything we received."""
        if self._last_seq == self._acked_seq:
            return None
        return Frame(FrameKind.ACK, seq=self._take_ack()).encode()

    def bye(self) -> bytes:
        return Frame(FrameKind.BYE, seq=self._take_ack()).encode()

    def _take_ack(self) -> int:
        self._acked_seq = self._last_seq
        return self._last_seq

    def connection_lost(self) -> None:
        """Forget frames that were half received on the connection that just ended."""
        self._reassembler.reset()

    def receive(self, data: bytes | memoryview) -> list[ClientEvent]:
        """Parse one message from the gateway. Raises :class:`ProtocolError` if it is malformed."""
        return [
            event
            for piece in decode_message(data, max_size=self.receive_limit)
            for event in self._receive_frame(piece)
        ]

    def _receive_frame(self, piece: Frame) -> list[ClientEvent]:
        frame = self._reassembler.feed(piece)
        if frame is None:
            return []
        if frame.kind not in SERVER_KINDS:
            raise ProtocolError(f"gateway sent a client-only {frame.kind.name} frame")
        kind = frame.kind
        if kind is FrameKind.WELCOME:
            return [self._welcomed(frame)]
        if kind is FrameKind.LOG:
            return [
                Logged(
                    str(frame.meta.get("stream", "stdout")),
                    bytes(frame.payload).decode("utf-8", "replace"),
                )
            ]
        if kind is FrameKind.MEMBERS:
            return [MembershipChanged(dict(frame.meta))]
        if kind is FrameKind.ERROR:
            return [Rejected(str(frame.meta.get("code", "error")), str(frame.meta.get("message")))]
        # Reliable frames: drop what a resume replayed twice.
        if frame.seq <= self._last_seq or frame.seq in self._seen_ahead:
            return []
        self._seen_ahead.add(frame.seq)
        while self._last_seq + 1 in self._seen_ahead:
            self._last_seq += 1
            self._seen_ahead.discard(self._last_seq)
        if kind is FrameKind.ITEM:
            return [Streamed(frame.id, frame.meta, frame.payload)]
        if self._pending.pop(frame.id, None) is None:
            raise ProtocolError(f"gateway answered request {frame.id}, which is not pending")
        if kind is FrameKind.REPLY:
            return [Replied(frame.id, frame.meta, frame.payload)]
        return [Failed(frame.id, frame.meta, frame.payload)]

    def _welcomed(self, frame: Frame) -> Welcomed:
        meta = frame.meta
        try:
            version = int(meta["version"])
            session_id = str(meta["session"])
            resumed = bool(meta.get("resumed", False))
            max_frame = int(meta["max_frame_size"])
            last_request = int(meta.get("last_request", 0))
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"WELCOME frame is missing or has a bad field: {exc}") from None
        if not self.versions[0] <= version <= self.versions[1]:
            raise ProtocolError(f"gateway chose protocol version {version}, which we never offered")
        self.version, self.session_id, self.max_frame_size = version, session_id, max_frame
        replay: list[bytes] = []
        if resumed:
            # The gateway has every request up to last_request; later ones it may have (and
            # ignores twice) or never got.
            replay = [
                piece
                for rid, pieces in self._pending.items()
                if rid > last_request
                for piece in pieces
            ]
        return Welcomed(version, session_id, resumed, max_frame, replay)
