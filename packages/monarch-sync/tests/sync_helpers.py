"""Shared test helpers: tree snapshots independent of the code under test, local apply."""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path

from monarch_sync import Agent, Manifest, Store
from monarch_sync.client import _SourceBlobs
from monarch_sync.diff import Plan
from monarch_sync.staging import begin_staging

TOKEN = "s3cret"


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
