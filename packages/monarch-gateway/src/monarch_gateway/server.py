"""The gateway's WebSocket server: authentication, sessions that survive reconnects, dispatch.

Protocol rules live in :mod:`monarch_proxy.protocol.server`; Monarch calls live in
:mod:`monarch_gateway.operations`. This module connects the two: it sends a session's calls
to the actors in the order they arrive (Monarch keeps each sender's order to an actor), waits for
each request on its own (so one slow call never blocks another), sends replies on whichever
connection the session has now, and keeps a dropped session alive for a grace period.

Each session is bounded (``Limits``): replies kept for a resume, messages queued for a client
that does not read and frames left half sent each have a cap; passing one closes that session
with an ERROR frame naming the cap, and the others keep going. A session id is a credential (it
resumes the session), so logs name sessions by a number instead.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import hmac
import itertools
import json
import logging
import secrets
import ssl as ssl_module
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from monarch_gateway.handles import Entry, HandleTable
from monarch_gateway.logs import RateLimit
from monarch_gateway.monitor import Worker, WorkerMonitor
from monarch_gateway.output import OutputRouter, new_tag

if TYPE_CHECKING:
    from monarch_gateway.membership import Membership
from monarch_gateway.operations import (
    SINGLE_RESULT_METHODS,
    MeshService,
    describe_failure,
    finish_call,
    start_call,
)
from monarch_gateway.relay import SYNC_PATH, relay_sync
from monarch_proxy.errors import (
    GatewayError,
    ProtocolError,
    SessionLimitError,
    UnknownHandleError,
    WorkerLostError,
)
from monarch_proxy.protocol.events import ConnectionFailed, Departed, Hello, Released, Requested
from monarch_proxy.protocol.frames import (
    HEADER,
    MAX_META_SIZE,
    PIECE_SIZE,
    pack_for_sending,
)
from monarch_proxy.protocol.names import CloseCode, Op
from monarch_proxy.protocol.server import Limits, ServerHandshake, ServerSession, failed

logger = logging.getLogger("monarch_gateway")

HELLO_TIMEOUT_S = 10.0
CLOSE_SEND_TIMEOUT_S = 2.0
REMEMBERED_FAILURES = 1024  # ids of sessions closed for a cap or an error, to tell on resume
# While other calls of a session are in flight, a reply waits up to COALESCE_S (or until
# COALESCE_MAX messages are queued) so replies leave together in one WebSocket message: fewer
# sends here and fewer wake-ups in the client, about 10-20% more calls/s under load. A reply
# with no other call in flight leaves at once.
COALESCE_S = 0.001
COALESCE_MAX = 64


def message_limit(max_frame_size: int) -> int:
    """Largest WebSocket message a client may send: one piece of a frame plus its meta."""
    return HEADER.size + MAX_META_SIZE + min(max_frame_size, PIECE_SIZE)


def lost_error(worker: Worker) -> WorkerLostError:
    return WorkerLostError(f"{worker.describe()} died or stopped answering during this call")


failure_for = describe_failure


@dataclass(eq=False)
class Call:
    waiter: asyncio.Future[Any] | None = None  # the request's task, or Monarch's future
    entry: Entry | None = None
    # Meshes its arguments reference, by handle: resolved on arrival like ``entry``, so a
    # release that follows the request never frees what it still needs.
    refs: dict[int, Entry] | None = None
    error: Exception | None = None  # the request was invalid when it arrived
    lost: Worker | None = None


@dataclass(eq=False)
class GatewaySession:
    gateway: Gateway
    proto: ServerSession
    number: int  # names the session in logs (its id is a secret: it resumes the session)
    table: HandleTable = field(default_factory=HandleTable)
    ws: ServerConnection | None = None
    connection: int | None = None  # the id proto knows ws by
    calls: dict[int, Call] = field(default_factory=dict)
    expiry: asyncio.TimerHandle | None = None
    ended: bool = False
    outbox: list[bytes] = field(default_factory=list)
    # Bytes of unsequenced frames (LOG, MEMBERS) queued or being written. Replies are not
    # counted: they are the same objects proto keeps until acked, capped there.
    outbox_bytes: int = 0
    _queued_bytes: int = 0  # the part of outbox_bytes still in the outbox
    writing: bool = False
    flush_timer: asyncio.TimerHandle | None = None  # a coalescing writer start, pending
    # Names this session's proc meshes, so worker output is routed here (see output.py).
    output_tag: str = field(default_factory=new_tag)
    keep_procs: bool = False  # the client asked that its proc meshes outlive the session

    @property
    def id(self) -> str:
        return self.proto.session_id

    def attach(self, ws: ServerConnection, connection: int, hello: Hello) -> None:
        """Give the session to ``ws``; the connection that held it is fenced and closed."""
        if self.expiry is not None:
            self.expiry.cancel()
            self.expiry = None
        old = self.ws
        self.keep_procs = hello.keep_procs
        attached = self.proto.attach(connection, hello)
        self.outbox.clear()  # queued for the old connection; attach() replays what matters
        self.outbox_bytes = self._queued_bytes = 0
        self.ws, self.connection = ws, connection
        if old is not None and attached.fenced is not None:
            logger.warning("session taken over by a new connection", extra={"session": self.number})
            self.gateway.close_later(old, ServerSession.superseded())
        self.send(attached.messages)
        if attached.resumed:
            logger.info(
                "session resumed", extra={"session": self.number, "replayed": attached.replayed}
            )

    def detach(self, connection: int) -> None:
        if not self.proto.detach(connection) or self.ended:
            return
        self.ws, self.connection = None, None
        self.outbox.clear()
        self.outbox_bytes = self._queued_bytes = 0
        loop = asyncio.get_running_loop()
        self.expiry = loop.call_later(self.gateway.resume_grace_s, self.end, "grace expired")

    def end(self, reason: str) -> None:
        if self.ended:
            return
        self.ended = True
        if self.expiry is not None:
            self.expiry.cancel()
        for call in self.calls.values():
            if call.waiter is not None:
                call.waiter.cancel()
        self.calls.clear()
        if not self.keep_procs and self.table.proc_meshes:
            # Ended for good (closed, or not resumed within the grace): the processes it
            # spawned would otherwise run on the workers for as long as the gateway lives.
            self.gateway.background(self.gateway.service.stop_procs(list(self.table.proc_meshes)))
        self.table.clear()
        self.gateway.sessions.pop(self.id, None)
        logger.info("session ended", extra={"session": self.number, "reason": reason})

    def fail(self, failure: ConnectionFailed) -> None:
        """The client broke the protocol or a cap: tell it why, close, free everything.

        A client that could not read the reason is told again if it tries to resume.
        """
        logger.warning(
            "session closed", extra={"session": self.number, "error": str(failure.error)}
        )
        self.gateway.remember_failure(self.id, failure)
        ws = self.ws
        self.end(getattr(failure.error, "code", "protocol"))
        if ws is not None:
            self.gateway.close_later(ws, failure)

    def handle(self, event: object) -> None:
        if isinstance(event, Requested):
            call = Call()
            # Resolve the handle now, in frame order: a RELEASE that follows this request must
            # not free the mesh before the request's task gets to run.
            try:
                if "handle" in event.meta:
                    call.entry = self.table.get(event.meta["handle"])
                refs = event.meta.get("refs")
                if refs is not None:
                    if not isinstance(refs, list):
                        raise ProtocolError("request field 'refs' must be a list of handles")
                    call.refs = {h: self.table.get(h) for h in refs}
            except (UnknownHandleError, ProtocolError) as exc:
                call.error = exc
            self.calls[event.id] = call
            if self._starts_now(event, call):
                self._start(event, call)
            else:
                call.waiter = asyncio.get_running_loop().create_task(self._serve(event))
        elif isinstance(event, Released):
            self.table.release(event.handles)
        elif isinstance(event, Departed):
            self.end("client said goodbye")

    def send(self, messages: list[bytes], *, unsequenced: bool = False) -> None:
        """Queue messages for the client, in order, and make sure a writer is draining them.

        Reliable frames also stay buffered in ``proto`` until acked, so what cannot be sent now
        reaches the client when it resumes.
        """
        if self.proto.failure is not None:  # the frames just made passed a cap
            self._failed()
            return
        if self.queue(messages, unsequenced=unsequenced):
            if self.calls and len(self.outbox) < COALESCE_MAX:
                loop = asyncio.get_running_loop()
                self.flush_timer = loop.call_later(COALESCE_S, self._start_writer)
            else:
                self._start_writer()
        elif self.flush_timer is not None and len(self.outbox) >= COALESCE_MAX:
            self.flush_timer.cancel()
            self._start_writer()

    def _start_writer(self) -> None:
        self.flush_timer = None
        asyncio.get_running_loop().create_task(self._write())

    async def send_now(self, messages: list[bytes]) -> None:
        """:meth:`send`, writing in this task when no writer is active (one loop turn less)."""
        if self.proto.failure is not None:
            self._failed()
            return
        if self.queue(messages):
            await self._write()

    def _failed(self) -> None:
        if not self.ended and self.proto.failure is not None:
            self.fail(failed(self.proto.failure))

    def queue(self, messages: list[bytes], *, unsequenced: bool = False) -> bool:
        """Add to the outbox; True if the caller must start the writer."""
        if self.ws is None or self.ended:
            return False
        if unsequenced:
            # A client that does not read: its replies stay in proto for a resume, up to the
            # unacked cap; this one bounds the rest (worker output, membership events).
            size = sum(len(m) for m in messages)
            self.outbox_bytes += size
            self._queued_bytes += size
            limit = self.gateway.limits.max_outbox_bytes
            if self.outbox_bytes > limit:
                error = SessionLimitError("outbox_bytes", self.outbox_bytes, limit)
                self.fail(self.proto.fail(error))
                return False
        self.outbox += messages
        if self.writing:
            return False
        self.writing = True
        return True

    async def _write(self) -> None:
        try:
            while self.outbox and self.ws is not None:
                # Messages queued while the last write was in flight leave together, packed
                # (see frames.BATCH).
                messages, self.outbox = pack_for_sending(self.outbox), []
                ws = self.ws
                sent, self._queued_bytes = self._queued_bytes, 0
                with contextlib.suppress(ConnectionClosed):
                    for message in messages:
                        await ws.send(message)
                if self.ws is ws:  # else the outbox was reset for a new connection
                    self.outbox_bytes -= sent
        finally:
            self.writing = False

    async def drain(self, timeout_s: float) -> None:
        """Wait until everything queued has been written (or the time is up)."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while self.writing and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)

    def _starts_now(self, request: Requested, call: Call) -> bool:
        """Whether ``request`` is a call to send to the actors right now (see start_call)."""
        return (
            request.op == Op.ENDPOINT_CALL
            and call.entry is not None
            and call.error is None
            and self.gateway.dead_worker_of(call.entry) is None
        )

    def _start(self, request: Requested, call: Call) -> None:
        """Send a call in arrival order; wait for its result without a task if it has one."""
        assert call.entry is not None
        try:
            started = start_call(call.entry, request.meta, request.payload, call.refs)
        except Exception as exc:
            self.calls.pop(request.id, None)
            self.send(self.proto.failure_reply(request.id, *failure_for(exc)))
            return
        method = request.meta["method"]
        if method in SINGLE_RESULT_METHODS:
            call.waiter = started
            started.add_done_callback(functools.partial(self._finish, request, call))
        elif method == "stream":
            call.waiter = asyncio.get_running_loop().create_task(self._serve(request, started))
        else:  # a broadcast: sent, nothing to wait for
            self.calls.pop(request.id, None)
            self.send(self.proto.reply(request.id, {}, b""))

    def _finish(self, request: Requested, call: Call, waiter: asyncio.Future[Any]) -> None:
        self.calls.pop(request.id, None)
        if self.ended:
            return
        try:
            assert call.entry is not None
            result = finish_call(self.table, call.entry, request.meta, waiter.result())
            data = self.proto.reply(request.id, *result)
        except asyncio.CancelledError:
            if call.lost is None:
                return
            data = self.proto.failure_reply(request.id, *failure_for(lost_error(call.lost)))
        except Exception as exc:
            data = self.proto.failure_reply(request.id, *failure_for(exc))
        self.send(data)

    async def _serve(self, request: Requested, stream: Any = None) -> None:
        call = self.calls[request.id]
        try:
            meta, payload = await self._execute(request, call, stream)
            data = self.proto.reply(request.id, meta, payload)
        except asyncio.CancelledError:
            if call.lost is None:
                raise
            data = self.proto.failure_reply(request.id, *failure_for(lost_error(call.lost)))
        except Exception as exc:
            meta, payload = failure_for(exc)
            data = self.proto.failure_reply(request.id, meta, payload)
        finally:
            self.calls.pop(request.id, None)
        if not self.ended:
            await self.send_now(data)

    async def _execute(
        self, request: Requested, call: Call, stream: Any = None
    ) -> tuple[dict[str, Any], bytes]:
        service, table, meta, op = self.gateway.service, self.table, request.meta, request.op
        if call.error is not None:
            raise call.error
        if op == Op.JOB_MESHES:
            return service.meshes(table)
        if op == Op.JOB_FLUSH_OUTPUT:
            return await service.flush_output()
        if op == Op.JOB_RELOAD:
            alive = lambda entry: self.gateway.dead_worker_of(entry) is None  # noqa: E731
            return await service.reload(table, meta, alive)
        if op == Op.JOB_MEMBERS:
            return self.gateway.members(), b""
        entry = call.entry
        if entry is None:
            raise ProtocolError(f"operation {op!r} needs a handle")
        if op == Op.MESH_SLICE:
            return service.slice(table, entry, meta)
        # The rest reach workers: fail fast if one they need is already dead.
        dead = self.gateway.dead_worker_of(entry)
        if dead is not None:
            raise WorkerLostError(f"{dead.describe()} is dead; this mesh cannot be used")
        if op == Op.ENDPOINT_CALL and stream is not None:  # started in arrival order

            async def emit(item_meta: dict[str, Any], payload: bytes) -> None:
                await self.send_now(self.proto.item(request.id, item_meta, payload))

            return await service.stream(table, entry, stream, emit)
        if op == Op.HOST_SPAWN_PROCS:
            return await service.spawn_procs(table, entry, meta, self.output_tag, request.payload)
        if op == Op.PROC_SPAWN:
            return await service.spawn(table, entry, meta, request.payload, call.refs)
        if op == Op.MESH_STOP:
            return await service.stop(table, entry, meta)
        raise GatewayError(f"unknown operation {op!r}; the client may be newer than the gateway")


