"""Shared test helpers: tree snapshots independent of the code under test, local apply,
coroutine tests."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import stat
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

from monarch_sync import Agent, Manifest, Store
from monarch_sync.client import _SourceBlobs
from monarch_sync.diff import Plan
from monarch_sync.staging import begin_staging

TOKEN = "s3cret"


def runs_async(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """A coroutine test function run by ``asyncio.run`` (pytest sees its fixtures)."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))

    return run


def snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """path -> ("f", bytes, exec) | ("d",) | ("l", target), via plain os calls."""
    root = Path(os.path.realpath(root))
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            key = os.path.normpath(os.path.join(rel, name))
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                out[key] = ("l", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[key] = ("d",)
            else:
                out[key] = ("f", Path(p).read_bytes(), bool(st.st_mode & 0o100))
        dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
    return out


def apply_local(store: Store, src: Path, manifest: Manifest) -> Plan:
    """What an agent does for a push, minus the network: used by the property tests."""
    staging = begin_staging(store, manifest, "local")
    source = _SourceBlobs(src, manifest)
    for i in staging.plan.need:
        staging.write_blob(i, source.read_blob(i))
    staging.close_files()
    staging.finish()
    store.commit(staging.folder, manifest)
    store.wait_spare()
    return staging.plan


@contextlib.asynccontextmanager
async def running_agents(
    tmp: Path, n: int, *, token: str = TOKEN, stall_timeout: float = 5.0
) -> AsyncIterator[list[Agent]]:
    agents = [Agent(tmp / f"agent{i}", token, stall_timeout=stall_timeout) for i in range(n)]
    for a in agents:
        await a.start()
    try:
        yield agents
    finally:
        await asyncio.gather(*(a.close() for a in agents))


class TcpRelay:
    """A TCP forwarder in front of an agent, whose connections a test can cut.

    Peers dial :attr:`address` instead of the agent's. ``cut_after``: once that many bytes went
    towards the agent, every open connection is aborted (both ends see a reset), once; later
    connections pass. :attr:`sent` lists the bytes sent towards the agent per connection.
    """

    def __init__(self, target: str, cut_after: int | None = None) -> None:
        self.target = target
        self.cut_after = cut_after
        self.sent: list[int] = []
        self.cuts = 0
        self._server: asyncio.Server | None = None
        self._open: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> str:
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"{host}:{port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)

    def cut(self) -> None:
        self.cuts += 1
        self._abort_all()

    def _abort_all(self) -> None:
        for a, b in self._open:
            a.transport.abort()
            b.transport.abort()
        self._open.clear()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self._abort_all()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host, port = self.target.rsplit(":", 1)
        up_reader, up_writer = await asyncio.open_connection(host, int(port))
        pair = (writer, up_writer)
        self._open.append(pair)
        n = len(self.sent)
        self.sent.append(0)
        for task in (
            asyncio.create_task(self._pump(reader, up_writer, n)),
            asyncio.create_task(self._pump(up_reader, writer, None)),
        ):
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int | None
    ) -> None:
        try:
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
                if n is not None:
                    self.sent[n] += len(data)
                    due = self.cut_after is not None and sum(self.sent) >= self.cut_after
                    if due and not self.cuts:
                        self.cut()
                        return
            writer.close()
        except (ConnectionError, OSError):
            writer.transport.abort()
