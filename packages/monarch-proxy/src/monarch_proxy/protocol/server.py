"""Gateway side of a session, without I/O.

A session outlives its connections: when a client drops, the gateway keeps the session (its
handles, running calls and the replies they produce) for a grace period. Every reply-bearing
frame gets a sequence number and stays buffered until the client acknowledges it, so a client
that reconnects with ``HELLO{session, last_seq}`` is sent exactly what it missed. Requests carry
increasing ids, so the session also tells the client the last request it received and ignores
requests sent twice.

Two cores, both following the table in :mod:`~monarch_proxy.protocol.states`:

- :class:`ServerHandshake`, one per connection, takes the first message and yields a
  :class:`Hello` (or fails the connection: bad HELLO, no common version);
- :class:`ServerSession`, one per session, is attached to a connection by :meth:`attach`. The
  resume decision lives there: a session attached to a new connection fences the old one
  (bytes from it are ignored from then on, and the adapter is told to close it), so replies
  never go to two connections and a stale connection's requests never run.

``receive`` never raises: malformed input, a frame the state does not accept, or a passed cap
makes the core CLOSED, keeps the error in ``failure`` and returns a :class:`ConnectionFailed`
with the ERROR frame to send and the close code. Caps are arguments (:class:`Limits`).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

from monarch_proxy.errors import (
    ProtocolError,
    ProtocolVersionError,
    SessionLimitError,
    SessionSupersededError,
)
from monarch_proxy.protocol.events import (
    ConnectionFailed,
    Departed,
    Hello,
    Released,
    Requested,
)
from monarch_proxy.protocol.frames import (
    DEFAULT_MAX_FRAME_SIZE,
    DEFAULT_MAX_PARTIAL_FRAMES,
    MAX_VERSION,
    MIN_VERSION,
    Frame,
    FrameKind,
    Reassembler,
    decode_message,
)
from monarch_proxy.protocol.names import CLOSE_CODE_OF
from monarch_proxy.protocol.states import ACCEPTS, TRANSITIONS, Side, State, accepts, next_state

__all__ = [
    "Attached",
    "Limits",
    "ServerHandshake",
    "ServerSession",
    "error_frame",
    "failed",
    "negotiate",
]

ServerEvent = Requested | Released | Departed | ConnectionFailed

# How far request ids may run ahead of the last contiguous one (pieces of big requests can make
# later small ones complete first); bounds the memory a misbehaving client can make us hold.
MAX_REQUESTS_AHEAD = 1 << 16
MAX_SEQ = (1 << 63) - 1


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-session security limits: what one client can make the gateway hold in memory."""

    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    max_unacked_bytes: int = 2 * DEFAULT_MAX_FRAME_SIZE  # replies kept for a resume
    max_outbox_bytes: int = 2 * DEFAULT_MAX_FRAME_SIZE  # queued for a client that does not read
    max_partial_frames: int = DEFAULT_MAX_PARTIAL_FRAMES  # frames half received in pieces
    max_partial_bytes: int = 2 * DEFAULT_MAX_FRAME_SIZE  # their declared sizes together


def negotiate(hello: Frame, supported: tuple[int, int] = (MIN_VERSION, MAX_VERSION)) -> int:
    """Pick the highest protocol version both sides speak, from a HELLO frame."""
    if hello.kind is not FrameKind.HELLO:
        raise ProtocolError(f"the first frame must be HELLO, not {hello.kind.name}")
    versions = hello.meta.get("versions")
    if (
        not isinstance(versions, list)
        or len(versions) != 2
        or not all(type(v) is int for v in versions)
    ):
        raise ProtocolError("HELLO frame must carry versions: [min, max]")
    low, high = versions
    chosen = min(high, supported[1])
    if chosen < max(low, supported[0]):
        raise ProtocolVersionError.between((low, high), supported)
    return chosen


def error_frame(code: str, message: str, **data: Any) -> bytes:
    """A connection-level ERROR frame, sent just before the gateway closes the connection."""
    return Frame(FrameKind.ERROR, meta={"code": str(code), "message": message, **data}).encode()


def failed(error: ProtocolError) -> ConnectionFailed:
    """What to send and how to close for an error the peer caused."""
    data: dict[str, Any] = {}
    if isinstance(error, SessionLimitError):
        data = {"limit": error.limit, "size": error.size, "max_size": error.max_size}
    message = error_frame(error.code, str(error), **data)
    return ConnectionFailed(error, message, CLOSE_CODE_OF[error.code])


def _as_protocol_error(exc: Exception) -> ProtocolError:
    if isinstance(exc, ProtocolError):
        return exc
    # A check this module forgot is still the peer's fault, never a crash of the gateway.
    return ProtocolError(f"malformed frame ({type(exc).__name__}: {exc})")


