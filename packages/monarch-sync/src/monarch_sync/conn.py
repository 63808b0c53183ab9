"""Thin asyncio adapter around the :class:`~monarch_sync.protocol.SyncConnection` core.

The core does the handshake, the per-frame MAC and the frame-order table; this module moves its
bytes, holds its frames until :meth:`Conn.recv` takes them, and turns a failed core into a
closed connection whose next ``recv`` raises (BadToken, SyncProtocolError or PeerLost).
Deadlines live here and in the callers: a clock is I/O.
"""

from __future__ import annotations

import asyncio
import collections
import os
from collections.abc import Callable, Coroutine
from typing import Any

from .exceptions import BadToken, PeerLost, SyncProtocolError
from .frames import ErrorCode, Frame, FrameType, Payload, decode_json
from .protocol import NONCE_SIZE, Side, SyncConnection

__all__ = [
    "Conn",
    "Dial",
    "accept",
    "connect",
    "dial_tcp",
    "parse_peer",
    "serve",
    "wrap_socket",
]


def parse_peer(peer: str) -> tuple[str, int]:
    host, sep, port = peer.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"peer {peer!r} is not HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


READ_SIZE = 1 << 20
IOV_MAX = 1024  # buffers one writev() may gather (the Linux limit)


class _FrameProtocol(asyncio.Protocol):
    """Feeds received bytes straight into the decoder (no StreamReader copy in between)."""

    def __init__(self, core: Callable[[], SyncConnection] | None = None) -> None:
        self.conn: Conn | None = None
        self.transport: asyncio.Transport | None = None
        self.on_connect: Callable[[Conn], None] | None = None
        self._core = core  # the agent side starts its core (and its CHALLENGE) at once

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if hasattr(transport, "max_size"):  # selector transports read 256 KiB per recv()
            transport.max_size = READ_SIZE  # bigger reads: fewer syscalls, fewer split frames
        peer = transport.get_extra_info("peername") or ("?", 0)
        self.conn = Conn(transport, f"{peer[0]}:{peer[1]}")
        if self._core is not None:
            self.conn.attach(self._core())
        if self.on_connect is not None:
            self.on_connect(self.conn)

    def data_received(self, data: bytes) -> None:
        assert self.conn is not None
        self.conn._data(data)

    def eof_received(self) -> bool:
        if self.conn is not None and self.conn.core is not None:
            self.conn.core.receive_eof()
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if self.conn is not None:
            self.conn._lost(exc)

    def pause_writing(self) -> None:
        assert self.conn is not None
        self.conn._can_write.clear()

    def resume_writing(self) -> None:
        assert self.conn is not None
        self.conn._can_write.set()


