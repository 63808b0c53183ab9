"""The client's I/O adapter: one WebSocket to the gateway, driven by a background event loop.

Callers on any thread submit requests and get ``concurrent.futures.Future`` objects back, so a
blocking ``get()`` in one thread never stalls the other calls multiplexed on the connection.
Everything about the protocol itself lives in :class:`~monarch_proxy.protocol.client.ClientSession`;
this module only moves bytes, completes futures and reconnects (resuming the session) when the
connection drops.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import os
import ssl as ssl_module
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import websockets
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from monarch_proxy import codec
from monarch_proxy.errors import (
    AuthenticationError,
    ProtocolError,
    ProxyError,
    TransportError,
    error_for_code,
)
from monarch_proxy.faults import MeshFailure, report_fault
from monarch_proxy.protocol.client import ClientSession
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
from monarch_proxy.protocol.frames import pack_for_sending
from monarch_proxy.protocol.names import CloseCode, Op

logger = logging.getLogger("monarch_proxy")

Reply = tuple[dict[str, Any], bytes | memoryview]
ItemCallback = Callable[[dict[str, Any], bytes | memoryview], None]
LogCallback = Callable[[str, str], None]

ACK_DELAY_S = 0.02

# Close codes after which resuming cannot help: fail every pending call at once.
FINAL_CLOSE_CODES: dict[int, ProxyError] = {
    CloseCode.GOING_AWAY: TransportError("the gateway shut down"),
    CloseCode.PROTOCOL_ERROR: ProtocolError("the gateway closed the connection: protocol error"),
    CloseCode.POLICY_VIOLATION: ProtocolError(
        "the gateway closed the connection: policy violation"
    ),
    CloseCode.MESSAGE_TOO_BIG: ProtocolError(
        "the gateway closed the connection: a frame was over its size limit"
    ),
}


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop where it is installed (about a quarter less CPU per call), else asyncio's own.

    ``MONARCH_EVENT_LOOP=asyncio`` forces asyncio's loop.
    """
    try:
        if os.environ.get("MONARCH_EVENT_LOOP") == "asyncio":
            raise ImportError
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def print_log(stream: str, text: str) -> None:
    """Default sink for worker output: the matching stream of this process."""
    out = sys.stderr if stream == "stderr" else sys.stdout
    out.write(text)
    out.flush()


