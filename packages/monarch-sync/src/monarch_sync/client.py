"""The push side: scan, plan a tree, stream what the tree lacks once, collect reports.

``await push(src, peers, token)`` works inside any asyncio loop; :func:`push_sync` wraps it.
The client is the parent of the root agent and runs the same :class:`Downstream` as agents,
with the workspace as its blob source: it sends a blob only if some node lacks it, and only once.
"""

from __future__ import annotations

import asyncio
import os
import ssl as ssl_module
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import blake3

from .conn import Dial, parse_peer
from .downstream import Downstream, NodeResult
from .exceptions import SyncError
from .frames import Payload
from .manifest import Kind, Manifest
from .progress import Progress
from .recovery import Recovery
from .scan import StatCache, scan_tree
from .staging import Readers
from .tree import choose_fanout, plan_tree, shared_host
from .tunnel import GATEWAY_PEER, dial_gateway

__all__ = ["NodeReport", "PushReport", "default_cache_dir", "push", "push_sync"]


@dataclass(frozen=True)
class NodeReport:
    peer: str
    ok: bool
    root: str | None = None
    error: str | None = None
    bytes: int = 0
    seconds: float = 0.0
    parent: str | None = None  # who fed it in the end ("client" or an agent's address)
    moved_from: str | None = None  # its subtree was taken from under this node...
    moved_reason: str | None = None  # ... because that node was "slow" or "lost"
    reconnects: int = 0  # dropped connections from its parent that were re-established

    def notes(self) -> str:
        out = []
        if self.moved_from:
            out.append(f"moved from {self.moved_from} ({self.moved_reason}), fed by {self.parent}")
        if self.reconnects:
            out.append(f"reconnected {self.reconnects}x")
        return f"  [{'; '.join(out)}]" if out else ""


@dataclass
class PushReport:
    root_hash: str
    nodes: list[NodeReport]
    client_bytes: int  # blob bytes written by the client to its sockets
    manifest_bytes: int  # the manifest, sent once to the root
    needed_bytes: int  # size of the union of what the nodes lacked
    tree_bytes: int
    files: int
    fanout: int
    depth: int
    scan_seconds: float
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(n.ok for n in self.nodes)

    @property
    def failed(self) -> list[NodeReport]:
        return [n for n in self.nodes if not n.ok]

    @property
    def moved(self) -> list[NodeReport]:
        """Nodes re-attached under an ancestor because a node above them was slow or lost."""
        return [n for n in self.nodes if n.moved_from]

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["ok"] = self.ok
        return out

    def format(self) -> str:
        lines = [
            f"root {self.root_hash[:16]}  {self.files} entries, {self.tree_bytes} bytes; "
            f"sent {self.client_bytes} bytes (needed {self.needed_bytes}) to "
            f"{len(self.nodes)} nodes, fan-out {self.fanout}, depth {self.depth}, "
            f"{self.seconds:.3f}s (scan {self.scan_seconds:.3f}s)"
        ]
        for n in sorted(self.nodes, key=lambda n: (n.ok, n.peer)):
            status = "ok    " if n.ok else "FAILED"
            detail = f"{n.bytes} bytes in {n.seconds:.3f}s" if n.ok else n.error
            lines.append(f"  {status} {n.peer}  {detail}{n.notes()}")
        return "\n".join(lines)


class _SourceBlobs:
    """Blobs read straight from the workspace, at their first location in the manifest."""

    def __init__(self, root: Path, manifest: Manifest) -> None:
        self.where: dict[bytes, tuple[str, int, int]] = {}
        base = str(root) + "/"
        for e in manifest.entries:
            off = 0
            for digest, size in e.chunks:
                self.where.setdefault(digest, (base + e.path, off, size))
                off += size
        self.blobs = manifest.blobs
        self.readers = Readers()  # the chunks of a large file are read in a row

    def has(self, index: int) -> bool:
        return True

    def read_blob(self, index: int) -> bytes:
        return self.readers.read(self.where[self.blobs[index][0]])


def default_cache_dir(src: str | Path) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "monarch-sync"
    return base / blake3.blake3(str(Path(src).resolve()).encode()).hexdigest()[:16]


def _last_pushed(cache_dir: Path) -> Manifest | None:
    """The manifest of the last fully successful push from this workspace, if cached."""
    try:
        return Manifest.decode_trusted((cache_dir / "last.manifest").read_bytes())
    except (OSError, SyncError):
        return None


def _estimate_delta(manifest: Manifest, last: Manifest | None) -> int:
    """Bytes new since the last push (all of it if there was none)."""
    if last is None:
        return manifest.total_bytes
    known = {d for d, _ in last.blobs}
    return sum(n for d, n in manifest.blobs if d not in known)


def _collect(peers: Sequence[str], results: list[NodeResult]) -> list[NodeReport]:
    best: dict[str, NodeReport] = {}
    for r in results:
        peer = str(r.get("peer"))
        rep = NodeReport(
            peer, bool(r.get("ok")), r.get("root"), r.get("error"), r.get("bytes", 0),
            r.get("seconds", 0.0), r.get("parent"), r.get("moved_from"), r.get("moved_reason"),
            r.get("reconnects", 0),
        )  # fmt: skip
        if peer not in best or (rep.ok and not best[peer].ok):
            best[peer] = rep
    missing = [
        best.pop(p) if p in best else NodeReport(p, False, error="no report received")
        for p in peers
    ]
    return missing + sorted(best.values(), key=lambda n: n.peer)  # nodes a root agent planned


