"""``/sync``: relay a laptop's monarch-sync stream to the agent beside the gateway. Bytes only.

The gateway does not speak the sync protocol and imports nothing from monarch-sync: it checks
the bearer token at the WebSocket upgrade (as for calls, so a wrong token is refused before a
byte reaches the agent), opens one TCP connection to its root agent and copies binary messages
one way and bytes the other until either side closes. The root agent authenticates the stream
again (challenge/MAC under the same token) and fans the push out to the worker hosts' agents,
whose addresses it reads from the members file this module keeps (:func:`write_members`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from pathlib import Path

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

__all__ = ["SYNC_PATH", "relay_sync", "split_address", "write_members"]

logger = logging.getLogger("monarch_gateway")

SYNC_PATH = "/sync"
READ_SIZE = 1 << 20  # one WebSocket message per read: under every client's limit


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {address!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def write_members(path: str | Path, members: list[str]) -> None:
    """Tell the root agent which worker agents a push fans out to (tmp + rename: atomic)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"members": members}))
    tmp.replace(path)


async def relay_sync(ws: ServerConnection, agent: str) -> None:
    """Copy bytes between ``ws`` and a new TCP connection to ``agent`` until one side ends."""
    host, port = split_address(agent)
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError as exc:
        logger.warning("sync agent unreachable", extra={"agent": agent, "error": str(exc)})
        with contextlib.suppress(ConnectionClosed):
            await ws.close(1011, "the gateway's sync agent is unreachable")
        return

    async def up() -> None:
        async for message in ws:
            if isinstance(message, str):
                return
            writer.write(message)
            await writer.drain()

    async def down() -> None:
        while data := await reader.read(READ_SIZE):
            await ws.send(data)

    tasks = [asyncio.create_task(up()), asyncio.create_task(down())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        with contextlib.suppress(ConnectionClosed):
            await ws.close()