class GatewayConnection:
    """A session with a gateway. Thread-safe; create with :meth:`open`."""

    def __init__(
        self,
        url: str,
        token: str | None,
        *,
        ssl: ssl_module.SSLContext | None = None,
        resume_grace_s: float = 30.0,
        connect_timeout_s: float = 30.0,
        on_log: LogCallback | None = print_log,
        keep_procs: bool = False,
    ) -> None:
        """``keep_procs``: the proc meshes this session spawns outlive it (by default the
        gateway stops them when the session ends for good: closed, or not resumed in time)."""
        self.url = url
        self._token = token
        self._ssl = ssl
        self._resume_grace_s = resume_grace_s
        self._connect_timeout_s = connect_timeout_s
        self._on_log = on_log
        self._session = ClientSession(keep_procs=keep_procs)
        self._lock = threading.Lock()  # guards _session and the tables below
        self._futures: dict[int, concurrent.futures.Future[Reply]] = {}
        self._item_callbacks: dict[int, ItemCallback] = {}
        # Handles to free. They leave through the outbox writer, after every request submitted
        # before them (never on their own path), and only once no big frame submitted before
        # them is still on its way: a release must never overtake a request that uses it.
        # A deque, appended without the lock: release() runs in garbage-collection finalizers,
        # which may fire inside any section holding the lock, on the same thread.
        self._releases: collections.deque[int] = collections.deque()
        self._outbox: list[bytes] = []  # small requests waiting for the writer task
        self._outbox_scheduled = False
        self._big: collections.deque[list[bytes]] = collections.deque()  # frames sent in pieces
        self._big_writing = False
        self._big_unsent = 0  # big frames submitted and not yet fully written (or dropped)
        self._ack_scheduled = False
        self._closing = False
        self._closed_by: ProxyError | None = None  # why the connection was failed, if it was
        self._ws: ClientConnection | None = None
        self._loop = new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="monarch-proxy-io", daemon=True
        )
        self._runner: concurrent.futures.Future[None] | None = None
        # Called on the I/O thread with each membership state the gateway sends; keep them quick.
        self.membership_listeners: list[Callable[[dict[str, Any]], None]] = []

    @classmethod
    def open(cls, url: str, token: str | None = None, **kwargs: Any) -> GatewayConnection:
        """Connect, negotiate the protocol version and return an open connection."""
        if token is None:
            token = os.environ.get("MONARCH_GATEWAY_TOKEN")
        conn = cls(url, token, **kwargs)
        conn._thread.start()
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        conn._runner = asyncio.run_coroutine_threadsafe(conn._run(ready), conn._loop)
        try:
            ready.result(timeout=conn._connect_timeout_s + 5)
        except BaseException:
            conn._stop_loop()
            raise
        return conn

    @property
    def token(self) -> str | None:
        return self._token

    @property
    def ssl(self) -> ssl_module.SSLContext | None:
        return self._ssl

    @property
    def session_id(self) -> str | None:
        return self._session.session_id

    # Called from any thread ---------------------------------------------------------------

    def submit(
        self,
        op: Op,
        meta: dict[str, Any],
        payload: bytes = b"",
        *,
        on_item: ItemCallback | None = None,
    ) -> concurrent.futures.Future[Reply]:
        future: concurrent.futures.Future[Reply] = concurrent.futures.Future()
        with self._lock:
            if self._closing:
                if self._closed_by is not None:  # say why: a cap, a takeover, a lost session
                    raise self._closed_by
                raise TransportError("the connection to the gateway is closed")
            request_id, pieces = self._session.request(op, meta, payload)
            self._futures[request_id] = future
            if on_item is not None:
                self._item_callbacks[request_id] = on_item
            if len(pieces) > 1:
                # Its own writer, so small calls keep flowing beside it; big frames go one
                # after another (the gateway caps frames left half sent per session).
                big = pieces
                self._big_unsent += 1
            else:
                big = None
                self._outbox.extend(pieces)
                wake, self._outbox_scheduled = not self._outbox_scheduled, True
        if big is not None:
            self._loop.call_soon_threadsafe(self._queue_big, big)
        elif wake:  # one wake-up of the event loop carries every request queued until it runs
            self._loop.call_soon_threadsafe(self._start_outbox_writer)
        return future

    def request(
        self, op: Op, meta: dict[str, Any], payload: bytes = b"", timeout: float | None = None
    ) -> Reply:
        """Submit and wait: for short control operations (spawn, slice)."""
        return self.submit(op, meta, payload).result(timeout)

    def release(self, handle: int) -> None:
        """Free a gateway handle. Safe to call from a garbage-collection finalizer.

        The release leaves after every request submitted before this call (see ``_releases``).
        """
        if self._closing:
            return
        self._releases.append(handle)  # no lock: a finalizer may run while this thread holds it
        try:
            self._loop.call_soon_threadsafe(self._wake_outbox_writer)
        except RuntimeError:
            pass  # loop already closed during interpreter shutdown

    def report_background(self, what: str, future: concurrent.futures.Future[Reply]) -> None:
        """Done-callback of a request nobody waits for (``broadcast``): a failure goes to the
        fault hook (see :mod:`monarch_proxy.faults`) instead of vanishing."""
        if future.cancelled() or future.exception() is None:
            return
        error = future.exception()
        report_fault(MeshFailure(what, f"{what} failed: {type(error).__name__}: {error}", error))

    def close(self) -> None:
        """End the session: the gateway frees every handle now instead of after the grace."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
        if self._loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(self._goodbye(), self._loop).result(timeout=5)
            except Exception as exc:  # best effort: the gateway also expires the session
                logger.debug("goodbye failed: %r", exc)
        self._fail_all(TransportError("the connection to the gateway was closed"))
        self._stop_loop()

    def __enter__(self) -> GatewayConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Event-loop side -----------------------------------------------------------------------

    async def _run(self, ready: concurrent.futures.Future[None]) -> None:
        try:
            await self._connect(resuming=False)
        except BaseException as exc:
            ready.set_exception(exc)
            return
        ready.set_result(None)
        while not self._closing:
            try:
                close_code = await self._read(self._ws)
            except ProxyError as exc:
                logger.error("gateway connection failed: %s", exc)
                self._fail_all(exc)
                return
            if self._closing:
                return
            final = FINAL_CLOSE_CODES.get(close_code or 0)
            if final is not None:
                self._fail_all(final)
                return
            try:
                await self._reconnect()
            except ProxyError as exc:
                self._fail_all(exc)
                return

    async def _connect(self, *, resuming: bool) -> None:
        headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}
        tls: dict[str, Any] = {"ssl": self._ssl} if self._ssl is not None else {}  # wss: verify
        try:
            ws = await asyncio.wait_for(
                connect(
                    self.url,
                    additional_headers=headers,
                    max_size=None,
                    compression=None,
                    ping_interval=20,
                    ping_timeout=60,
                    open_timeout=self._connect_timeout_s,
                    **tls,
                ),
                self._connect_timeout_s,
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status in (401, 403):
                raise AuthenticationError(
                    f"gateway at {self.url} refused the token (HTTP {status}); pass token= or "
                    "set MONARCH_GATEWAY_TOKEN to the token the gateway was started with"
                ) from None
            raise TransportError(f"gateway at {self.url} answered HTTP {status}") from None
        except (OSError, TimeoutError, websockets.exceptions.InvalidHandshake) as exc:
            raise TransportError(f"cannot reach the gateway at {self.url}: {exc}") from exc
        with self._lock:
            hello = self._session.hello()
        await ws.send(hello)
        try:
            first = await asyncio.wait_for(ws.recv(), self._connect_timeout_s)
        except ConnectionClosed as exc:
            raise TransportError(
                f"gateway closed the connection during the handshake: {exc}"
            ) from None
        with self._lock:
            events = self._session.receive(first)
        event = events[0] if events else None
        if isinstance(event, Rejected):
            await ws.close()
            raise error_for_code(event.code, event.message, event.meta)
        if isinstance(event, ConnectionFailed):
            await ws.close(event.close_code)
            raise event.error
        if not isinstance(event, Welcomed):
            await ws.close()
            raise ProtocolError(f"expected WELCOME from the gateway, got {event!r}")
        self._ws = ws
        if event.lost:  # decided by the session core: the gateway lost our session
            self._fail_all(
                TransportError(
                    "the gateway no longer holds this session (its grace period ran out or it "
                    "restarted); in-flight calls are lost and mesh handles must be recreated"
                ),
                keep_open=True,
            )
        for piece in event.replay:
            await ws.send(piece)
        self._wake_outbox_writer()  # releases held while disconnected, after the replay
        # Replies replayed in the same message as WELCOME (the gateway packs them together).
        for later in events[1:]:
            if isinstance(later, ConnectionFailed):
                await ws.close(later.close_code)
                raise later.error
            self._dispatch(later)

    async def _reconnect(self) -> None:
        deadline = time.monotonic() + self._resume_grace_s
        delay = 0.05
        last_error: Exception | None = None
        while time.monotonic() < deadline and not self._closing:
            try:
                await self._connect(resuming=True)
                logger.info("resumed the gateway session")  # its id is a credential: not logged
                return
            except (AuthenticationError, ProtocolError):
                raise
            except TransportError as exc:
                last_error = exc
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
        raise TransportError(
            f"lost the connection to the gateway at {self.url} and could not resume within "
            f"{self._resume_grace_s:.0f}s: {last_error}"
        )

    async def _read(self, ws: ClientConnection | None) -> int | None:
        """Dispatch messages until the connection ends; return its close code."""
        assert ws is not None
        try:
            async for message in ws:
                with self._lock:
                    events = self._session.receive(message)
                for event in events:
                    if isinstance(event, ConnectionFailed):
                        await ws.close(event.close_code)
                        raise event.error
                    self._dispatch(event)
                self._schedule_ack()
        except ConnectionClosed:
            pass
        finally:
            self._ws = None
            with self._lock:
                self._session.connection_lost()
        return ws.close_code

    def _dispatch(self, event: object) -> None:
        if isinstance(event, Replied | Failed):
            with self._lock:
                future = self._futures.pop(event.id, None)
                self._item_callbacks.pop(event.id, None)
            if future is None:
                return
            if isinstance(event, Replied):
                future.set_result((event.meta, event.payload))
            else:
                future.set_exception(codec.decode_failure(event.meta, event.payload))
        elif isinstance(event, Streamed):
            callback = self._item_callbacks.get(event.id)
            if callback is not None:
                callback(event.meta, event.payload)
        elif isinstance(event, Logged):
            if self._on_log is not None:
                self._on_log(event.stream, event.text)
        elif isinstance(event, MembershipChanged):
            for listener in list(self.membership_listeners):
                try:
                    listener(event.state)
                except Exception:  # a user callback must not break the connection
                    logger.exception("membership listener failed")
        elif isinstance(event, Faulted):
            report_fault(MeshFailure(event.mesh, event.report))
        elif isinstance(event, Rejected):
            raise error_for_code(event.code, event.message, event.meta)

    def _start_outbox_writer(self) -> None:
        self._loop.create_task(self._write_outbox())

    def _wake_outbox_writer(self) -> None:
        """On the loop: start the writer unless it is running or about to."""
        with self._lock:
            wake, self._outbox_scheduled = not self._outbox_scheduled, True
        if wake:
            self._start_outbox_writer()

    async def _write_outbox(self) -> None:
        while True:
            with self._lock:
                messages, self._outbox = self._outbox, []
                handles: list[int] = []
                if (
                    self._releases
                    and not self._big_unsent
                    and self._ws is not None
                    and self._session.failure is None  # a failed session sends nothing more
                ):
                    # Everything submitted before these releases is in ``messages`` or gone.
                    handles = [self._releases.popleft() for _ in range(len(self._releases))]
                    messages.append(self._session.release(handles))
                if not messages:
                    self._outbox_scheduled = False
                    return
            # While disconnected, dropping requests is safe: they are pending, and the session
            # replays them after it resumes. Releases are kept for the next connection, whose
            # handshake starts this writer again.
            if not await self._send(pack_for_sending(messages)):
                with self._lock:
                    self._releases.extendleft(reversed(handles))
                    self._outbox_scheduled = False
                return

    def _queue_big(self, pieces: list[bytes]) -> None:
        self._big.append(pieces)
        if not self._big_writing:
            self._big_writing = True
            self._loop.create_task(self._write_big())

    async def _write_big(self) -> None:
        try:
            while self._big:
                await self._send(self._big.popleft())
                with self._lock:
                    self._big_unsent -= 1
                    held = bool(self._releases) and not self._big_unsent
                if held:  # releases waited for this frame to be written
                    self._wake_outbox_writer()
        finally:
            self._big_writing = False

    def _send_nowait(self, pieces: list[bytes]) -> None:
        # While disconnected the request stays pending in the session and is replayed on resume.
        if self._ws is not None:
            self._loop.create_task(self._send(pieces))

    async def _send(self, pieces: list[bytes]) -> bool:
        """Write ``pieces``; False if there was no connection to write them on."""
        ws = self._ws
        if ws is None:
            return False
        try:
            for piece in pieces:
                await ws.send(piece)
        except ConnectionClosed:
            return False  # the reader notices and resumes; pending requests are replayed
        return True

    def _schedule_ack(self) -> None:
        if not self._ack_scheduled:
            self._ack_scheduled = True
            self._loop.call_later(ACK_DELAY_S, self._send_ack)

    def _send_ack(self) -> None:
        self._ack_scheduled = False
        with self._lock:
            data = self._session.ack() if self._ws is not None else None
        if data is not None:
            self._send_nowait([data])

    async def _goodbye(self) -> None:
        ws = self._ws
        if ws is None:
            return
        with self._lock:
            data = self._session.bye()
        try:
            await ws.send(data)
            await ws.close()
        except ConnectionClosed:
            pass

    def _fail_all(self, exc: BaseException, *, keep_open: bool = False) -> None:
        with self._lock:
            futures, self._futures = self._futures, {}
            self._item_callbacks.clear()
            for request_id in futures:
                self._session.forget(request_id)
            if not keep_open:
                self._closing = True
                if isinstance(exc, ProxyError) and self._closed_by is None:
                    self._closed_by = exc
        for future in futures.values():
            if not future.done():
                future.set_exception(exc)

    def _stop_loop(self) -> None:
        if self._loop.is_running():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(_cancel_other_tasks(), self._loop).result(5)
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)
            if not self._thread.is_alive():
                self._loop.close()


async def _cancel_other_tasks() -> None:
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
