"""Regressions for issue 12's sync findings 1-7, against real agents on loopback.

Each test reproduces the attack as the issue describes it; on the code before the fix each one
fails (the relay's tree committed, /etc/passwd served, a folder outside the root, a deadlock,
heartbeat-only connections kept, a lock held ~40 s, a lying chunk size committed, 0600 widened,
``--token`` accepted).
"""

from __future__ import annotations

import asyncio
import os
import stat
import struct
from pathlib import Path

import pytest
from sync_helpers import TOKEN, running_agents, runs_async

from monarch_sync import cli, protocol
from monarch_sync.agent import Agent
from monarch_sync.client import push
from monarch_sync.downstream import Downstream, manifest_payload
from monarch_sync.frames import (
    ErrorCode,
    Frame,
    FrameType,
    blobs_table,
    decode_json,
    encode_frame,
    encode_json_payload,
)
from monarch_sync.manifest import Entry, Kind, Manifest, chunk_digest
from monarch_sync.protocol import Side, SyncConnection
from monarch_sync.tree import TreeNode


class RawPeer:
    """A connector driven by hand: the real core, so a test can add what a relay would."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.core = SyncConnection(Side.CONNECTOR, TOKEN, nonce=os.urandom(16))

    @classmethod
    async def open(cls, agent: Agent) -> RawPeer:
        host, port = agent.address.rsplit(":", 1)
        return cls(*await asyncio.open_connection(host, int(port)))

    async def next_frame(self, timeout: float = 10.0) -> Frame | None:
        """The next frame from the agent, or None at EOF."""
        while True:
            events = self.core.events_received()
            if events:
                return events[0] if len(events) == 1 else self._keep(events)
            data = await asyncio.wait_for(self.reader.read(65536), timeout)
            if not data:
                return None
            self.core.receive_data(data)

    def _keep(self, events: list[Frame]) -> Frame:
        self.core._events = events[1:] + self.core._events
        return events[0]

    def flush(self) -> None:
        self.writer.write(b"".join(bytes(p) for p in self.core.data_to_send()))

    async def hello(self, push_id: str = "p1") -> None:
        assert (await self.next_frame()) is not None  # CHALLENGE
        self.core.send_hello(push_id, "client")
        self.flush()

    async def start_push(self, agent: Agent, manifest: Manifest) -> Frame | None:
        """HELLO, then ``manifest``; the agent's answer (NEED when it wants the blob)."""
        await self.hello()
        payload = manifest_payload(push_head(manifest, agent.address), manifest.encode())
        self.core.send(FrameType.MANIFEST, payload)
        self.flush()
        return await self.next_frame()

    async def closed(self, timeout: float = 10.0) -> bool:
        try:
            while await asyncio.wait_for(self.reader.read(65536), timeout):
                pass
        except (ConnectionError, TimeoutError):
            return False
        return True


def one_file_manifest(data: bytes, size: int | None = None) -> Manifest:
    n = len(data) if size is None else size
    return Manifest([Entry("f", Kind.FILE, 0o644, n, ((chunk_digest(data), n),))])


def push_head(manifest: Manifest, peer: str, push_id: str = "p1") -> dict[str, object]:
    tree = TreeNode(peer)
    return {"push_id": push_id, "tree": tree.to_json(), "blobs": len(manifest.blobs),
            "root": manifest.root_hash}  # fmt: skip


@runs_async
async def test_finding_1_relay_cannot_hijack_after_handshake(tmp_path: Path) -> None:
    async with running_agents(tmp_path, 1) as (agent,):
        relay = await RawPeer.open(agent)
        await relay.hello()  # the real pusher's answer, forwarded; the pusher is then dropped
        evil = one_file_manifest(b"relay's tree")
        # The relay cannot tag frames: it sends its manifest with whatever tag it likes.
        payload = manifest_payload(push_head(evil, agent.address), evil.encode())
        relay.writer.write(encode_frame(FrameType.MANIFEST, payload))
        assert await relay.closed()
        assert agent.store.current_hash() is None