class ServerHandshake:
    """One connection before its session is known: accepts exactly one HELLO."""

    side = Side.SERVER
    _accepts = ACCEPTS[Side.SERVER]  # this side's rows of the tables, looked up once
    _transitions = TRANSITIONS[Side.SERVER]

    def __init__(
        self,
        *,
        supported: tuple[int, int] = (MIN_VERSION, MAX_VERSION),
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
    ) -> None:
        self.state = State.HANDSHAKE
        self.supported = supported
        self.max_frame_size = max_frame_size
        self.failure: ProtocolError | None = None

    def receive(self, data: bytes | memoryview | str) -> list[Hello | ConnectionFailed]:
        """Parse the first message. Never raises: returns a Hello, or a ConnectionFailed.

        After either, the handshake is done: hand the Hello to a session's :meth:`attach`.
        """
        if self.state is not State.HANDSHAKE:
            return []
        try:
            if isinstance(data, str):
                raise ProtocolError("text messages are not part of the protocol")
            hello = decode_message(data, max_size=self.max_frame_size)
            if len(hello) != 1 or not accepts(self.side, self.state, hello[0].kind):
                kind = hello[0].kind.name if len(hello) == 1 else "BATCH"
                raise ProtocolError(f"the first frame must be HELLO, not {kind}")
            version = negotiate(hello[0], self.supported)
            session, last_seq = hello[0].meta.get("session"), hello[0].meta.get("last_seq", 0)
            if session is not None and not isinstance(session, str):
                raise ProtocolError("HELLO session must be a string")
            if type(last_seq) is not int or not 0 <= last_seq <= MAX_SEQ:
                raise ProtocolError("HELLO last_seq must be a non-negative integer")
            keep_procs = hello[0].meta.get("keep_procs", False)
            if type(keep_procs) is not bool:
                raise ProtocolError("HELLO keep_procs must be a boolean")
        except Exception as exc:
            error = _as_protocol_error(exc)
            if not isinstance(error, ProtocolVersionError):
                error = ProtocolError(f"bad HELLO: {error}")
            self.state, self.failure = State.CLOSED, error
            return [failed(error)]
        self.state = next_state(self.side, self.state, FrameKind.HELLO)
        return [Hello(version, session, last_seq, keep_procs)]


@dataclass(frozen=True, slots=True)
class Attached:
    """What :meth:`ServerSession.attach` decided: send ``messages`` on the new connection, and
    close ``fenced`` (the connection that held the session until now), if any."""

    messages: list[bytes]
    resumed: bool
    fenced: int | None
    replayed: int  # reliable frames sent again


