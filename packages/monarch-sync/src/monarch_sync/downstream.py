"""Feeding children: connect, learn their NEED, forward blobs, adopt orphans (asyncio).

Used by the client (whose blob source is the workspace) and by every agent (whose source is
its staging tree). Per child there is a sender task and a reader task. Blobs arriving from
upstream are queued for every child whose subtree wants them (see :class:`RelayState`), with
the bytes held in memory only while the child's queue is under ``queue_limit``; past that the
queue keeps indices and the sender reads the blob back from disk, so a slow child neither
stalls its siblings nor grows memory.

A child that closes, errors or sends nothing for ``stall_timeout`` (agents heartbeat) is lost:
it is reported failed and its planned children are attached here. An adopted agent that is
mid-push answers with what it still lacks and is fed from here; one that never got the push
starts it fresh.
"""

from __future__ import annotations

import asyncio
import collections
import json
import struct
import time
from collections.abc import Callable
from typing import Any, Protocol

from .conn import Conn, connect
from .exceptions import BadToken, PeerLost, SyncError
from .frames import (
    MAX_BATCH_BLOBS,
    MAX_BATCH_BYTES,
    Frame,
    FrameType,
    Payload,
    decode_json,
    encode_blobs_header,
    encode_frame,
    indices_from_bitmap,
)
from .relay import RelayState
from .tree import TreeNode

__all__ = ["BlobSource", "Downstream", "NodeResult", "failed_result", "manifest_frame"]

NodeResult = dict[str, Any]
JSON_LEN = struct.Struct("!I")
MAX_REFETCH = 3
WRITE_BYTES = 4 * MAX_BATCH_BYTES  # blob data handed to one socket write


class BlobSource(Protocol):
    def has(self, index: int) -> bool: ...
    def read_blob(self, index: int) -> bytes: ...


def failed_result(peer: str, reason: str) -> NodeResult:
    return {"peer": peer, "ok": False, "error": reason, "root": None, "bytes": 0, "seconds": 0.0}


def manifest_frame(header: dict[str, Any], manifest_bytes: bytes) -> bytes:
    head = json.dumps(header, separators=(",", ":")).encode()
    return encode_frame(FrameType.MANIFEST, JSON_LEN.pack(len(head)) + head + manifest_bytes)


def parse_manifest_frame(frame: Frame) -> tuple[dict[str, Any], bytes]:
    (n,) = JSON_LEN.unpack_from(frame.payload)
    head = json.loads(bytes(frame.payload[JSON_LEN.size : JSON_LEN.size + n]))
    return head, bytes(frame.payload[JSON_LEN.size + n :])


class _Child:
    def __init__(self, node: TreeNode, conn: Conn) -> None:
        self.node = node
        self.conn = conn
        self.queue: collections.deque[tuple[int, Payload | None]] = collections.deque()
        self.queued_bytes = 0
        self.wake = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []
        self.refetches: collections.Counter[int] = collections.Counter()
        self.finished = False

    def enqueue(self, index: int, data: Payload | None) -> None:
        self.queue.append((index, data))
        if data is not None:
            self.queued_bytes += len(data)
        self.wake.set()


