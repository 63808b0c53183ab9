"""The agent: a node that receives pushes, applies them atomically and feeds its children.

:class:`Agent` runs inside any asyncio loop (``await agent.start()``; ``await agent.close()``).
Each push is a :class:`NodeSession`:

1. decode and validate the manifest; start connecting to the children while diffing against
   the current version and preparing a staging clone (in a thread);
2. answer upstream with NEED: its own missing blobs plus what the children lack that it does
   not hold (it serves what it holds from disk);
3. receive blobs, verify each one's size, XXH3 digest and tag (:class:`~.protocol.BlobTags`; a
   corrupt or forged one is asked again with REFETCH, a few times), write it, and hand it to
   the children with its tag the moment it is verified (cut-through);
4. once it holds everything, finish the tree, rename it into place and switch ``current``;
5. gather the children's results and send RESULT upstream.

If the upstream connection dies the session keeps its state and waits ``resume_timeout`` for
an ancestor to adopt it (``client_resume``, a few seconds, when the upstream was the pusher
itself, which reconnects within a second or is gone); the adopter gets a NEED for what is
still missing.

One push at a time per agent, and a lock order that cannot deadlock: a push waits for the lock
(heartbeating upstream, so its parent does not take it for stalled) only while its upstream is
connected, and a push whose id sorts after the holder's waits at most ``stall_timeout`` before
it is refused with ERROR ``busy``. Every cycle of waits (two pushes reaching two agents in
opposite orders) holds such a waiter, so one push gives up and the other completes.

Before authentication a connection gets ``hello_timeout`` in all to present a valid HELLO
(heartbeats are a protocol error then, so they cannot extend it), its frame may be at most
:data:`~monarch_sync.protocol.PREAUTH_MAX` bytes, and at most ``max_unauthenticated``
connections may be waiting at once (more are closed on accept).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import signal
import struct
import time
import uuid
from pathlib import Path
from typing import Any

from .conn import Conn, accept, parse_peer, serve
from .downstream import (
    Downstream,
    NodeResult,
    elapsed,
    failed_result,
    parse_manifest_frame,
)
from .exceptions import BadToken, DigestMismatch, PeerLost, SyncError, SyncProtocolError
from .frames import ErrorCode, FrameType, bitmap_from_indices, decode_blobs
from .manifest import Manifest
from .recovery import Recovery
from .staging import Staging, begin_staging
from .store import Store, synced_path
from .tree import TreeNode, choose_fanout, plan_tree, shared_host

__all__ = ["Agent", "NodeSession"]

MAX_REFETCH = 3
KEEP_RESULTS = 64
CLIENT_RESUME = 3.0  # seconds a session waits for its pusher to reconnect (it retries in <1 s)
log = logging.getLogger("monarch_sync.agent")


class Agent:
    def __init__(
        self,
        root: str | Path,
        token: str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        stall_timeout: float = 10.0,
        resume_timeout: float | None = None,
        advertise: str | None = None,
        members_file: str | Path | None = None,
        hello_timeout: float = 5.0,
        max_unauthenticated: int = 64,
        client_resume: float = CLIENT_RESUME,
    ) -> None:
        if not token:
            raise BadToken("an agent needs a non-empty token")
        self.store = Store(root)
        self.token = token
        self.host = host
        self.port = port
        self.stall_timeout = stall_timeout
        self.resume_timeout = resume_timeout if resume_timeout is not None else 3 * stall_timeout
        self._advertise = advertise
        # JSON {"members": ["host:port", ...]}: the agents a push that reaches us through a
        # gateway fans out to (the gateway keeps it current as workers come and go).
        self.members_file = Path(members_file) if members_file is not None else None
        self._server: asyncio.Server | None = None
        self._sessions: dict[str, NodeSession] = {}
        self._finished: collections.OrderedDict[str, list[NodeResult]] = collections.OrderedDict()
        self._lock = asyncio.Lock()
        self._holder: str | None = None  # push id of the session holding the lock
        self._handlers: set[asyncio.Task[Any]] = set()
        self.hello_timeout = hello_timeout
        self.max_unauthenticated = max_unauthenticated
        self.client_resume = client_resume
        self.unauthenticated = 0  # connections still before a verified HELLO

    @property
    def synced_path(self) -> Path:
        return synced_path(self.store.root)

    @property
    def address(self) -> str:
        """``host:port`` as peers should dial it (the bound port if ``port`` was 0)."""
        if self._advertise:
            return self._advertise
        assert self._server is not None, "start() the agent first"
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"{host}:{port}"

    def members(self) -> list[str]:
        """The worker hosts' agents, as the gateway last wrote them (none if no file yet)."""
        if self.members_file is None:
            return []
        try:
            listed = json.loads(self.members_file.read_text())["members"]
        except (OSError, ValueError, KeyError, TypeError):
            return []
        return list(dict.fromkeys(str(m) for m in listed if str(m) != self.address))

    def expand(self, tree: TreeNode, spec: object) -> tuple[TreeNode, dict[str, int] | None]:
        """Plan the subtree of a push that came through the gateway (see :mod:`.tunnel`).

        The client sent a lone node and ``spec`` = ``{"delta": bytes, "fanout": k | None}``;
        the root agent lays the members out below itself as the client would have.
        """
        if not isinstance(spec, dict) or tree.children:
            return tree, None
        members = self.members()
        if not members:
            return tree, {"fanout": 1, "depth": 1}
        hosts = [self.host, *(parse_peer(m)[0] for m in members)]
        k = spec.get("fanout") or choose_fanout(
            len(hosts), float(spec.get("delta") or 0), shared_host=shared_host(hosts)
        )
        planned = plan_tree([tree.peer, *members], int(k))
        return planned, {"fanout": int(k), "depth": planned.depth()}

    async def start(self) -> None:
        self._server = await serve(self._handle, self.host, self.port, token=self.token)

    async def serve_forever(self) -> None:
        if self._server is None:
            await self.start()
        assert self._server is not None
        await self._server.serve_forever()

    async def serve_until_signalled(self) -> None:
        """Serve (started already) until SIGINT or SIGTERM, then close: a CLI's main loop."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await self.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
        await asyncio.to_thread(self.store.wait_spare)

    async def _handle(self, conn: Conn) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        keep_open = False
        try:
            if self.unauthenticated >= self.max_unauthenticated:
                return  # connection cap before authentication: closed at once
            self.unauthenticated += 1
            try:
                async with asyncio.timeout(self.hello_timeout):  # heartbeats do not extend it
                    hello = await accept(conn, self.hello_timeout)
            finally:
                self.unauthenticated -= 1
            push_id = str(hello["push_id"])  # validated by the core
            frame = await conn.expect(FrameType.MANIFEST, self.stall_timeout)
            head, body = parse_manifest_frame(frame)
            if push_id in self._finished:  # adopted after we finished: replay the result
                conn.send_frame(FrameType.NEED, bitmap_from_indices((), head["blobs"]))
                conn.send_json(FrameType.RESULT, self._finished[push_id])
                await conn.drain(self.stall_timeout)
                return
            session = self._sessions.get(push_id)
            if session is not None:
                session.reattach(conn)
                keep_open = True
                return
            if not await self._acquire(conn, push_id):
                return
            try:
                session = NodeSession(self, push_id, conn, head, body, str(hello["sender"]))
                self._sessions[push_id] = session
                try:
                    results = await session.run()
                finally:
                    del self._sessions[push_id]
                self._finished[push_id] = results
                while len(self._finished) > KEEP_RESULTS:
                    self._finished.popitem(last=False)
            finally:
                self._holder = None
                self._lock.release()
        except (BadToken, PeerLost, SyncProtocolError, TimeoutError, ValueError, KeyError):
            pass
        finally:
            self._handlers.discard(task)
            if not keep_open:
                conn.close()

    async def _acquire(self, conn: Conn, push_id: str) -> bool:
        """Take the one-push lock for ``push_id`` (see the module docstring); False: refused
        (ERROR busy sent) or the upstream went away meanwhile."""
        loop = asyncio.get_running_loop()
        patient = self._holder is None or push_id < self._holder
        deadline = loop.time() + self.stall_timeout
        acquire = asyncio.ensure_future(self._lock.acquire())
        beat = self.stall_timeout / 4
        try:
            while True:
                done, _ = await asyncio.wait({acquire}, timeout=min(beat, 0.25))
                if done:
                    self._holder = push_id
                    return True
                if conn.closed:
                    return False  # nobody to serve: do not queue behind the holder
                if not patient and loop.time() > deadline:
                    msg = f"serving push {self._holder}, which goes first; retry later"
                    conn.send_json(FrameType.ERROR, {"code": ErrorCode.BUSY, "message": msg})
                    await conn.drain(self.stall_timeout)
                    return False
                conn.send_frame(FrameType.HEARTBEAT)  # the parent must not take us for stalled
                patient = patient or self._holder is None or push_id < self._holder
        finally:
            if not acquire.done():
                acquire.cancel()
            elif self._holder != push_id and not acquire.cancelled():
                self._lock.release()  # granted just as we gave up


class NodeSession:
    def __init__(
        self,
        agent: Agent,
        push_id: str,
        upstream: Conn,
        head: dict[str, Any],
        body: bytes,
        sender: str = "",
    ) -> None:
        self.agent = agent
        # A pusher that lost its connection reconnects at once or is gone: wait briefly.
        self.resume_timeout = (
            min(agent.resume_timeout, agent.client_resume)
            if sender == "client"
            else agent.resume_timeout
        )
        self.push_id = push_id
        self.upstream: Conn | None = upstream
        self.reattached = asyncio.Event()
        self.head = head
        self.body = body
        self.tree, self.planned = agent.expand(TreeNode.from_json(head["tree"]), head.get("expand"))
        self.me = self.tree.peer
        self.expected: set[int] = set()  # every blob we asked upstream for
        self.got: set[int] = set()
        self.missing: set[int] = set()  # expected - got, kept incrementally (no O(n) checks)
        self.need_sent = False
        self.bytes_received = 0
        self.refetches: collections.Counter[int] = collections.Counter()
        self.t0 = time.monotonic()
        self.downstream: Downstream | None = None
        self.staging: Staging | None = None

    # -- upstream plumbing --------------------------------------------------------------
    def _send_up(self, ftype: FrameType, payload: bytes = b"") -> None:
        if self.upstream is not None:
            self.upstream.send_frame(ftype, payload)

    def _send_up_json(self, ftype: FrameType, obj: Any) -> None:
        if self.upstream is not None:
            self.upstream.send_json(ftype, obj)

    def reattach(self, conn: Conn) -> None:
        """An ancestor adopted us: drop the old parent, tell the new one what is missing."""
        old, self.upstream = self.upstream, conn
        if old is not None:
            old.send_json(FrameType.ERROR, {"code": ErrorCode.REPARENTED, "message": ""})
            old.close()
        if self.need_sent:
            conn.send_frame(FrameType.NEED, self._need_bitmap(self.missing))
        self.reattached.set()

    async def _wait_upstream(self) -> Conn:
        while self.upstream is None:
            self.reattached.clear()
            try:
                await asyncio.wait_for(self.reattached.wait(), self.resume_timeout)
            except TimeoutError:
                raise PeerLost(self.me, "upstream lost and no ancestor re-attached") from None
        return self.upstream

    def _need_bitmap(self, indices: set[int]) -> bytes:
        return bitmap_from_indices(indices, self.head["blobs"])

    def _need_more(self, indices: set[int]) -> None:
        new = indices - self.expected - self.got
        if new:
            self.expected |= new
            self.missing |= new
            if self.need_sent:
                self._send_up(FrameType.NEED, self._need_bitmap(new))

    def _poke_receiver(self) -> None:
        """A child finished attaching: wake the receive loop to re-check its exit condition."""
        if self.upstream is not None:
            self.upstream.poke()

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.agent.stall_timeout / 4)
            self._send_up(FrameType.HEARTBEAT)

    # -- the push -----------------------------------------------------------------------
    async def run(self) -> list[NodeResult]:
        try:
            return await self._run()
        finally:
            if self.staging is not None:  # descriptors kept for serving children from disk
                self.staging.close_readers()
            # Housekeeping (spare clone, pruning) waits until the subtree is done, so it does
            # not compete with nodes of this push that share the host.
            self.agent.store.settle()

    async def _run(self) -> list[NodeResult]:
        heartbeat = asyncio.create_task(self._heartbeat())
        try:
            own = await self._run_own()
        except (SyncError, OSError, TimeoutError) as exc:
            own = failed_result(self.me, str(exc) or type(exc).__name__)
        finally:
            heartbeat.cancel()
        if not own["ok"]:
            # Tell the parent and hang up: it re-attaches our children to itself.
            if self.downstream is not None:
                self.downstream.abort()
            if self.staging is not None:
                self.staging.close_files()
                self.agent.store.abort(self.staging.folder)
            msg = {"code": ErrorCode.FAILED, "message": own["error"]}
            self._send_up_json(FrameType.ERROR, msg)
            return [own]
        heartbeat = asyncio.create_task(self._heartbeat())
        try:
            assert self.downstream is not None
            results = [own, *await self.downstream.finish()]
            conn = await _maybe(self._wait_upstream())
            if conn is not None:
                conn.send_json(FrameType.RESULT, results)
                with contextlib.suppress(SyncError, TimeoutError):
                    await conn.drain(self.agent.stall_timeout)
                conn.close()
            return results
        finally:
            heartbeat.cancel()

    def _trace(self, what: str) -> None:
        log.debug("%s push %s: %s at %.1f ms", self.me, self.push_id[:8], what,
                  (time.monotonic() - self.t0) * 1e3)  # fmt: skip

    async def _run_own(self) -> NodeResult:
        store = self.agent.store
        patched = "base" in self.head
        ds = self.downstream = Downstream(
            push_id=self.push_id,
            token=self.agent.token,
            sender=self.me,
            manifest_bytes=None if patched else self.body,
            patch=({k: self.head[k] for k in ("base", "removed")}, self.body) if patched else None,
            root=str(self.head.get("root", "")),
            blob_count=int(self.head["blobs"]),
            stall_timeout=self.agent.stall_timeout,
            on_node_done=lambda r: self._send_up_json(FrameType.NODE_DONE, r),
            on_need_more=self._need_more,
            on_attached=self._poke_receiver,
            recovery=Recovery.from_json(self.head.get("recovery")),  # the client's rule
        )
        for child in self.tree.children:  # children get going while we decode
            ds.attach_soon(child)
        manifest = await self._obtain_manifest(store)
        ds.set_manifest(manifest.encode())
        self._trace("manifest decoded")
        name = f"{self.push_id}-{uuid.uuid4().hex[:8]}"
        staging = self.staging = await asyncio.to_thread(begin_staging, store, manifest, name)
        self._trace("staging ready")
        self.expected |= staging.plan.need
        self.missing = self.expected - self.got
        ds.set_source(staging)
        # Ask for our own blobs at once, so data flows down while the subtree is still
        # connecting; what the children lack beyond that follows as incremental NEEDs.
        self._send_up(FrameType.NEED, self._need_bitmap(self.expected))
        self.need_sent = True
        self._trace(f"NEED sent ({len(self.expected)} blobs)")
        await self._receive(manifest, staging, ds)
        self._trace("all blobs received")
        await asyncio.to_thread(self._commit, store, staging, manifest)
        self._trace("committed")
        result: NodeResult = {
            "peer": self.me,
            "ok": True,
            "error": None,
            "root": manifest.root_hash,
            "bytes": self.bytes_received,
            "seconds": elapsed(self.t0),
        }
        if self.planned is not None:
            result["planned"] = self.planned
        self._send_up_json(FrameType.NODE_DONE, result)
        return result

    async def _obtain_manifest(self, store: Store) -> Manifest:
        """Decode the pushed manifest, or rebuild it from a patch against a version we hold."""
        head, body = self.head, self.body
        manifest: Manifest | None = None
        if "base" in head:
            base = await asyncio.to_thread(store.load_manifest, str(head["base"]))
            if base is not None:
                removed = [str(p) for p in head["removed"]]
                manifest = await asyncio.to_thread(Manifest.from_patch, base, body, removed)
            else:
                conn = await self._wait_upstream()
                conn.send_frame(FrameType.MANIFEST_WANTED)
                frame = await conn.expect(FrameType.MANIFEST, self.agent.stall_timeout)
                head, body = parse_manifest_frame(frame)
        if manifest is None:
            manifest = await asyncio.to_thread(Manifest.decode, body)
        if manifest.root_hash != head.get("root"):  # blob tags are keyed by the root hash
            raise SyncProtocolError("manifest does not hash to the announced root")
        if len(manifest.blobs) != self.head["blobs"]:
            raise SyncProtocolError("manifest blob count does not match the header")
        return manifest

    def _commit(self, store: Store, staging: Staging, manifest: Manifest) -> None:
        staging.finish()
        # Children that fall behind read our blobs from the committed version from now on.
        staging.final = store.version_dir(manifest.root_hash)
        store.commit(
            staging.folder,
            manifest,
            written=[e.path for e in staging.plan.write],
            base_hash=staging.base_hash,
            encoded=manifest.encode(),
            hold=True,
        )

    async def _receive(self, manifest: Manifest, staging: Staging, ds: Downstream) -> None:
        blobs = manifest.blobs
        need = staging.plan.need
        tags = ds.tags
        assert tags is not None, "set_source() first"
        while self.missing or ds.attaching:  # children may still add needs
            conn = await self._wait_upstream()
            try:
                frame = await conn.recv(self.agent.stall_timeout)
            except (PeerLost, TimeoutError):
                if self.upstream is conn:
                    self.upstream = None
                    conn.close()
                continue
            if frame.type is FrameType.BLOBS:
                verified = []
                for index, data, tag in decode_blobs(frame):  # checked one by one, passed on
                    if index in self.got or index >= len(blobs):
                        continue
                    # Size (offsets in the tree come from the table's sizes), digest, and the
                    # tag made where the blob entered the push: a relay can forge none of them.
                    if not tags.verify(index, data, tag):
                        self.refetches[index] += 1
                        if self.refetches[index] > MAX_REFETCH:
                            what = f"blob {index} corrupt or forged {self.refetches[index]}x"
                            raise DigestMismatch(what, blobs[index][0].hex(), "bad size/tag")
                        conn.send_frame(FrameType.REFETCH, struct.pack("!I", index))
                        continue
                    if index in need:
                        staging.write_blob(index, data)
                    self.got.add(index)
                    self.missing.discard(index)
                    self.bytes_received += len(data)
                    verified.append((index, data, tag))
                if verified:
                    ds.offer_many(verified)
            elif frame.type is FrameType.ERROR and self.upstream is conn:
                self.upstream = None
                conn.close()
        staging.close_files()


async def _maybe(awaitable: Any) -> Any:
    try:
        return await awaitable
    except PeerLost:
        return None