async def discard(ws: ServerConnection) -> None:
    """Read and drop messages until the connection closes (so a closing handshake completes)."""
    with contextlib.suppress(ConnectionClosed):
        async for _ in ws:
            pass


class Gateway:
    """Serves a :class:`MeshService` to monarch-proxy clients over WebSockets."""

    def __init__(
        self,
        service: MeshService,
        workers: list[Worker],
        *,
        token: str | None,
        host: str = "127.0.0.1",
        port: int = 0,
        ssl: ssl_module.SSLContext | None = None,
        limits: Limits | None = None,
        resume_grace_s: float = 30.0,
        sync_agent: str | None = None,
    ) -> None:
        self.service = service
        self.sync_agent = sync_agent  # host:port of the monarch-sync agent /sync relays to
        self.token = token
        self.host = host
        self.requested_port = port
        self.ssl = ssl
        self.limits = limits or Limits()
        self.max_frame_size = self.limits.max_frame_size
        self.resume_grace_s = resume_grace_s
        self.sessions: dict[str, GatewaySession] = {}
        self._numbers = itertools.count(1)  # session numbers, for logs
        self._connections = itertools.count(1)  # connection ids, for the session cores
        self._rejections = RateLimit(burst=10, window_s=60.0)
        self._output = OutputRouter()
        self._closing: dict[ServerConnection, asyncio.Task[None]] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._failures: collections.OrderedDict[str, ConnectionFailed] = collections.OrderedDict()
        self.monitor = WorkerMonitor(workers, self._worker_died)
        self._server: Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.membership: Membership | None = None  # set by app.py: replacements of workers

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._server = await serve(
            self._connection,
            self.host,
            self.requested_port,
            ssl=self.ssl,
            process_request=self._process_request,
            max_size=message_limit(self.max_frame_size),
            compression=None,
            ping_interval=20,
            ping_timeout=60,
        )
        self.monitor.start()
        logger.info("gateway listening", extra={"url": self.url})

    @property
    def port(self) -> int:
        assert self._server is not None, "start() the gateway first"
        return int(next(iter(self._server.sockets)).getsockname()[1])

    @property
    def url(self) -> str:
        scheme = "wss" if self.ssl else "ws"
        return f"{scheme}://{self.host}:{self.port}"

    def publish_output(self, stream: str, text: str) -> None:
        """Route captured output to the sessions whose actors wrote it (see output.py); the
        rest (the gateway's own) goes to no client. Callable from any thread."""
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._publish, stream, text)

    def _publish(self, stream: str, text: str) -> None:
        runs = self._output.feed(stream, text)
        if not runs:
            return
        by_tag = {s.output_tag: s for s in self.sessions.values()}
        for tag, lines in runs:
            session = by_tag.get(tag)
            if session is not None and session.ws is not None:
                session.send([ServerSession.log(stream, lines)], unsequenced=True)

    def members(self) -> dict[str, Any]:
        if self.membership is not None:
            return self.membership.state()
        dead = self.monitor.liveness.dead
        lost = [w.address for w in self.monitor.workers if w in dead]
        return {"meshes": {}, "whole": not lost}

    def publish_membership(self, event: dict[str, Any]) -> None:
        """Tell every connected client how the meshes stand (a worker lost or replaced)."""
        data = [ServerSession.members(event)]
        for session in list(self.sessions.values()):
            if session.ws is not None:
                session.send(data, unsequenced=True)

    def mesh_failed(self, mesh_name: str, report: str) -> None:
        """Monarch's unhandled fault hook, from any thread: tell the session whose mesh failed
        (its actor meshes by Monarch's name, its proc meshes by their output tag)."""
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._mesh_failed, mesh_name, report)

    def _mesh_failed(self, mesh_name: str, report: str) -> None:
        for session in list(self.sessions.values()):
            name = session.table.monarch_names.get(mesh_name)
            if name is None and f"_{session.output_tag}" in mesh_name:
                name = mesh_name.split(f"_{session.output_tag}")[0]
            if name is not None and session.ws is not None:
                session.send([ServerSession.fault(name, report)], unsequenced=True)

    def dead_worker_of(self, entry: Entry) -> Worker | None:
        if entry.whole:  # spawns go to the current workers
            entry = self.service.host_entry(entry.mesh)
        dead = self.monitor.liveness.dead
        gone = self.membership.gone if self.membership is not None else set()
        return next((w for w in entry.hosts if w in dead or w in gone), None)

    def _worker_died(self, worker: Worker) -> None:
        if self.membership is not None:
            self.membership.refresh_members()
        self.publish_membership({**self.members(), "lost": [worker.address]})
        for session in self.sessions.values():
            for call in session.calls.values():
                entry = call.entry
                if entry is not None and worker in entry.hosts:
                    call.lost = worker
                    if call.waiter is not None:
                        call.waiter.cancel()

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        if request.path == "/healthz":
            return connection.respond(HTTPStatus.OK, json.dumps(self.health(request)) + "\n")
        refused = self._check_token(connection, request)
        if refused is None and request.path == SYNC_PATH and self.sync_agent is None:
            return connection.respond(
                HTTPStatus.NOT_FOUND,
                "this gateway relays no workspace sync: start it with --sync-agent HOST:PORT\n",
            )
        return refused

    def health(self, request: Request) -> dict[str, Any]:
        """Liveness for anyone (probes); the details only with the bearer token."""
        dead = sorted(w.address for w in self.monitor.liveness.dead)
        body: dict[str, Any] = {"status": "degraded" if dead else "ok"}
        if self._authorized(request):
            body |= {
                "sessions": len(self.sessions),
                "handles": sum(len(s.table) for s in self.sessions.values()),
                # processes each session's proc meshes hold on the workers, by session number
                "processes": {str(s.number): s.table.processes() for s in self.sessions.values()},
                "workers": len(self.monitor.workers),
                "dead_workers": dead,
            }
        return body

    def _authorized(self, request: Request) -> bool:
        if self.token is None:
            return True
        scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            presented.encode(), self.token.encode()
        )

    def _check_token(self, connection: ServerConnection, request: Request) -> Response | None:
        if self._authorized(request):
            return None
        # Anyone can knock: at most a few lines a minute, then a count of the rest.
        allowed, suppressed = self._rejections.allow(time.monotonic())
        if allowed:
            logger.warning(
                "rejected connection: missing or wrong bearer token",
                extra={"peer": str(connection.remote_address), "suppressed": suppressed},
            )
        return connection.respond(HTTPStatus.UNAUTHORIZED, "missing or wrong bearer token\n")

    async def _connection(self, ws: ServerConnection) -> None:
        if ws.request is not None and ws.request.path == SYNC_PATH and self.sync_agent:
            await relay_sync(ws, self.sync_agent)
            return
        connection = next(self._connections)
        session = await self._handshake(ws, connection)
        if session is None:
            return
        try:
            # Read until the connection is closed, even once the session has failed, ended or
            # moved to another connection (proto ignores those bytes): a reader must be there
            # for the closing handshake to complete.
            async for message in ws:
                for event in session.proto.receive(message, connection):
                    if isinstance(event, ConnectionFailed):
                        session.fail(event)
                        break
                    session.handle(event)
        except ConnectionClosed:
            pass
        finally:
            session.detach(connection)
            closing = self._closing.pop(ws, None)
            if closing is not None:  # returning would close with 1000 before the ERROR frame
                await closing

    async def _handshake(self, ws: ServerConnection, connection: int) -> GatewaySession | None:
        core = ServerHandshake(max_frame_size=self.max_frame_size)
        try:
            first = await asyncio.wait_for(ws.recv(), HELLO_TIMEOUT_S)
        except (ConnectionClosed, TimeoutError):
            return None
        [event] = core.receive(first)
        if isinstance(event, ConnectionFailed):
            await asyncio.gather(self.close_with(ws, event), discard(ws))
            return None
        failure = self._failures.get(event.session_id or "")
        if failure is not None:  # closed for a reason the client may never have read
            await self.close_with(ws, failure)
            return None
        session = self.sessions.get(event.session_id or "")
        if session is None:  # a new session (an unknown or expired id gets a fresh one)
            proto = ServerSession(secrets.token_urlsafe(18), event.version, limits=self.limits)
            session = GatewaySession(self, proto, next(self._numbers))
            self.sessions[session.id] = session
            logger.info(
                "session opened",
                extra={"session": session.number, "peer": str(ws.remote_address)},
            )
        session.attach(ws, connection, event)
        return session

    def remember_failure(self, session_id: str, failure: ConnectionFailed) -> None:
        self._failures[session_id] = failure
        while len(self._failures) > REMEMBERED_FAILURES:
            self._failures.popitem(last=False)

    def background(self, work: Coroutine[Any, Any, Any]) -> None:
        """Run ``work`` on the loop, holding a reference until it is done."""
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def close_later(self, ws: ServerConnection, failure: ConnectionFailed) -> None:
        """Close ``ws`` for ``failure`` from a callback; its handler waits for this to finish."""
        if ws not in self._closing:
            self._closing[ws] = asyncio.get_running_loop().create_task(self.close_with(ws, failure))

    @staticmethod
    async def close_with(ws: ServerConnection, failure: ConnectionFailed) -> None:
        """Send the failure's ERROR frame (if any) and close with its code."""
        reason = str(getattr(failure.error, "code", "closed"))
        try:
            async with asyncio.timeout(CLOSE_SEND_TIMEOUT_S):
                if failure.message is not None:
                    await ws.send(failure.message)
                await ws.close(failure.close_code, reason)
        except ConnectionClosed:
            pass
        except TimeoutError:  # a client that does not read: close() would wait forever
            ws.transport.abort()

    async def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop accepting, let running calls finish (up to ``timeout_s``), then close."""
        if self._server is None:
            return
        self._server.close(close_connections=False)
        running = [
            c.waiter
            for s in self.sessions.values()
            for c in s.calls.values()
            if c.waiter is not None
        ]
        if running:
            await asyncio.wait(running, timeout=timeout_s)
        for session in list(self.sessions.values()):
            await session.drain(timeout_s=5.0)
            ws = session.ws
            session.end("gateway shutting down")
            if ws is not None:
                with contextlib.suppress(ConnectionClosed):
                    await ws.close(CloseCode.GOING_AWAY, "gateway shutting down")
        await self._server.wait_closed()
        await self.monitor.stop()
        logger.info("gateway stopped")