class Conn:
    """A framed, authenticated connection: ``recv`` whole frames, ``send_frame``, ``drain``."""

    HIGH_WATER = 8 * 1024 * 1024  # decoded-but-unread bytes before we stop reading the socket

    def __init__(self, transport: asyncio.Transport, peer: str) -> None:
        self.transport = transport
        self.peer = peer
        self.core: SyncConnection | None = None
        self._early: list[bytes] = []  # bytes that came before the core was attached
        self._frames: collections.deque[Frame] = collections.deque()
        self._queued = 0
        self._paused = False
        self._arrived = asyncio.Event()
        self._can_write = asyncio.Event()
        self._can_write.set()
        self._error: BaseException | None = None
        self.closed = False
        # Gathered writes go straight to the socket while the transport has nothing buffered.
        sock = transport.get_extra_info("socket")
        self._fd = sock.fileno() if sock is not None and hasattr(os, "writev") else -1

    def attach(self, core: SyncConnection) -> None:
        """Start speaking through ``core`` (its CHALLENGE, if any, goes out now)."""
        self.core = core
        self.flush()
        early, self._early = self._early, []
        for data in early:
            self._data(data)

    # -- protocol callbacks --------------------------------------------------------------
    def _data(self, data: bytes) -> None:
        core = self.core
        if core is None:
            self._early.append(data)
            return
        core.receive_data(data)
        frames = core.events_received()
        if frames:
            self._frames.extend(frames)
            self._queued += sum(len(f.payload) for f in frames)
            self._arrived.set()
            if self._queued > self.HIGH_WATER and not self._paused:
                self._paused = True
                self.transport.pause_reading()
        if core.error is not None and self._error is None:
            err = core.error
            self._error = BadToken(self.peer) if err.code == ErrorCode.BAD_TOKEN else err
            self.flush()  # the ERROR frame the core queued for the peer, if any
            self._arrived.set()
            self.close()

    def _lost(self, exc: Exception | None) -> None:
        if self._error is None:
            self._error = PeerLost(
                self.peer, f"connection lost: {exc}" if exc else "connection closed"
            )
        self.closed = True
        self._arrived.set()
        self._can_write.set()

    # -- API -----------------------------------------------------------------------------
    async def recv(self, timeout: float | None = None) -> Frame:
        """Next frame; raises PeerLost on EOF or reset, TimeoutError after ``timeout``, and
        SyncProtocolError (or BadToken) once the core failed the connection."""
        while not self._frames:
            if self._error is not None:
                raise self._error
            self._arrived.clear()
            await asyncio.wait_for(self._arrived.wait(), timeout)
        frame = self._frames.popleft()
        self._queued -= len(frame.payload)
        if self._paused and self._queued < self.HIGH_WATER // 2:
            self._paused = False
            if not self.closed:
                self.transport.resume_reading()
        return frame

    def poke(self) -> None:
        """Wake a pending :meth:`recv` with a local HEARTBEAT (the caller re-checks state)."""
        self._frames.append(Frame(FrameType.HEARTBEAT, b""))
        self._arrived.set()

    async def expect(self, ftype: FrameType, timeout: float | None = None) -> Frame:
        """Next frame other than HEARTBEAT, which must be ``ftype``; ERROR frames raise."""
        frame = await self.recv(timeout)
        while frame.type is FrameType.HEARTBEAT and ftype is not FrameType.HEARTBEAT:
            frame = await self.recv(timeout)
        if frame.type is FrameType.ERROR:
            err = decode_json(frame)
            code = err.get("code") if isinstance(err, dict) else None
            if code == ErrorCode.BAD_TOKEN:
                raise BadToken(self.peer)
            message = err.get("message") if isinstance(err, dict) else None
            raise PeerLost(self.peer, f"{code}: {message}")
        if frame.type is not ftype:
            raise SyncProtocolError(f"{self.peer}: expected {ftype.name}, got {frame.type.name}")
        return frame

    def queue_frame(self, ftype: FrameType, *parts: Payload) -> None:
        """Queue one frame in the core (tagged, not copied); :meth:`flush` writes the queue."""
        if not self.closed and self.core is not None:
            self.core.send(ftype, *parts)

    def send_frame(self, ftype: FrameType, *parts: Payload) -> None:
        self.queue_frame(ftype, *parts)
        self.flush()

    def send_json(self, ftype: FrameType, obj: Any) -> None:
        if not self.closed and self.core is not None:
            self.core.send_json(ftype, obj)
            self.flush()

    def flush(self) -> None:
        """Write what the core queued, copying each part at most once in user space.

        With nothing buffered the parts go to the socket in one gathered write (``writev``: no
        join, no copy); only what the socket did not take is handed to the transport, which
        buffers it. Behind a backlog each part is appended to the transport's buffer as it is.
        """
        if self.core is None:
            return
        parts = self.core.data_to_send()
        if not parts or self.closed:
            return
        transport = self.transport
        if (
            transport.get_write_buffer_size()
            or transport.is_closing()
            or self._fd < 0
            or len(parts) > IOV_MAX
        ):
            for part in parts:
                transport.write(part)
            return
        try:
            sent = os.writev(self._fd, parts)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:  # let the transport meet the error and report the connection lost
            transport.write(b"".join(parts))
            return
        for part in parts:
            n = len(part)
            if sent >= n:
                sent -= n
                continue
            transport.write(memoryview(part)[sent:] if sent else part)
            sent = 0

    async def drain(self, timeout: float | None = None) -> None:
        if not self._can_write.is_set():
            await asyncio.wait_for(self._can_write.wait(), timeout)
        if self.closed and isinstance(self._error, PeerLost):
            raise self._error

    @property
    def write_buffered(self) -> int:
        return self.transport.get_write_buffer_size()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.transport.close()


