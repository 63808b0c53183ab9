"""A few thousand hostile frames against a running agent process, while a well-behaved pusher
keeps pushing to it: every push succeeds and the agent's resident memory stays bounded."""

from __future__ import annotations

import asyncio
import os
import random
import struct
import subprocess
import sys
from pathlib import Path

from sync_helpers import TOKEN

from monarch_sync.client import push
from monarch_sync.frames import FrameType, encode_frame
from monarch_sync.protocol import Side, SyncConnection

FRAMES = 3000
RSS_LIMIT = 200 * 1024 * 1024  # before the fix, 8 connections took an agent to 733 MB


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def hostile(addr: str, rnd: random.Random, budget: list[int]) -> None:
    """One connection's worth of bad frames; decrements ``budget`` per frame sent."""
    host, port = addr.rsplit(":", 1)
    try:
        reader, writer = await asyncio.open_connection(host, int(port))
    except OSError:
        return
    try:
        kind = rnd.randrange(5)
        frames: list[bytes] = []
        if kind == 0:  # heartbeats and noise before HELLO
            frames = [encode_frame(FrameType.HEARTBEAT)] * rnd.randrange(1, 20)
            frames.append(rnd.randbytes(rnd.randrange(1, 200)))
        elif kind == 1:  # a huge announced frame, trickled
            frames = [struct.pack("!BI", FrameType.HELLO, rnd.randrange(1 << 20, 64 << 20))]
            frames += [rnd.randbytes(4096)] * 4
        elif kind == 2:  # a HELLO under the wrong token
            core = SyncConnection(Side.CONNECTOR, "wrong", nonce=rnd.randbytes(16))
            core.receive_data(await asyncio.wait_for(reader.readexactly(37), 5))
            core.send_hello("p", "x")
            frames = [b"".join(bytes(p) for p in core.data_to_send())]
        else:  # authenticated, then garbage of every type (tags valid or not)
            core = SyncConnection(Side.CONNECTOR, TOKEN, nonce=rnd.randbytes(16))
            core.receive_data(await asyncio.wait_for(reader.readexactly(37), 5))
            core.send_hello(f"fuzz{rnd.randrange(1 << 30)}", "fuzzer")
            frames = [b"".join(bytes(p) for p in core.data_to_send())]
            for _ in range(rnd.randrange(1, 30)):
                ftype = rnd.choice(list(FrameType))
                payload = rnd.randbytes(rnd.randrange(0, 300))
                if rnd.random() < 0.7 and ftype is not FrameType.MANIFEST:
                    core._queue(ftype, (payload,))
                    frames.append(b"".join(bytes(p) for p in core.data_to_send()))
                else:
                    frames.append(encode_frame(ftype, payload, rnd.randbytes(16)))
        for frame in frames:
            writer.write(frame)
            budget[0] -= 1
        await asyncio.wait_for(writer.drain(), 5)
        await asyncio.wait_for(reader.read(1 << 16), 5)  # the agent answers or hangs up
    except (OSError, TimeoutError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def _run(tmp_path: Path) -> None:
    env = {**os.environ, "MONARCH_SYNC_TOKEN": TOKEN}
    proc = subprocess.Popen(
        [sys.executable, "-m", "monarch_sync.cli", "agent", "--listen", "127.0.0.1:0",
         "--root", str(tmp_path / "agent"), "--stall-timeout", "5"],
        stdout=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        addr = proc.stdout.readline().split(" on ")[1].split(",")[0]
        src = tmp_path / "src"
        src.mkdir()
        (src / "big.bin").write_bytes(os.urandom(4 << 20))
        budget = [FRAMES]
        peak = 0

        async def fuzz() -> None:
            rnd = random.Random(1212)
            while budget[0] > 0:
                await asyncio.gather(*(hostile(addr, rnd, budget) for _ in range(16)))

        async def good() -> list[bool]:
            oks = []
            i = 0
            while budget[0] > 0 or i < 2:
                (src / "edit.py").write_text(f"v = {i}\n")
                report = await push(src, [addr], TOKEN, cache_dir=tmp_path / "cache")
                oks.append(report.ok)
                i += 1
            return oks

        async def watch() -> None:
            nonlocal peak
            while budget[0] > 0:
                peak = max(peak, rss(proc.pid))
                await asyncio.sleep(0.05)

        _, oks, _ = await asyncio.wait_for(asyncio.gather(fuzz(), good(), watch()), 240)
        print(f"pushes {len(oks)}, peak RSS {peak >> 20} MiB")
        assert all(oks) and len(oks) >= 2, oks
        assert budget[0] <= 0
        assert peak < RSS_LIMIT, f"agent grew to {peak >> 20} MiB"
        assert proc.poll() is None  # still serving
    finally:
        proc.terminate()
        proc.wait()


def test_agent_serves_pushes_through_thousands_of_hostile_frames(tmp_path: Path) -> None:
    asyncio.run(_run(tmp_path))