class TamperingRelay:
    """A TCP relay between a pusher and an agent that forwards every byte, except that it flips
    the last data byte of every BLOBS frame going to the agent (a frame's data are not under
    the frame's MAC: the blob's own tag, in the frame's table, covers them)."""

    def __init__(self, agent: str) -> None:
        self.agent = agent
        self.tampered = 0
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"127.0.0.1:{port}"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host, port = self.agent.rsplit(":", 1)
        up_reader, up_writer = await asyncio.open_connection(host, int(port))
        down = asyncio.create_task(self._pipe(up_reader, writer))
        try:
            while True:
                head = await reader.readexactly(5)
                ftype, size = struct.unpack("!BI", head)
                body = bytearray(await reader.readexactly(size + 16))
                if ftype == FrameType.BLOBS:
                    body[size - 1] ^= 1
                    self.tampered += 1
                up_writer.write(head + body)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            up_writer.close()
            down.cancel()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
        except ConnectionError:
            pass
        finally:
            writer.close()


@runs_async
async def test_finding_1_relay_cannot_change_blob_bytes(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "run.py").write_text("print('pushed')\n")
    async with running_agents(tmp_path / "r", 1) as (agent,):
        relay = TamperingRelay(agent.address)
        async with relay as through:
            report = await push(src, [through], TOKEN, cache_dir=tmp_path / "c")
        assert not report.ok
        assert "corrupt or forged" in str(report.nodes[0].error)
        assert relay.tampered == 4  # the first send and three REFETCHes, each one caught
        assert agent.store.current_hash() is None  # nothing committed
        assert not list((tmp_path / "r").rglob("run.py"))  # nor written anywhere


@runs_async
async def test_finding_2_symlink_chain_cannot_escape_on_disk(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "up").symlink_to("..")  # d/up -> the root: inside
    (src / "x").symlink_to("d/up/..")  # text: "d"; disk: the root's parent
    prev = "x"
    # Each "wN -> w(N-1)/.." is the root as text, one level up on disk: enough to reach "/"
    # from the agent's version folder, few enough for the kernel's 40-link limit.
    for i in range(len(tmp_path.resolve().parts) + 4):
        (src / f"w{i}").symlink_to(f"{prev}/..")
        prev = f"w{i}"
    (src / "final").symlink_to(f"{prev}/etc/passwd")  # text: inside; disk: /etc/passwd
    async with running_agents(tmp_path, 1) as (agent,):
        report = await push(src, [agent.address], TOKEN, cache_dir=tmp_path / "cache")
        assert not report.ok
        assert "outside the tree on disk" in str(report.nodes[0].error)
        assert not (agent.synced_path / "final").exists()


@runs_async
async def test_finding_3_push_id_cannot_name_a_folder_outside(tmp_path: Path) -> None:
    async with running_agents(tmp_path / "r", 1) as (agent,):
        for bad in ["../../evil", "/abs", "a/b", ""]:
            peer = await RawPeer.open(agent)
            await peer.next_frame()  # CHALLENGE
            core = peer.core
            a2c, c2a = protocol._keys(TOKEN, core._peer_nonce, core._nonce)
            body = core._nonce + encode_json_payload({"push_id": bad, "sender": "client"})
            tag = protocol._tag(c2a, 0, FrameType.HELLO, body)
            peer.writer.write(encode_frame(FrameType.HELLO, body, tag))
            core._send_key, core._recv_key, core.state = c2a, a2c, protocol.State.AWAIT_NEED
            err = await peer.next_frame()
            assert err is not None and err.type is FrameType.ERROR
            assert decode_json(err)["code"] == ErrorCode.BAD_PUSH_ID
    assert not (tmp_path / "evil").exists() and not Path("/abs").exists()
    assert not list((tmp_path / "r").glob("**/*evil*"))


@runs_async
async def test_finding_4_opposite_orders_do_not_deadlock(tmp_path: Path) -> None:
    # Agents dial their children a little late, so each root holds its lock by then: the
    # two pushes cross (A holds push a1 and waits for B, B holds push b2 and waits for A).
    dial = Downstream._connect

    async def late(self: Downstream, node: TreeNode, timeout: float | None) -> object:
        if self.sender != "client":
            await asyncio.sleep(0.5)
        return await dial(self, node, timeout)

    Downstream._connect = late  # type: ignore[method-assign]
    try:
        await _cross_pushes(tmp_path)
    finally:
        Downstream._connect = dial  # type: ignore[method-assign]


