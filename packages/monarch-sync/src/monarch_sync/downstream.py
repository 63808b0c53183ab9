"""Feeding children: connect, learn their NEED, forward blobs, adopt orphans (asyncio).

Used by the client (whose blob source is the workspace) and by every agent (whose source is
its staging tree). Per child there is a sender task and a reader task. Every blob goes out with
its tag (:class:`~monarch_sync.protocol.BlobTags`): the one it arrived with, kept here, or,
for a blob that entered the push here (the client's, or one an agent held already), one made
over bytes first checked against the blob's digest. Blobs arriving from
upstream are queued for every child whose subtree wants them (see :class:`RelayState`), with
the bytes held in memory only while the child's queue is under ``queue_limit``; past that the
queue keeps indices and the sender reads the blob back from disk, so a slow child neither
stalls its siblings nor grows memory.

A child whose connection closes, resets or goes silent for ``stall_timeout`` (agents heartbeat)
is reconnected a few times first (its session is found by push id and answers with what it
still lacks); a child that answered ERROR, broke the protocol or stays unreachable is lost: it
is reported failed and its planned children are attached here. A child that is alive but the
bottleneck of its subtree (see :class:`~monarch_sync.recovery.SlowDetector`) keeps being fed,
but its children are attached here, once. An adopted agent that is mid-push answers with what
it still lacks and is fed from here; one that never got the push starts it fresh. The decisions
live in :mod:`monarch_sync.recovery`; this module only carries them out.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import struct
import time
from collections.abc import Callable
from typing import Any, Protocol

from .conn import Conn, Dial, connect
from .exceptions import BadToken, PeerLost, SyncError, SyncProtocolError
from .frames import (
    MAX_BATCH_BLOBS,
    MAX_BATCH_BYTES,
    TAG_SIZE,
    BlobItem,
    ErrorCode,
    Frame,
    FrameType,
    Payload,
    blobs_table,
    decode_json,
    indices_from_bitmap,
)
from .protocol import BlobTags
from .recovery import Loss, Recovery, SlowDetector
from .relay import RelayState
from .tree import TreeNode

__all__ = ["BlobSource", "Downstream", "NodeResult", "failed_result", "manifest_payload"]

NodeResult = dict[str, Any]
JSON_LEN = struct.Struct("!I")
MAX_REFETCH = 3
WRITE_BYTES = 4 * MAX_BATCH_BYTES  # blob data handed to one socket write
log = logging.getLogger("monarch_sync.downstream")


class BlobSource(Protocol):
    """Where blobs are read back from; ``blobs`` is the push's blob table (digest, size)."""

    @property
    def blobs(self) -> list[tuple[bytes, int]]: ...

    def has(self, index: int) -> bool: ...
    def read_blob(self, index: int) -> bytes: ...


class _Answered(SyncError):
    """The child sent ERROR: it failed or refused us (not worth reconnecting)."""


def _answer(peer: str, frame: Frame) -> SyncError:
    err = decode_json(frame)
    if not isinstance(err, dict):
        return SyncProtocolError(f"{peer}: ERROR frame is not an object")
    if err.get("code") == ErrorCode.BAD_TOKEN:
        return BadToken(peer)
    return _Answered(f"{peer}: {err.get('code')}: {err.get('message')}")


def failed_result(peer: str, reason: str) -> NodeResult:
    return {"peer": peer, "ok": False, "error": reason, "root": None, "bytes": 0, "seconds": 0.0}


def manifest_payload(header: dict[str, Any], manifest_bytes: bytes) -> bytes:
    head = json.dumps(header, separators=(",", ":")).encode()
    return JSON_LEN.pack(len(head)) + head + manifest_bytes


