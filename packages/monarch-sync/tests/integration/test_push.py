"""Real agents on loopback, in this process."""

from __future__ import annotations

import asyncio
import os
import random
from pathlib import Path

import pytest
from sync_helpers import TOKEN, running_agents, snapshot

from monarch_sync import PathEscape, push, scan_tree
from monarch_sync.downstream import Downstream
from monarch_sync.manifest import DIGEST_SIZE, Entry, Kind, Manifest
from monarch_sync.staging import read_at
from monarch_sync.tree import TreeNode


def make_workspace(root: Path, files: int = 40, big: int = 2_000_000) -> None:
    rnd = random.Random(7)
    for i in range(files):
        p = root / f"pkg{i % 4}" / f"mod{i}.py"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(f"X = {i}\n" + "# pad\n" * rnd.randrange(50))
    (root / "pkg0" / "run.sh").write_text("#!/bin/sh\n")
    (root / "pkg0" / "run.sh").chmod(0o755)
    (root / "data.bin").write_bytes(rnd.randbytes(big))
    (root / "empty").mkdir()
    (root / "alias.py").symlink_to("pkg1/mod1.py")
    (root / ".gitignore").write_text("*.log\nbuild/\n")
    (root / "debug.log").write_text("ignored")
    (root / "build").mkdir()
    (root / "build" / "out.o").write_text("ignored")


def expected(src: Path) -> dict[str, tuple[object, ...]]:
    snap = snapshot(src)
    return {k: v for k, v in snap.items() if not (k == "debug.log" or k.startswith("build"))}


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


def test_push_then_edit_sends_only_the_change_once(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    make_workspace(src)

    async def scenario() -> None:
        async with running_agents(tmp_path, 5) as agents:
            peers = [a.address for a in agents]
            full = await push(src, peers[:4], TOKEN, cache_dir=tmp_path / "cache")
            assert full.ok, full.format()
            for a in agents[:4]:
                assert snapshot(a.synced_path) == expected(src)
            # one copy of the tree leaves the client, whatever the node count
            assert full.client_bytes == full.tree_bytes
            (src / "pkg2" / "mod2.py").write_text("X = 'edited'\n")
            (src / "pkg3" / "mod3.py").unlink()  # stale file must disappear
            os.chmod(src / "pkg1" / "mod5.py", 0o755)
            # agents[4] is new: it has no base for the manifest patch and asks for it whole
            edit = await push(src, peers, TOKEN, cache_dir=tmp_path / "cache")
            assert edit.ok, edit.format()
            assert edit.client_bytes == len("X = 'edited'\n")
            assert edit.manifest_bytes < 2000  # a patch, not the whole manifest
            for a in agents:
                snap = snapshot(a.synced_path)
                assert snap == expected(src)
                assert "pkg3/mod3.py" not in snap
            for a in agents[:4]:
                assert a.store.previous_hash() == full.root_hash
            assert {n.root for n in edit.nodes} == {edit.root_hash}

    run(scenario())


def test_bad_token_is_rejected_and_reported(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_text("a")

    async def scenario() -> None:
        async with running_agents(tmp_path, 2) as agents:
            report = await push(src, [a.address for a in agents], "wrong", cache_dir=tmp_path / "c")
            assert not report.ok
            assert all("bad token" in (n.error or "") for n in report.nodes)
            assert all(a.store.current_hash() is None for a in agents)

    run(scenario())


def test_unreachable_peer_is_reported_and_the_rest_finish(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_text("a")

    async def scenario() -> None:
        async with running_agents(tmp_path, 3) as agents:
            dead = "127.0.0.1:1"  # nothing listens there
            peers = [agents[0].address, dead, *(a.address for a in agents[1:])]
            report = await push(src, peers, TOKEN, fanout=1, cache_dir=tmp_path / "c")
            assert [n.peer for n in report.failed] == [dead]
            for a in agents:
                assert snapshot(a.synced_path) == snapshot(src)

    run(scenario())


def test_symlink_leaving_the_tree_is_refused_by_the_scanner(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "out").symlink_to("../../etc/passwd")
    with pytest.raises(PathEscape):
        scan_tree(src)


def test_agent_refuses_a_manifest_that_escapes_its_root(tmp_path: Path) -> None:
    evil = Manifest([Entry("../escaped", Kind.FILE, 0o644, 4, ((b"\x00" * DIGEST_SIZE, 4),))])

    class Source:
        blobs = [(b"\x00" * DIGEST_SIZE, 4)]

        def has(self, index: int) -> bool:
            return True

        def read_blob(self, index: int) -> bytes:
            return b"evil"

    async def scenario() -> None:
        async with running_agents(tmp_path, 1) as (agent,):
            ds = Downstream(
                push_id="evil",
                token=TOKEN,
                sender="test",
                manifest_bytes=evil.encode(),
                blob_count=1,
                root="",
                stall_timeout=5,
            )
            ds.set_source(Source())
            await ds.attach(TreeNode(agent.address))
            results = await ds.finish()
            assert results[0]["ok"] is False
            assert "refusing" in results[0]["error"]
            assert agent.store.current_hash() is None
        assert not (tmp_path / "escaped").exists()

    run(scenario())


def test_corrupted_blob_is_refetched(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    make_workspace(src, files=5, big=300_000)
    sends: dict[int, int] = {}

    def corrupt_first_send(peer: str, index: int, data: bytes) -> bytes:
        sends[index] = sends.get(index, 0) + 1
        if index == 0 and sends[index] == 1:
            return b"\xff" + data[1:] if data else b"x"
        return data

    async def scenario() -> None:
        async with running_agents(tmp_path, 3) as agents:
            report = await push(
                src, [a.address for a in agents], TOKEN, fault=corrupt_first_send,
                cache_dir=tmp_path / "c",
            )  # fmt: skip
            assert report.ok, report.format()
            assert sends[0] == 2  # sent, rejected, sent again
            for a in agents:
                assert snapshot(a.synced_path) == expected(src)

    run(scenario())


def test_blob_reads_follow_the_commit(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"0123456789")
    assert read_at((str(f), 3, 4)) == b"3456"


def test_large_file_edit_resends_only_nearby_chunks(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    data = bytearray(random.Random(9).randbytes(6_000_000))
    (src / "weights.bin").write_bytes(bytes(data))
    (src / ".syncignore").write_text("scratch/\n")
    (src / "scratch").mkdir()
    (src / "scratch" / "tmp").write_text("not synced")

    async def scenario() -> None:
        async with running_agents(tmp_path, 3) as agents:
            peers = [a.address for a in agents]
            assert (await push(src, peers, TOKEN, cache_dir=tmp_path / "c")).ok
            data[3_000_000:3_000_000] = b"a small insertion"
            (src / "weights.bin").write_bytes(bytes(data))
            report = await push(src, peers, TOKEN, cache_dir=tmp_path / "c")
            assert report.ok, report.format()
            assert 0 < report.client_bytes < 600_000
            for a in agents:
                assert (a.synced_path / "weights.bin").read_bytes() == bytes(data)
                assert not (a.synced_path / "scratch").exists()

    run(scenario())


def test_progress_callback_sees_bytes_and_nodes(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"x" * 100_000)
    seen = []

    async def scenario() -> None:
        async with running_agents(tmp_path, 2) as agents:
            await push(src, [a.address for a in agents], TOKEN, progress=seen.append,
                       cache_dir=tmp_path / "c")  # fmt: skip

    run(scenario())
    last = seen[-1]
    assert last.final and last.nodes_done == 2 and last.bytes_sent == last.bytes_total == 100_000