async def serve(
    handler: Callable[[Conn], Coroutine[Any, Any, None]], host: str, port: int, *, token: str
) -> asyncio.Server:
    """Listen; every accepted connection sends its CHALLENGE at once and runs ``handler``."""
    loop = asyncio.get_running_loop()

    def core() -> SyncConnection:
        return SyncConnection(Side.AGENT, token, nonce=os.urandom(NONCE_SIZE))

    def factory() -> _FrameProtocol:
        proto = _FrameProtocol(core)
        proto.on_connect = lambda conn: _spawn(loop.create_task(handler(conn)))
        return proto

    return await loop.create_server(factory, host, port, reuse_address=True)


_tasks: set[asyncio.Task[None]] = set()


def _spawn(task: asyncio.Task[None]) -> None:
    _tasks.add(task)  # keep a reference until done
    task.add_done_callback(_tasks.discard)


Dial = Callable[[str, float], Coroutine[Any, Any, "Conn"]]


async def dial_tcp(peer: str, timeout: float) -> Conn:
    """A TCP connection to ``peer`` (``host:port``), not yet authenticated; raises PeerLost."""
    host, port = parse_peer(peer)
    loop = asyncio.get_running_loop()
    try:
        _, proto = await asyncio.wait_for(
            loop.create_connection(_FrameProtocol, host, port), timeout
        )
    except (OSError, TimeoutError) as exc:
        raise PeerLost(peer, f"cannot connect: {exc or 'timeout'}") from exc
    assert proto.conn is not None
    return proto.conn


async def wrap_socket(sock: Any) -> Conn:
    """A connection over an already connected socket (e.g. one end of a socketpair)."""
    _, proto = await asyncio.get_running_loop().create_connection(_FrameProtocol, sock=sock)
    assert proto.conn is not None
    return proto.conn


async def connect(
    peer: str, token: str, push_id: str, sender: str, timeout: float, *, dial: Dial | None = None
) -> Conn:
    """Open an authenticated connection to an agent; raises PeerLost or BadToken.

    ``dial`` opens the byte stream (default: TCP to ``peer``); the gateway tunnel passes its own.
    """
    conn = await (dial or dial_tcp)(peer, timeout)
    conn.peer = peer
    try:
        conn.attach(SyncConnection(Side.CONNECTOR, token, nonce=os.urandom(NONCE_SIZE)))
        await conn.expect(FrameType.CHALLENGE, timeout)
        assert conn.core is not None
        conn.core.send_hello(push_id, sender)
        conn.flush()
    except TimeoutError as exc:
        conn.close()
        raise PeerLost(peer, "no challenge from agent") from exc
    except SyncProtocolError as exc:
        conn.close()
        raise PeerLost(peer, f"bad challenge: {exc}") from exc
    except BaseException:
        conn.close()
        raise
    return conn


async def accept(conn: Conn, timeout: float) -> dict[str, Any]:
    """Agent side of the handshake: the verified HELLO, within ``timeout`` in all.

    Raises BadToken, SyncProtocolError (the core failed the connection: a frame other than
    HELLO first, one over the pre-authentication cap, a bad push id), PeerLost or TimeoutError.
    """
    await conn.recv(timeout)  # the core lets nothing but a verified HELLO through first
    assert conn.core is not None and conn.core.hello is not None
    return conn.core.hello