def parse_manifest_frame(frame: Frame) -> tuple[dict[str, Any], bytes]:
    """The push header and manifest bytes of a MANIFEST frame; raises SyncProtocolError."""
    try:
        (n,) = JSON_LEN.unpack_from(frame.payload)
        head = json.loads(bytes(frame.payload[JSON_LEN.size : JSON_LEN.size + n]))
    except (struct.error, ValueError, RecursionError) as exc:
        raise SyncProtocolError(f"malformed MANIFEST frame: {exc}") from None
    if not isinstance(head, dict) or not isinstance(head.get("blobs"), int):
        raise SyncProtocolError("MANIFEST header is not an object with a blob count")
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
        self.owed = 0  # bytes queued for it, held or to read back (sizes where known)
        self.handed = 0  # blob bytes handed to its socket
        self.asked = 0  # blobs it asked for over this connection (NEEDs)

    def enqueue(self, index: int, data: Payload | None, size: int) -> None:
        self.queue.append((index, data))
        if data is not None:
            self.queued_bytes += len(data)
        self.owed += size
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
        recovery: Recovery | None = None,
        fault: Callable[[str, int, Payload], Payload] | None = None,
        pace: Callable[[str, int], float] | None = None,
        dial: Dial | None = None,
        head: dict[str, Any] | None = None,
    ) -> None:
        self.push_id = push_id
        self.dial = dial  # how children are reached (default TCP; the client may tunnel)
        self.extra_head = head or {}  # more push-header fields for the children (see client)
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
        self.pace = pace  # test hook: seconds to wait before handing n bytes to a peer
        self.recovery = recovery if recovery is not None else Recovery()
        self.relay = RelayState()
        self.children: dict[str, _Child] = {}
        self.results: list[NodeResult] = []
        self.bytes_sent = 0
        self.bytes_in = 0  # blob bytes offered here from upstream (the agents' ingress)
        self._source: BlobSource | None = None
        self._source_ready = asyncio.Event()
        self.tags: BlobTags | None = None  # once set_source() gave the blob table
        self._tagged = bytearray()  # the tag of every blob known here (zeros: none yet)
        self._attaching: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Event()
        self._detector = SlowDetector(self.recovery)
        self._watcher: asyncio.Task[None] | None = None
        self._reached: set[str] = set()  # children that completed a handshake this push
        self._reconnects: collections.Counter[str] = collections.Counter()
        self._strikes: collections.Counter[str] = collections.Counter()  # tries, no progress
        self._asked: dict[str, int] = {}  # blobs a lost child had asked for when lost
        self._moved_from: dict[str, tuple[str, str]] = {}  # adopted peer -> (from, why)
        self._moved_out: set[str] = set()  # children whose subtree was moved here

    def set_manifest(self, manifest_bytes: bytes) -> None:
        if not self._full.done():
            self._full.set_result(manifest_bytes)

    def set_source(self, source: BlobSource) -> None:
        self._source = source
        self.tags = BlobTags(self.token, self.push_id, self.root, source.blobs)
        self._tagged = bytearray(TAG_SIZE * len(source.blobs))
        if self.blob_sizes is None:
            self.blob_sizes = [n for _, n in source.blobs]
        self._source_ready.set()

    def _tag(self, index: int, data: Payload) -> bytes:
        """The tag ``index`` arrived with, or one made here over ``data``, checked first."""
        at = index * TAG_SIZE
        tag = bytes(self._tagged[at : at + TAG_SIZE])
        if not any(tag):
            assert self.tags is not None
            tag = self.tags.seal(index, data)  # raises DigestMismatch
            self._tagged[at : at + TAG_SIZE] = tag
        return tag

    def _size(self, index: int) -> int:
        return self.blob_sizes[index] if self.blob_sizes is not None else 0

    # -- attaching ----------------------------------------------------------------------
    def attach_soon(self, node: TreeNode, lost: tuple[Loss, str] | None = None) -> None:
        task = asyncio.create_task(self.attach(node, lost))
        self._attaching.add(task)
        task.add_done_callback(self._attach_done)

    @property
    def attaching(self) -> bool:
        return bool(self._attaching)

    def _attach_done(self, task: asyncio.Task[None]) -> None:
        self._attaching.discard(task)
        self._changed.set()
        self.on_attached()

    async def attach(self, node: TreeNode, lost: tuple[Loss, str] | None = None) -> None:
        """Connect to ``node``, send it the push and its subtree, register its NEED.

        ``lost``: why the previous connection to ``node`` ended; this is then a reconnect.
        A child reached during this push whose connection drops is retried as
        :meth:`Recovery.retry_delay` says before it is reported failed. Attempts count until
        a reconnect finds the child lacking fewer blobs than before (progress), so a child
        that keeps taking connections and dropping them is not retried forever.
        """
        origin = lost
        attempt = 0
        while True:
            if lost is not None:
                origin = origin or lost
                attempt += 1
                self._strikes[node.peer] += 1
                reached = node.peer in self._reached
                delay = self.recovery.retry_delay(
                    lost[0], self._strikes[node.peer], reached=reached
                )
                if delay is None:
                    why = origin[1] if lost is origin else f"{origin[1]} (reconnect: {lost[1]})"
                    self._record_failure(node, why)
                    return
                log.debug("%s: reconnecting to %s in %.2fs (%s)", self.sender, node.peer,
                          delay, lost[1])  # fmt: skip
                await asyncio.sleep(delay)
            # A live agent answers a challenge at once: reconnects wait less for it.
            lost = await self._connect(node, self.stall_timeout / 2 if attempt else None)
            if lost is None:
                if attempt:
                    self._reconnects[node.peer] += 1
                return

    async def _connect(self, node: TreeNode, timeout: float | None) -> tuple[Loss, str] | None:
        """One attempt of :meth:`attach`: None once the child is fed, else why it failed."""
        try:
            conn = await connect(
                node.peer,
                self.token,
                self.push_id,
                self.sender,
                timeout or self.stall_timeout,
                dial=self.dial,
            )
        except BadToken as exc:
            return Loss.ANSWERED, str(exc)
        except PeerLost as exc:
            return Loss.UNREACHABLE, str(exc)
        self._reached.add(node.peer)
        try:
            head = {
                "push_id": self.push_id,
                "tree": node.to_json(),
                "blobs": self.blob_count,
                "root": self.root,
                "recovery": self.recovery.to_json(),
                **self.extra_head,
            }
            if self.patch is not None:
                conn.send_frame(
                    FrameType.MANIFEST, manifest_payload({**head, **self.patch[0]}, self.patch[1])
                )
            else:
                conn.send_frame(FrameType.MANIFEST, manifest_payload(head, await self._full))
            while True:
                frame = await conn.recv(self.stall_timeout)
                kind = frame.type
                if kind is FrameType.NEED:
                    break
                if kind is FrameType.MANIFEST_WANTED:  # no base for the patch there
                    conn.send_frame(FrameType.MANIFEST, manifest_payload(head, await self._full))
                elif kind is FrameType.NODE_DONE:  # a grandchild that needed nothing
                    self.on_node_done(decode_json(frame))
                elif kind is FrameType.ERROR:
                    raise _answer(node.peer, frame)
            need = indices_from_bitmap(frame.payload, self.blob_count)
            await self._source_ready.wait()
        except TimeoutError:
            conn.close()
            return Loss.STALLED, f"stalled: no NEED within {self.stall_timeout:g}s"
        except (_Answered, BadToken) as exc:
            conn.close()
            return Loss.ANSWERED, str(exc)
        except (SyncProtocolError, ValueError) as exc:
            conn.close()
            return Loss.PROTOCOL, str(exc)
        except (SyncError, OSError) as exc:
            conn.close()
            return Loss.DROPPED, str(exc) or type(exc).__name__
        child = _Child(node, conn)
        child.asked = len(need)
        if len(need) < self._asked.get(node.peer, len(need) + 1):
            self._strikes[node.peer] = 0  # it got something since it was last lost
        self.children[node.peer] = child
        self.relay.add_child(node.peer, need)
        self._feed_backlog(child)
        child.tasks = [
            asyncio.create_task(self._send_loop(child)),
            asyncio.create_task(self._read_loop(child)),
        ]
        if self._watcher is None and self.recovery.moves:
            self._watcher = asyncio.create_task(self._watch())
        return None

    def _feed_backlog(self, child: _Child) -> None:
        assert self._source is not None
        for i in self.relay.backlog(child.node.peer, self._source.has):
            size = self._size(i)
            child.enqueue(i, None, size)
            self.bytes_requested += size
        missing = self.relay.pending[child.node.peer]
        if missing:
            self.on_need_more(set(missing))

    def _record_failure(self, node: TreeNode, reason: str) -> None:
        result = failed_result(node.peer, reason)
        self._annotate(node.peer, [result])
        self.results.append(result)
        self._adopt(node, "lost")  # re-attach orphans here
        self._changed.set()

    def _adopt(self, node: TreeNode, why: str) -> None:
        """Attach ``node``'s planned children here, those not already moved here."""
        for grandchild in node.children:
            if grandchild.peer in self._moved_from or grandchild.peer in self.children:
                continue
            self._moved_from[grandchild.peer] = (node.peer, why)
            self.attach_soon(grandchild)

    def _annotate(self, peer: str, results: list[NodeResult]) -> None:
        """Mark a direct child's subtree results: who fed it, whether it was moved here."""
        moved = self._moved_from.get(peer)
        for r in results:
            if not isinstance(r, dict):
                continue
            if r.get("peer") == peer:
                r["parent"] = self.sender
                if self._reconnects[peer]:
                    r["reconnects"] = self._reconnects[peer]
            if moved is not None and "moved_from" not in r:
                r["moved_from"], r["moved_reason"] = moved

    # -- slow children --------------------------------------------------------------------
    async def _watch(self) -> None:
        """Sample every child's backlog; move the children of one that is the bottleneck."""
        while True:
            await asyncio.sleep(self.recovery.sample_every)
            samples = {}
            for peer, child in self.children.items():
                buffered = child.conn.write_buffered
                samples[peer] = (child.owed + buffered, child.handed - buffered)
            for peer in self._detector.observe(time.monotonic(), self.bytes_in, samples):
                slow = self.children.get(peer)
                if slow is not None:
                    self._move_children(slow)

    def _move_children(self, child: _Child) -> None:
        """``child`` is alive but slow: feed its children from here; it keeps being fed."""
        node = child.node
        if not node.children or node.peer in self._moved_out or node.peer in self._moved_from:
            return  # nothing to move, moved once already, or part of a subtree moved here
        self._moved_out.add(node.peer)
        log.info("%s: %s is slow; attaching its children here", self.sender, node.peer)
        self._adopt(node, "slow")

    # -- forwarding ---------------------------------------------------------------------
    def offer_many(self, items: list[tuple[int, Payload, bytes]]) -> None:
        """A run of verified blobs (one BLOBS frame's worth) with the tags they came with:
        queue each for every child that wants it; the tags are kept to send them with."""
        tagged = self._tagged
        assert len(tagged) == TAG_SIZE * len(self.blob_sizes or ()), "set_source() first"
        for index, _, tag in items:
            tagged[index * TAG_SIZE : (index + 1) * TAG_SIZE] = tag
        if not self.children:
            return
        self.bytes_in += sum([len(data) for _, data, _ in items])
        routes = self.relay.route_many([index for index, _, _ in items])
        for peer, positions in routes.items():
            child = self.children[peer]
            queue = child.queue
            owed = 0
            for k in positions:
                index, data, _ = items[k]
                n = len(data)
                owed += n
                if child.queued_bytes < self.queue_limit:
                    queue.append((index, data))
                    child.queued_bytes += n
                else:  # past the limit: keep the index, read it back from disk when sending
                    queue.append((index, None))
            child.owed += owed
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
                        conn.send_frame(FrameType.HEARTBEAT)
                        await conn.drain(self.stall_timeout)
                # What is queued goes out as BLOBS frames of up to MAX_BATCH_BLOBS blobs and
                # MAX_BATCH_BYTES each (a larger blob travels alone), about WRITE_BYTES per write.
                # Nothing waits for a batch to fill: a frame holds whatever is queued now.
                items: list[BlobItem] = []
                datas: list[Payload] = []
                batch = size = 0
                queue = child.queue
                owed = 0
                while queue and batch < WRITE_BYTES:
                    index, data = queue.popleft()
                    if data is None:
                        assert self._source is not None
                        data = self._source.read_blob(index)
                        owed += self._size(index) if self.blob_sizes is not None else len(data)
                    else:
                        child.queued_bytes -= len(data)
                        owed += len(data)
                    tag = self._tag(index, data)
                    if self.fault is not None:
                        data = self.fault(peer, index, data)
                    n = len(data)
                    if items and (size + n > MAX_BATCH_BYTES or len(items) == MAX_BATCH_BLOBS):
                        conn.queue_frame(FrameType.BLOBS, blobs_table(items), *datas)
                        items, datas, size = [], [], 0
                    items.append((index, n, tag))
                    datas.append(data)
                    size += n
                    batch += n
                conn.queue_frame(FrameType.BLOBS, blobs_table(items), *datas)
                child.owed = max(0, child.owed - owed)
                if self.pace is not None:
                    await asyncio.sleep(self.pace(peer, batch))
                conn.flush()
                child.handed += batch
                self.bytes_sent += batch
                sent += 1
                if conn.write_buffered > 4 * 1024 * 1024:
                    await conn.drain(self.stall_timeout)
                elif sent % 8 == 0:
                    await asyncio.sleep(0)  # let readers and heartbeats run
        except TimeoutError:
            self._lose(child, Loss.STALLED, "stalled: not reading")
        except (SyncError, OSError) as exc:
            self._lose(child, Loss.DROPPED, str(exc) or type(exc).__name__)

    async def _read_loop(self, child: _Child) -> None:
        conn = child.conn
        peer = child.node.peer
        try:
            while True:
                frame = await conn.recv(self.stall_timeout)
                kind = frame.type
                if kind is FrameType.HEARTBEAT:  # the core let through only what a child may send
                    continue
                if kind is FrameType.NEED:
                    more = indices_from_bitmap(frame.payload, self.blob_count)
                    child.asked += len(more)
                    self.relay.pending[peer] |= more
                    self._feed_backlog(child)
                elif kind is FrameType.REFETCH:
                    if len(frame.payload) != 4:
                        raise SyncProtocolError(f"{peer}: REFETCH is not a u32 index")
                    (index,) = struct.unpack("!I", frame.payload)
                    child.refetches[index] += 1
                    if child.refetches[index] > MAX_REFETCH:
                        raise SyncProtocolError(
                            f"{peer}: blob {index} corrupted {MAX_REFETCH} times"
                        )
                    child.enqueue(index, None, self._size(index))
                elif kind is FrameType.NODE_DONE:
                    self.on_node_done(decode_json(frame))
                elif kind is FrameType.RESULT:
                    results = decode_json(frame)
                    self._annotate(peer, results)
                    self.results.extend(results)
                    self._finish_child(child)
                    return
                elif kind is FrameType.ERROR:
                    err = decode_json(frame)
                    if isinstance(err, dict) and err.get("code") == ErrorCode.REPARENTED:
                        self._finish_child(child)
                        return
                    raise _answer(peer, frame)  # it failed itself: no reconnecting
        except TimeoutError:
            self._lose(child, Loss.STALLED, f"stalled: silent for {self.stall_timeout:g}s")
        except (_Answered, BadToken) as exc:
            self._lose(child, Loss.ANSWERED, str(exc))
        except (SyncProtocolError, ValueError) as exc:
            self._lose(child, Loss.PROTOCOL, str(exc))
        except (SyncError, OSError) as exc:
            self._lose(child, Loss.DROPPED, str(exc) or type(exc).__name__)

    def _finish_child(self, child: _Child) -> None:
        child.finished = True
        for t in child.tasks:
            if t is not asyncio.current_task():
                t.cancel()
        child.conn.close()
        self.relay.drop_child(child.node.peer)
        if self.children.get(child.node.peer) is child:
            del self.children[child.node.peer]
        self._detector.forget(child.node.peer)
        self._changed.set()

    def _lose(self, child: _Child, loss: Loss, reason: str) -> None:
        """The connection to ``child`` ended: reconnect if worth it, else report it failed."""
        if child.finished:
            return
        self._finish_child(child)
        self._asked[child.node.peer] = child.asked
        self.attach_soon(child.node, (loss, reason))

    # -- ending -------------------------------------------------------------------------
    async def finish(self) -> list[NodeResult]:
        """Wait until every child (and every adopted orphan) reported or was lost."""
        while self.children or self._attaching:
            self._changed.clear()
            await self._changed.wait()
        self._stop_watching()
        return self.results

    def _stop_watching(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None

    def abort(self) -> None:
        self._stop_watching()
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