class Downstream:
    def __init__(
        self,
        *,
        push_id: str,
        token: str,
        sender: str,
        manifest_bytes: bytes | None,
        blob_count: int,
        root: str,
        patch: tuple[dict[str, Any], bytes] | None = None,
        stall_timeout: float,
        on_node_done: Callable[[NodeResult], None] = lambda r: None,
        on_need_more: Callable[[set[int]], None] = lambda s: None,
        on_attached: Callable[[], None] = lambda: None,
        blob_sizes: list[int] | None = None,
        queue_limit: int = 8 * 1024 * 1024,
        fault: Callable[[str, int, Payload], Payload] | None = None,
    ) -> None:
        self.push_id = push_id
        self.token = token
        self.sender = sender
        self._full: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        if manifest_bytes is not None:
            self._full.set_result(manifest_bytes)
        self.patch = patch  # (header fields, changed entries) against a base root, if any
        self.root = root
        self.blob_count = blob_count
        self.stall_timeout = stall_timeout
        self.on_node_done = on_node_done
        self.on_need_more = on_need_more
        self.on_attached = on_attached
        self.blob_sizes = blob_sizes
        self.bytes_requested = 0  # blob bytes queued for children (for progress totals)
        self.queue_limit = queue_limit
        self.fault = fault  # test hook: may corrupt a blob on its way out
        self.relay = RelayState()
        self.children: dict[str, _Child] = {}
        self.results: list[NodeResult] = []
        self.bytes_sent = 0
        self._source: BlobSource | None = None
        self._source_ready = asyncio.Event()
        self._attaching: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Event()

    def set_manifest(self, manifest_bytes: bytes) -> None:
        if not self._full.done():
            self._full.set_result(manifest_bytes)

    def set_source(self, source: BlobSource) -> None:
        self._source = source
        self._source_ready.set()

    # -- attaching ----------------------------------------------------------------------
    def attach_soon(self, node: TreeNode) -> None:
        task = asyncio.create_task(self.attach(node))
        self._attaching.add(task)
        task.add_done_callback(self._attach_done)

    @property
    def attaching(self) -> bool:
        return bool(self._attaching)

    def _attach_done(self, task: asyncio.Task[None]) -> None:
        self._attaching.discard(task)
        self._changed.set()
        self.on_attached()

    async def attach(self, node: TreeNode) -> None:
        """Connect to ``node``, send it the push and its subtree, register its NEED."""
        try:
            conn = await connect(
                node.peer,
                self.token,
                {"push_id": self.push_id, "sender": self.sender},
                self.stall_timeout,
            )
        except (PeerLost, BadToken) as exc:
            self._record_failure(node, str(exc))
            return
        try:
            head = {
                "push_id": self.push_id,
                "tree": node.to_json(),
                "blobs": self.blob_count,
                "root": self.root,
            }
            if self.patch is not None:
                conn.send(manifest_frame({**head, **self.patch[0]}, self.patch[1]))
            else:
                conn.send(manifest_frame(head, await self._full))
            while True:
                frame = await conn.recv(self.stall_timeout)
                if frame.type is FrameType.MANIFEST_WANTED:  # no base for the patch there
                    conn.send(manifest_frame(head, await self._full))
                elif frame.type is FrameType.NODE_DONE:  # a grandchild that needed nothing
                    self.on_node_done(decode_json(frame))
                elif frame.type is not FrameType.HEARTBEAT:
                    break
            if frame.type is not FrameType.NEED:
                conn.unread(frame)
                frame = await conn.expect(FrameType.NEED, self.stall_timeout)
            need = indices_from_bitmap(frame.payload, self.blob_count)
            await self._source_ready.wait()
        except (SyncError, TimeoutError, OSError) as exc:
            conn.close()
            self._record_failure(
                node, str(exc) or f"stalled: no NEED within {self.stall_timeout:g}s"
            )
            return
        child = _Child(node, conn)
        self.children[node.peer] = child
        self.relay.add_child(node.peer, need)
        self._feed_backlog(child)
        child.tasks = [
            asyncio.create_task(self._send_loop(child)),
            asyncio.create_task(self._read_loop(child)),
        ]

    def _feed_backlog(self, child: _Child) -> None:
        assert self._source is not None
        for i in self.relay.backlog(child.node.peer, self._source.has):
            child.enqueue(i, None)
            if self.blob_sizes is not None:
                self.bytes_requested += self.blob_sizes[i]
        missing = self.relay.pending[child.node.peer]
        if missing:
            self.on_need_more(set(missing))

    def _record_failure(self, node: TreeNode, reason: str) -> None:
        self.results.append(failed_result(node.peer, reason))
        for grandchild in node.children:  # re-attach orphans here
            self.attach_soon(grandchild)
        self._changed.set()

    # -- forwarding ---------------------------------------------------------------------
    def offer(self, index: int, data: Payload) -> None:
        """A verified blob is available here: queue it for every child that wants it."""
        for peer in self.relay.route(index):
            child = self.children[peer]
            child.enqueue(index, data if child.queued_bytes < self.queue_limit else None)

    def offer_many(self, items: list[tuple[int, Payload]]) -> None:
        """:meth:`offer` for a run of verified blobs (one BLOBS frame's worth)."""
        if not self.children:
            return
        routes = self.relay.route_many([index for index, _ in items])
        for peer, positions in routes.items():
            child = self.children[peer]
            queue = child.queue
            for k in positions:
                index, data = items[k]
                if child.queued_bytes < self.queue_limit:
                    queue.append((index, data))
                    child.queued_bytes += len(data)
                else:  # past the limit: keep the index, read it back from disk when sending
                    queue.append((index, None))
            child.wake.set()

    async def _send_loop(self, child: _Child) -> None:
        conn = child.conn
        peer = child.node.peer
        sent = 0
        try:
            while True:
                while not child.queue:
                    child.wake.clear()
                    try:
                        await asyncio.wait_for(child.wake.wait(), self.stall_timeout / 4)
                    except TimeoutError:  # idle: tell the child we are alive
                        conn.send(encode_frame(FrameType.HEARTBEAT))
                        await conn.drain(self.stall_timeout)
                # What is queued goes out as BLOBS frames of up to MAX_BATCH_BLOBS blobs and
                # MAX_BATCH_BYTES each (a larger blob travels alone), about WRITE_BYTES per write.
                # Nothing waits for a batch to fill: a frame holds whatever is queued now.
                parts: list[Payload] = []
                items: list[tuple[int, int]] = []
                datas: list[Payload] = []
                batch = size = 0
                queue = child.queue
                while queue and batch < WRITE_BYTES:
                    index, data = queue.popleft()
                    if data is None:
                        assert self._source is not None
                        data = self._source.read_blob(index)
                    else:
                        child.queued_bytes -= len(data)
                    if self.fault is not None:
                        data = self.fault(peer, index, data)
                    n = len(data)
                    if items and (size + n > MAX_BATCH_BYTES or len(items) == MAX_BATCH_BLOBS):
                        parts.append(encode_blobs_header(items))
                        parts += datas
                        items, datas, size = [], [], 0
                    items.append((index, n))
                    datas.append(data)
                    size += n
                    batch += n
                parts.append(encode_blobs_header(items))
                parts += datas
                conn.send_parts(parts)
                self.bytes_sent += batch
                sent += 1
                if conn.write_buffered > 4 * 1024 * 1024:
                    await conn.drain(self.stall_timeout)
                elif sent % 8 == 0:
                    await asyncio.sleep(0)  # let readers and heartbeats run
        except TimeoutError:
            self._lose(child, "stalled: not reading")
        except (SyncError, OSError) as exc:
            self._lose(child, str(exc))

    async def _read_loop(self, child: _Child) -> None:
        conn = child.conn
        peer = child.node.peer
        try:
            while True:
                frame = await conn.recv(self.stall_timeout)
                kind = frame.type
                if kind is FrameType.HEARTBEAT:
                    continue
                if kind in (FrameType.BLOBS, FrameType.BLOB, FrameType.MANIFEST):
                    raise PeerLost(peer, f"unexpected {kind.name} from a child")
                if kind is FrameType.NEED:
                    more = indices_from_bitmap(frame.payload, self.blob_count)
                    self.relay.pending[peer] |= more
                    self._feed_backlog(child)
                elif kind is FrameType.REFETCH:
                    (index,) = struct.unpack("!I", frame.payload)
                    child.refetches[index] += 1
                    if child.refetches[index] > MAX_REFETCH:
                        raise PeerLost(peer, f"blob {index} corrupted {MAX_REFETCH} times")
                    child.enqueue(index, None)
                elif kind is FrameType.NODE_DONE:
                    self.on_node_done(decode_json(frame))
                elif kind is FrameType.RESULT:
                    self.results.extend(decode_json(frame))
                    self._finish_child(child)
                    return
                elif kind is FrameType.ERROR:
                    err = decode_json(frame)
                    if err.get("code") == "reparented":  # an ancestor adopted it: not ours now
                        self._finish_child(child)
                        return
                    raise PeerLost(peer, f"{err.get('code')}: {err.get('message')}")
        except TimeoutError:
            self._lose(child, f"stalled: silent for {self.stall_timeout:g}s")
        except (SyncError, OSError, ValueError) as exc:
            self._lose(child, str(exc))

    def _finish_child(self, child: _Child) -> None:
        child.finished = True
        for t in child.tasks:
            if t is not asyncio.current_task():
                t.cancel()
        child.conn.close()
        self.relay.drop_child(child.node.peer)
        self.children.pop(child.node.peer, None)
        self._changed.set()

    def _lose(self, child: _Child, reason: str) -> None:
        if child.finished:
            return
        self._finish_child(child)
        self._record_failure(child.node, reason)

    # -- ending -------------------------------------------------------------------------
    async def finish(self) -> list[NodeResult]:
        """Wait until every child (and every adopted orphan) reported or was lost."""
        while self.children or self._attaching:
            self._changed.clear()
            await self._changed.wait()
        return self.results

    def abort(self) -> None:
        for task in list(self._attaching):
            task.cancel()
        for child in list(self.children.values()):
            child.finished = True
            for t in child.tasks:
                t.cancel()
            child.conn.close()
        self.children.clear()


def elapsed(t0: float) -> float:
    return round(time.monotonic() - t0, 4)
