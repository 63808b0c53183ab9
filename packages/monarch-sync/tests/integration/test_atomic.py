"""Readers during pushes see the old tree or the new one, never a mix."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

from sync_helpers import TOKEN, running_agents, snapshot

from monarch_sync import push


def write_version(root: Path, tag: str) -> None:
    root.mkdir()
    for i in range(150):
        d = root / f"d{i % 10}"
        d.mkdir(exist_ok=True)
        (d / f"f{i}.py").write_text(f"VERSION = {tag!r}  # {i}\n" * (1 + i % 7))
    if tag == "B":
        (root / "only_in_b").mkdir()
        (root / "only_in_b" / "x").write_text("b")
    else:
        (root / "only_in_a.txt").write_text("a")


def test_reader_sees_whole_versions_only(tmp_path: Path) -> None:
    src_a, src_b = tmp_path / "a", tmp_path / "b"
    write_version(src_a, "A")
    write_version(src_b, "B")
    want = [snapshot(src_a), snapshot(src_b)]
    seen: list[int] = []
    stop = threading.Event()
    errors: list[str] = []

    def reader(live: Path) -> None:
        while not stop.is_set():
            resolved = Path(os.path.realpath(live))  # resolve once, then read everything
            snap = snapshot(resolved)
            if snap not in want:
                errors.append(f"mixed tree under {resolved.name}")
                return
            seen.append(want.index(snap))

    async def scenario() -> None:
        async with running_agents(tmp_path, 2) as agents:
            peers = [a.address for a in agents]
            first = await push(src_a, peers, TOKEN, cache_dir=tmp_path / "ca")
            assert first.ok
            t = threading.Thread(target=reader, args=(agents[1].synced_path,))
            t.start()
            try:
                for i in range(8):
                    src = src_b if i % 2 == 0 else src_a
                    report = await push(src, peers, TOKEN, cache_dir=tmp_path / "c")
                    assert report.ok, report.format()
                    await asyncio.sleep(0.01)
            finally:
                stop.set()
                await asyncio.to_thread(t.join)

    asyncio.run(scenario())
    assert not errors, errors
    assert 0 in seen and 1 in seen  # the reader really overlapped both versions
