"""Client side of a session, without I/O.

The adapter feeds every received WebSocket message to :meth:`ClientSession.receive` and sends
whatever bytes the methods return. The session owns request ids, the table of requests still
waiting for a reply (kept encoded so they can be sent again after a reconnect) and the highest
server sequence number seen, which it acknowledges on every frame it sends.

Its state follows :mod:`~monarch_proxy.protocol.states`: HANDSHAKE until WELCOME (on every
connection: :meth:`hello` opens it, :meth:`connection_lost` returns to it), then OPEN; an
ERROR frame or a malformed one makes it CLOSED. The handshake's outcome is decided here too:
a WELCOME that resumes yields the requests to send again, and one that does not (the gateway
lost the session) yields the requests that are lost. :meth:`receive` never raises; a broken
frame becomes a :class:`ConnectionFailed` event. Sending in CLOSED raises
:class:`InvalidStateError` at once.
"""

from __future__ import annotations

from typing import Any

from monarch_proxy.errors import FrameTooLargeError, InvalidStateError, ProtocolError
from monarch_proxy.protocol.events import (
    ConnectionFailed,
    Failed,
    Faulted,
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
    Frame,
    FrameKind,
    Reassembler,
    decode_message,
)
from monarch_proxy.protocol.names import CloseCode, Op
from monarch_proxy.protocol.states import ACCEPTS, TRANSITIONS, Side, State

__all__ = ["ClientEvent", "ClientSession"]

ClientEvent = (
    Welcomed
    | Replied
    | Failed
    | Streamed
    | Logged
    | MembershipChanged
    | Faulted
    | Rejected
    | ConnectionFailed
)


class ClientSession:
    side = Side.CLIENT
    _accepts = ACCEPTS[Side.CLIENT]  # this side's rows of the tables, looked up once
    _transitions = TRANSITIONS[Side.CLIENT]

    def __init__(
        self,
        *,
        versions: tuple[int, int] = (MIN_VERSION, MAX_VERSION),
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        keep_procs: bool = False,
    ) -> None:
        self.versions = versions
        self.keep_procs = keep_procs
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
        self.state = State.HANDSHAKE
        self.failure: ProtocolError | None = None

    @property
    def pending_ids(self) -> list[int]:
        return list(self._pending)

    def hello(self) -> bytes:
        """The first frame on every connection: a new session, or a resume of the current one."""
        if self.state is not State.HANDSHAKE:
            raise InvalidStateError(
                f"HELLO is sent only before WELCOME, not when {self.state.name}"
            )
        meta: dict[str, Any] = {"versions": list(self.versions), "client": "monarch-proxy"}
        if self.keep_procs:
            meta["keep_procs"] = True
        if self.session_id is not None:
            meta["session"] = self.session_id
            meta["last_seq"] = self._last_seq
        return Frame(FrameKind.HELLO, meta=meta).encode()

    def request(
        self, op: Op, meta: dict[str, Any], payload: bytes = b""
    ) -> tuple[int, list[bytes]]:
        """Allocate a request id and encode the request as messages to send in order.

        Raises :class:`FrameTooLargeError` (using no id) if it is over the gateway's limit.
        While disconnected (HANDSHAKE) the request is kept and sent on resume.
        """
        self._check_not_closed("REQUEST")
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
        self._check_not_closed("RELEASE")
        return Frame(FrameKind.RELEASE, seq=self._take_ack(), meta={"handles": handles}).encode()

    def ack(self) -> bytes | None:
        """An ACK frame if the gateway has not yet heard of everything we received."""
        if self._last_seq == self._acked_seq:
            return None
        return Frame(FrameKind.ACK, seq=self._take_ack()).encode()

    def bye(self) -> bytes:
        return Frame(FrameKind.BYE, seq=self._take_ack()).encode()

    def _check_not_closed(self, what: str) -> None:
        if self.state is State.CLOSED:
            raise InvalidStateError(f"cannot send {what}: the session is closed ({self.failure})")

    def _take_ack(self) -> int:
        self._acked_seq = self._last_seq
        return self._last_seq

    def connection_lost(self) -> None:
        """The connection ended: forget half-received frames; the next one starts with HELLO."""
        self._reassembler.reset()
        if self.state is State.OPEN:
            self.state = State.HANDSHAKE

    def receive(self, data: bytes | memoryview | str) -> list[ClientEvent]:
        """Parse one message from the gateway. Never raises (see the module docstring)."""
        if self.state is State.CLOSED:
            return []
        events: list[ClientEvent] = []
        try:
            if isinstance(data, str):
                raise ProtocolError("text messages are not part of the protocol")
            for piece in decode_message(data, max_size=self.receive_limit):
                events += self._receive_frame(piece)
                if self.state is State.CLOSED:
                    break  # an ERROR frame: nothing after it counts
        except Exception as exc:
            error = (
                exc
                if isinstance(exc, ProtocolError)
                else ProtocolError(f"malformed frame: {exc!r}")
            )
            self.state, self.failure = State.CLOSED, error
            events.append(ConnectionFailed(error, None, CloseCode.PROTOCOL_ERROR))
        return events

    def _receive_frame(self, piece: Frame) -> list[ClientEvent]:
        if piece.kind not in self._accepts[self.state]:
            raise ProtocolError(
                f"gateway sent {piece.kind.name} while the session is {self.state.name}"
            )
        frame = self._reassembler.feed(piece)
        if frame is None:
            return []
        kind = frame.kind
        self.state = self._transitions.get((self.state, kind), self.state)
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
        if kind is FrameKind.FAULT:
            return [
                Faulted(
                    str(frame.meta.get("mesh", "")),
                    bytes(frame.payload).decode("utf-8", "replace"),
                )
            ]
        if kind is FrameKind.ERROR:
            meta = dict(frame.meta)
            return [Rejected(str(meta.get("code", "error")), str(meta.get("message")), meta)]
        # Reliable frames: drop what a resume replayed twice.
        if frame.seq <= self._last_seq or frame.seq in self._seen_ahead:
            return []
        if frame.seq > self._last_seq + (1 << 20):
            raise ProtocolError(f"gateway sent seq {frame.seq}, far past {self._last_seq}")
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
            if not isinstance(meta["session"], str) or max_frame <= 0 or last_request < 0:
                raise ValueError("session must be a string, sizes and ids positive")
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise ProtocolError(f"WELCOME frame is missing or has a bad field: {exc}") from None
        if not self.versions[0] <= version <= self.versions[1]:
            raise ProtocolError(f"gateway chose protocol version {version}, which we never offered")
        lost: list[int] = []
        if self.session_id is not None and not resumed:
            # The gateway no longer holds our session: what was pending will never be answered.
            lost, self._pending = list(self._pending), {}
            self._last_seq, self._acked_seq, self._seen_ahead = 0, 0, set()
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
        return Welcomed(version, session_id, resumed, max_frame, replay, lost)