class ServerSession:
    side = Side.SERVER
    _accepts = ACCEPTS[Side.SERVER]  # this side's rows of the tables, looked up once
    _transitions = TRANSITIONS[Side.SERVER]

    def __init__(self, session_id: str, version: int, *, limits: Limits | None = None) -> None:
        self.session_id = session_id
        self.version = version
        self.limits = limits or Limits()
        self.max_frame_size = self.limits.max_frame_size
        self.state = State.HANDSHAKE  # no connection attached yet
        self.connection: int | None = None  # the adapter's id of the attached connection
        self.failure: ProtocolError | None = None
        self._attached_before = False
        self.last_request = 0  # every request id up to here has been received
        self._requests_ahead: set[int] = set()  # received ids beyond a gap (pieces interleave)
        self._seq = 0
        self._unacked: deque[tuple[int, list[bytes]]] = deque()
        self.unacked_bytes = 0
        self._reassembler = Reassembler(
            self.limits.max_frame_size,
            max_partial_frames=self.limits.max_partial_frames,
            max_partial_bytes=self.limits.max_partial_bytes,
        )

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    def attach(self, connection: int, hello: Hello) -> Attached:
        """Give the session to ``connection`` (its HELLO is ``hello``): the resume decision.

        A new session is welcomed; a known one acknowledges what the client already has and
        replays what it missed. The connection that held the session until now is fenced:
        :meth:`receive` ignores it from here on, and ``Attached.fenced`` names it for the
        adapter to close (with :meth:`superseded`'s message).
        """
        resumed = self._attached_before
        self._attached_before = True
        fenced = self.connection if self.state is State.OPEN else None
        replay: list[bytes] = []
        if resumed:
            self._acknowledge(min(hello.last_seq, self._seq))
            self._reassembler.reset()  # half-sent frames died with the old connection
            replay = [piece for _, pieces in self._unacked for piece in pieces]
        self.connection, self.state = connection, State.OPEN
        return Attached([self.welcome(resumed=resumed), *replay], resumed, fenced, len(replay))

    def detach(self, connection: int) -> bool:
        """The connection ended; True if it was the session's (the grace period starts)."""
        if connection != self.connection or self.state is State.CLOSED:
            return False
        self.connection, self.state = None, State.HANDSHAKE
        self._reassembler.reset()
        return True

    @staticmethod
    def superseded() -> ConnectionFailed:
        """What a fenced connection is sent before it is closed."""
        return failed(
            SessionSupersededError(
                "another connection resumed this session; this connection is closed and its "
                "replies go to the new one"
            )
        )

    def welcome(self, *, resumed: bool) -> bytes:
        meta = {
            "version": self.version,
            "session": self.session_id,
            "resumed": resumed,
            "max_frame_size": self.max_frame_size,
            "last_request": self.last_request,
        }
        return Frame(FrameKind.WELCOME, meta=meta).encode()

    def receive(self, data: bytes | memoryview | str, connection: int) -> list[ServerEvent]:
        """Parse one message from ``connection``. Never raises (see the module docstring).

        Bytes from any connection but the attached one (a fenced one) are ignored.
        """
        if connection != self.connection or self.state is not State.OPEN:
            return []
        events: list[ServerEvent] = []
        try:
            if isinstance(data, str):
                raise ProtocolError("text messages are not part of the protocol")
            for piece in decode_message(data, max_size=self.max_frame_size):
                events += self._receive_frame(piece)
        except Exception as exc:
            return [*events, self.fail(_as_protocol_error(exc))]
        return events

    def fail(self, error: ProtocolError) -> ConnectionFailed:
        """Close the session for ``error`` (a peer's fault); return what to send and how."""
        self.state, self.failure = State.CLOSED, error
        self._unacked.clear()
        self.unacked_bytes = 0
        self._reassembler.reset()
        return failed(error)

    def _receive_frame(self, piece: Frame) -> list[ServerEvent]:
        if piece.kind not in self._accepts[self.state]:
            raise ProtocolError(f"unexpected {piece.kind.name} frame in an open session")
        frame = self._reassembler.feed(piece)
        if frame is None:
            return []
        self._acknowledge(frame.seq)
        self.state = self._transitions.get((self.state, frame.kind), self.state)
        if frame.kind is FrameKind.REQUEST:
            if frame.id <= self.last_request or frame.id in self._requests_ahead:
                return []  # sent again after a resume; we already have it
            if frame.id > self.last_request + MAX_REQUESTS_AHEAD:
                raise ProtocolError(
                    f"request id {frame.id} is far ahead of {self.last_request}; request ids "
                    "must count up from 1"
                )
            op = frame.meta.get("op")
            if not isinstance(op, str):
                raise ProtocolError(f"request {frame.id} has no op")
            self._requests_ahead.add(frame.id)
            while self.last_request + 1 in self._requests_ahead:
                self.last_request += 1
                self._requests_ahead.discard(self.last_request)
            return [Requested(frame.id, op, frame.meta, frame.payload)]
        if frame.kind is FrameKind.RELEASE:
            handles = frame.meta.get("handles")
            if not isinstance(handles, list) or not all(type(h) is int for h in handles):
                raise ProtocolError("RELEASE frame must carry handles: [int, ...]")
            return [Released(handles)]
        if frame.kind is FrameKind.BYE:
            return [Departed()]
        return []  # ACK: already applied above

    # Reliable frames: each returns the messages to send, in order. Once the session is
    # CLOSED they return nothing (a call that finishes after its session ended is dropped);
    # passing max_unacked_bytes fails the session and returns its ERROR frame instead.
    def reply(self, request_id: int, meta: dict[str, Any], payload: bytes = b"") -> list[bytes]:
        return self._reliable(FrameKind.REPLY, request_id, meta, payload)

    def failure_reply(
        self, request_id: int, meta: dict[str, Any], payload: bytes = b""
    ) -> list[bytes]:
        return self._reliable(FrameKind.FAILURE, request_id, meta, payload)

    def item(self, request_id: int, meta: dict[str, Any], payload: bytes = b"") -> list[bytes]:
        return self._reliable(FrameKind.ITEM, request_id, meta, payload)

    @staticmethod
    def log(stream: str, text: str) -> bytes:
        return Frame(FrameKind.LOG, meta={"stream": stream}, payload=text.encode()).encode()

    @staticmethod
    def members(state: dict[str, Any]) -> bytes:
        return Frame(FrameKind.MEMBERS, meta=state).encode()

    @staticmethod
    def fault(mesh: str, report: str) -> bytes:
        """A FAULT frame (unsequenced, like LOG): a mesh of the session failed."""
        return Frame(FrameKind.FAULT, meta={"mesh": mesh}, payload=report.encode()).encode()

    def _reliable(
        self, kind: FrameKind, request_id: int, meta: dict[str, Any], payload: bytes
    ) -> list[bytes]:
        if self.state is State.CLOSED:
            return []
        self._seq += 1
        pieces = Frame(kind, request_id, self._seq, meta, payload).pieces()
        size = sum(len(p) for p in pieces)
        if self.unacked_bytes + size > self.limits.max_unacked_bytes:
            error = SessionLimitError(
                "unacked_bytes", self.unacked_bytes + size, self.limits.max_unacked_bytes
            )
            message = self.fail(error).message
            return [message] if message is not None else []
        self._unacked.append((self._seq, pieces))
        self.unacked_bytes += size
        return pieces

    def _acknowledge(self, seq: int) -> None:
        if seq > self._seq:
            raise ProtocolError(f"client acknowledged seq {seq}, but only {self._seq} were sent")
        while self._unacked and self._unacked[0][0] <= seq:
            self.unacked_bytes -= sum(len(p) for p in self._unacked.popleft()[1])