async def _cross_pushes(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(50):
        (src / f"f{i}.py").write_text(f"x = {i}\n" * 2000)
    async with running_agents(tmp_path / "r", 2, stall_timeout=2.0) as (a, b):
        one = push(src, [a.address, b.address], TOKEN, fanout=1, push_id="a1",
                   cache_dir=tmp_path / "c1", stall_timeout=2.0)  # fmt: skip
        two = push(src, [b.address, a.address], TOKEN, fanout=1, push_id="b2",
                   cache_dir=tmp_path / "c2", stall_timeout=2.0)  # fmt: skip
        first, second = await asyncio.wait_for(asyncio.gather(one, two), 30)
        assert first.ok  # the push that sorts first waits; the other gives way
        assert all(n.ok or "busy" in str(n.error) for n in second.nodes)


@runs_async
async def test_finding_5_unauthenticated_connections_are_bounded(tmp_path: Path) -> None:
    agent = Agent(tmp_path / "r", TOKEN, hello_timeout=1.0, max_unauthenticated=4)
    await agent.start()
    try:
        # Heartbeats before HELLO fail the connection at once (they never extend the deadline).
        peer = await RawPeer.open(agent)
        peer.writer.write(encode_frame(FrameType.HEARTBEAT) * 3)
        assert await peer.closed()
        # A frame announced over the pre-auth cap is refused before it is buffered.
        peer = await RawPeer.open(agent)
        peer.writer.write(struct.pack("!BI", FrameType.HELLO, 64 << 20) + b"x" * 65536)
        assert await peer.closed()
        # A connection that sends nothing is closed at the hello deadline.
        peer = await RawPeer.open(agent)
        assert await peer.closed(timeout=10.0)
        # Past the cap, new unauthenticated connections are closed on accept.
        idle = [await RawPeer.open(agent) for _ in range(4)]
        await asyncio.sleep(0.2)  # let the agent accept them (a condition has no hook here)
        extra = await RawPeer.open(agent)
        assert await extra.closed(timeout=0.9)  # before the 1 s hello deadline of the others
        for p in idle:
            p.writer.close()
    finally:
        await agent.close()


@runs_async
async def test_finding_6_killed_pusher_releases_the_lock_quickly(tmp_path: Path) -> None:
    async with running_agents(tmp_path, 1, stall_timeout=10.0) as (agent,):
        manifest = one_file_manifest(b"never sent")
        peer = await RawPeer.open(agent)
        need = await peer.start_push(agent, manifest)
        assert need is not None and need.type is FrameType.NEED
        assert agent._lock.locked()
        peer.writer.transport.abort()  # the pusher is killed mid-push
        for _ in range(80):  # a few seconds, not the ~40 s of before
            if not agent._lock.locked():
                break
            await asyncio.sleep(0.1)
        assert not agent._lock.locked()


@runs_async
async def test_finding_7_chunk_sizes_modes_and_token(tmp_path: Path) -> None:
    async with running_agents(tmp_path / "r", 1) as (agent,):
        # A manifest whose chunk size does not match the data it hashes.
        manifest = one_file_manifest(b"hello", size=10)
        peer = await RawPeer.open(agent)
        need = await peer.start_push(agent, manifest)
        assert need is not None and need.type is FrameType.NEED
        # The pusher holds the token, so its tag verifies; the size does not.
        tags = protocol.BlobTags(TOKEN, "p1", manifest.root_hash, manifest.blobs)
        peer.core.send(FrameType.BLOBS, blobs_table([(0, 5, tags._tag(0, b"hello"))]), b"hello")
        peer.flush()
        answer = await peer.next_frame()
        assert answer is not None and answer.type is FrameType.REFETCH
        assert agent.store.current_hash() is None
        peer.writer.transport.abort()
        # Modes are kept exactly.
        src = tmp_path / "src"
        src.mkdir()
        (src / "secret").write_text("k")
        (src / "secret").chmod(0o600)
        (src / "tool").write_text("#!/bin/sh\n")
        (src / "tool").chmod(0o750)
        report = await push(src, [agent.address], TOKEN, cache_dir=tmp_path / "c")
        assert report.ok, report.format()
        assert stat.S_IMODE((agent.synced_path / "secret").stat().st_mode) == 0o600
        assert stat.S_IMODE((agent.synced_path / "tool").stat().st_mode) == 0o750
    # The token never travels on a command line.
    with pytest.raises(SystemExit):
        cli._parser().parse_args(["agent", "--root", str(tmp_path), "--token", "t"])