def _planned(results: list[NodeResult], fanout: int, depth: int) -> tuple[int, int]:
    """Fan-out and depth of the tree, as a root agent that planned it reports them."""
    for r in results:
        if "planned" in r:
            return int(r["planned"]["fanout"]), int(r["planned"]["depth"])
    return fanout, depth


async def push(
    src: str | Path,
    peers: Sequence[str],
    token: str,
    fanout: int | None = None,
    progress: Callable[[Progress], None] | None = None,
    *,
    cache_dir: str | Path | None = None,
    stall_timeout: float = 10.0,
    recovery: Recovery | None = None,
    push_id: str | None = None,
    fault: Callable[[str, int, Payload], Payload] | None = None,
    pace: Callable[[str, int], float] | None = None,
    gateway: str | None = None,
    ssl: ssl_module.SSLContext | None = None,
) -> PushReport:
    """Push ``src`` to every peer (``host:port``); never raises for node failures.

    Inspect ``report.ok`` / ``report.failed`` (and ``report.moved``). ``recovery`` sets when a
    slow node's children are moved and how often a dropped connection is retried, for every
    node of the push (it travels in the push header). ``fault`` and ``pace`` are test hooks:
    ``fault(peer, index, data)`` may alter every blob the client sends, ``pace(peer, nbytes)``
    returns seconds to wait before the client hands ``nbytes`` more to ``peer``.

    ``gateway`` (a ``ws[s]://`` URL): push through that gateway instead of to ``peers``. The
    gateway relays to the agent beside it, which plans the tree over the worker hosts' agents
    (the members the gateway gave it); ``peers`` is ignored and the report lists those agents.
    """
    t0 = time.monotonic()
    src = Path(src)
    peers = list(peers)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir(src)
    stat_cache = StatCache(cache / "stat.json")
    manifest = await asyncio.to_thread(scan_tree, src, cache=stat_cache)
    scan_s = time.monotonic() - t0
    body = manifest.encode()
    last = await asyncio.to_thread(_last_pushed, cache)
    patch: tuple[dict[str, Any], bytes] | None = None
    if last is not None:
        # Agents that hold the last version rebuild the manifest from what changed.
        changed, removed = manifest.patch_from(last)
        if len(changed) < len(body) // 2:
            patch = ({"base": last.root_hash, "removed": removed}, changed)
    delta = _estimate_delta(manifest, last)
    dial: Dial | None = None
    head: dict[str, Any] = {}
    if gateway is not None:  # one child, the root agent: it plans the rest (see tunnel.py)
        peers, dial, k = [GATEWAY_PEER], dial_gateway(gateway, token, ssl=ssl), 1
        head["expand"] = {"delta": delta, "fanout": fanout}
    else:
        hosts = [parse_peer(peer)[0] for peer in peers]
        k = fanout or choose_fanout(len(peers), delta, shared_host=shared_host(hosts))
    tree = plan_tree(peers, k)
    done = failed = 0

    def node_done(r: NodeResult) -> None:
        nonlocal done
        done += 1

    ds = Downstream(
        push_id=push_id or uuid.uuid4().hex,
        token=token,
        sender="client",
        manifest_bytes=body,
        patch=patch,
        root=manifest.root_hash,
        blob_count=len(manifest.blobs),
        stall_timeout=stall_timeout,
        on_node_done=node_done,
        recovery=recovery,
        fault=fault,
        pace=pace,
        blob_sizes=[n for _, n in manifest.blobs],
        dial=dial,
        head=head,
    )
    source = _SourceBlobs(src, manifest)
    ds.set_source(source)
    needed = 0

    def snapshot(final: bool = False) -> Progress:
        return Progress(ds.bytes_sent, ds.bytes_requested, done, failed, len(peers), final)

    ticker: asyncio.Task[None] | None = None
    if progress is not None:

        async def tick() -> None:
            while True:
                progress(snapshot())
                await asyncio.sleep(0.1)

        ticker = asyncio.create_task(tick())
    try:
        await ds.attach(tree)
        results = await ds.finish()
        needed = ds.bytes_requested
    finally:
        if ticker is not None:
            ticker.cancel()
        ds.abort()
        source.readers.close()
    nodes = _collect(peers, results)
    failed = sum(not n.ok for n in nodes)
    done = len(nodes) - failed
    if progress is not None:
        progress(snapshot(final=True))
    k, depth = _planned(results, k, tree.depth())
    await asyncio.to_thread(stat_cache.save)
    if not failed:
        await asyncio.to_thread((cache / "last.manifest").write_bytes, body)
    return PushReport(
        root_hash=manifest.root_hash,
        nodes=nodes,
        client_bytes=ds.bytes_sent,
        manifest_bytes=len(patch[1]) if patch is not None else len(body),
        needed_bytes=needed,
        tree_bytes=manifest.total_bytes,
        files=sum(e.kind is Kind.FILE for e in manifest.entries),
        fanout=k,
        depth=depth,
        scan_seconds=round(scan_s, 4),
        seconds=round(time.monotonic() - t0, 4),
    )


def push_sync(*args: Any, **kwargs: Any) -> PushReport:
    return asyncio.run(push(*args, **kwargs))
