"""Thin asyncio adapter around :class:`FrameDecoder` plus the token handshake.

The agent opens every connection with a CHALLENGE nonce; the connector answers with the keyed
BLAKE3 of that nonce under the token, so the token itself never crosses the wire.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import os
from collections.abc import Callable, Coroutine
from typing import Any

import blake3

from .exceptions import BadToken, PeerLost, SyncProtocolError
from .frames import Frame, FrameDecoder, FrameType, Payload, decode_json, encode_json

__all__ = [
    "Conn",
    "Dial",
    "accept",
    "connect",
    "dial_tcp",
    "mac",
    "parse_peer",
    "serve",
    "wrap_socket",
]


def mac(token: str, nonce: bytes) -> str:
    key = blake3.blake3(token.encode()).digest()
    return blake3.blake3(nonce, key=key).hexdigest()


def parse_peer(peer: str) -> tuple[str, int]:
    host, sep, port = peer.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"peer {peer!r} is not HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


READ_SIZE = 1 << 20
IOV_MAX = 1024  # buffers one writev() may gather (the Linux limit)


class _FrameProtocol(asyncio.Protocol):
    """Feeds received bytes straight into the decoder (no StreamReader copy in between)."""

    def __init__(self) -> None:
        self.conn: Conn | None = None
        self.transport: asyncio.Transport | None = None
        self.on_connect: Callable[[Conn], None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if hasattr(transport, "max_size"):  # selector transports read 256 KiB per recv()
            transport.max_size = READ_SIZE  # bigger reads: fewer syscalls, fewer split frames
        peer = transport.get_extra_info("peername") or ("?", 0)
        self.conn = Conn(transport, f"{peer[0]}:{peer[1]}")
        if self.on_connect is not None:
            self.on_connect(self.conn)

    def data_received(self, data: bytes) -> None:
        assert self.conn is not None
        self.conn._data(data)

    def eof_received(self) -> bool:
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
    """A framed connection: ``recv`` whole frames, ``send`` bytes, ``drain`` to respect flow."""

    HIGH_WATER = 8 * 1024 * 1024  # decoded-but-unread bytes before we stop reading the socket

    def __init__(self, transport: asyncio.Transport, peer: str) -> None:
        self.transport = transport
        self.peer = peer
        self._decoder = FrameDecoder()
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

    # -- protocol callbacks --------------------------------------------------------------
    def _data(self, data: bytes) -> None:
        self._decoder.receive_data(data)
        try:
            frames = self._decoder.frames()
        except SyncProtocolError as exc:
            self._error = exc
            self.transport.abort()
            return
        if frames:
            self._frames.extend(frames)
            self._queued += sum(len(f.payload) for f in frames)
            self._arrived.set()
            if self._queued > self.HIGH_WATER and not self._paused:
                self._paused = True
                self.transport.pause_reading()

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
        """Next frame; raises PeerLost on EOF or reset, TimeoutError after ``timeout``."""
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

    def unread(self, frame: Frame) -> None:
        """Put a frame back; the next :meth:`recv` returns it."""
        self._frames.appendleft(frame)
        self._queued += len(frame.payload)

    async def expect(self, ftype: FrameType, timeout: float | None = None) -> Frame:
        """Next frame other than HEARTBEAT, which must be ``ftype``; ERROR frames raise."""
        frame = await self.recv(timeout)
        while frame.type is FrameType.HEARTBEAT and ftype is not FrameType.HEARTBEAT:
            frame = await self.recv(timeout)
        if frame.type is FrameType.ERROR:
            err = decode_json(frame)
            if err.get("code") == "bad_token":
                raise BadToken(self.peer)
            raise PeerLost(self.peer, f"{err.get('code')}: {err.get('message')}")
        if frame.type is not ftype:
            raise SyncProtocolError(f"{self.peer}: expected {ftype.name}, got {frame.type.name}")
        return frame

    def send(self, *parts: Payload) -> None:
        if not self.closed:
            self.transport.write(parts[0] if len(parts) == 1 else b"".join(parts))

    def send_parts(self, parts: list[Payload]) -> None:
        """Write ``parts`` in order, copying each at most once in user space.

        With nothing buffered they go to the socket in one gathered write (``writev``: no join,
        no copy); only what the socket did not take is handed to the transport, which buffers
        it. Behind a backlog each part is appended to the transport's buffer as it is.
        """
        if self.closed:
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

    def send_json(self, ftype: FrameType, obj: Any) -> None:
        self.send(encode_json(ftype, obj))

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
    handler: Callable[[Conn], Coroutine[Any, Any, None]], host: str, port: int
) -> asyncio.Server:
    """Listen; run ``handler(conn)`` as a task for every accepted connection."""
    loop = asyncio.get_running_loop()

    def factory() -> _FrameProtocol:
        proto = _FrameProtocol()
        proto.on_connect = lambda conn: _spawn(loop.create_task(handler(conn)))
        return proto

    return await loop.create_server(factory, host, port, reuse_address=True)


_tasks: set[asyncio.Task[None]] = set()


def _spawn(task: asyncio.Task[None]) -> None:
    _tasks.add(task)  # keep a reference until done
    task.add_done_callback(_tasks.discard)


Dial = Callable[[str, float], Coroutine[Any, Any, "Conn"]]


async def dial_tcp(peer: str, timeout: float) -> Conn:
    """A framed TCP connection to ``peer`` (``host:port``); raises PeerLost."""
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
    """A framed connection over an already connected socket (e.g. one end of a socketpair)."""
    _, proto = await asyncio.get_running_loop().create_connection(_FrameProtocol, sock=sock)
    assert proto.conn is not None
    return proto.conn


async def connect(
    peer: str, token: str, hello: dict[str, Any], timeout: float, *, dial: Dial | None = None
) -> Conn:
    """Open a connection to an agent and authenticate; raises PeerLost or BadToken.

    ``dial`` opens the byte stream (default: TCP to ``peer``); the gateway tunnel passes its own.
    """
    conn = await (dial or dial_tcp)(peer, timeout)
    conn.peer = peer
    try:
        challenge = decode_json(await conn.expect(FrameType.CHALLENGE, timeout))
        nonce = bytes.fromhex(challenge["nonce"])
        conn.send_json(FrameType.HELLO, {**hello, "mac": mac(token, nonce)})
    except TimeoutError as exc:
        conn.close()
        raise PeerLost(peer, "no challenge from agent") from exc
    except BaseException:
        conn.close()
        raise
    return conn


async def accept(conn: Conn, token: str, timeout: float) -> dict[str, Any]:
    """Agent side of the handshake: returns the HELLO, or sends ERROR and raises BadToken."""
    nonce = os.urandom(16)
    conn.send_json(FrameType.CHALLENGE, {"nonce": nonce.hex()})
    hello = decode_json(await conn.expect(FrameType.HELLO, timeout))
    if not isinstance(hello, dict) or not hmac.compare_digest(
        str(hello.get("mac", "")), mac(token, nonce)
    ):
        conn.send_json(FrameType.ERROR, {"code": "bad_token", "message": "bad token"})
        await conn.drain(timeout)
        raise BadToken(conn.peer)
    return hello
