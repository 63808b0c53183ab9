"""Reach the root agent through a gateway: the sync byte stream inside one WebSocket.

A laptop outside a cluster reaches one endpoint, the gateway. Its ``/sync`` path checks the
same bearer token as calls (at the HTTP upgrade, before any byte reaches an agent) and then
relays raw bytes to the monarch-sync agent beside it, which is the root of the push's tree and
plans the fan-out to the worker hosts' agents itself (see ``Agent(members_file=...)``): the
laptop never learns, and never dials, a worker address.

The tunnel is invisible to the protocol: :func:`dial_gateway` returns an ordinary
:class:`~monarch_sync.conn.Conn` over one end of a socketpair, and two pumps copy bytes between
the other end and the WebSocket (binary messages of at most ``MESSAGE_SIZE`` bytes). The agent's
challenge/MAC handshake, reconnects (a dropped tunnel is dialled again and the agent resumes
the push by its id) and every frame work exactly as over TCP.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl as ssl_module
from typing import Any

from .conn import Conn, Dial, wrap_socket
from .exceptions import BadToken, PeerLost

__all__ = ["GATEWAY_PEER", "MESSAGE_SIZE", "SYNC_PATH", "dial_gateway", "sync_url"]

SYNC_PATH = "/sync"
GATEWAY_PEER = "gateway"  # the root agent's name in trees and reports
MESSAGE_SIZE = 1 << 20  # under the gateway's message limit (one 1 MiB piece plus meta)


def sync_url(gateway_url: str) -> str:
    """``ws[s]://host:port[/...]`` -> the gateway's sync endpoint."""
    return gateway_url.rstrip("/") + SYNC_PATH


def dial_gateway(url: str, token: str, *, ssl: ssl_module.SSLContext | None = None) -> Dial:
    """A ``dial`` for :func:`~monarch_sync.conn.connect` that tunnels through ``url``."""

    async def dial(peer: str, timeout: float) -> Conn:
        return await _open(sync_url(url), token, timeout, ssl)

    return dial


async def _open(url: str, token: str, timeout: float, ssl: ssl_module.SSLContext | None) -> Conn:
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidHandshake, InvalidStatus

    tls: dict[str, Any] = {"ssl": ssl} if ssl is not None else {}
    try:
        ws = await asyncio.wait_for(
            connect(
                url,
                additional_headers={"Authorization": f"Bearer {token}"},
                max_size=None,
                compression=None,
                open_timeout=timeout,
                ping_interval=None,  # the sync protocol heartbeats on its own
                **tls,
            ),
            timeout,
        )
    except InvalidStatus as exc:
        status = exc.response.status_code
        if status in (401, 403):
            raise BadToken(f"gateway {url} (HTTP {status}: it refused the token)") from None
        body = exc.response.body.decode(errors="replace").strip() if exc.response.body else ""
        raise PeerLost(url, f"the gateway answered HTTP {status} {body}".rstrip()) from None
    except (OSError, TimeoutError, InvalidHandshake) as exc:
        raise PeerLost(url, f"cannot reach the gateway: {exc or 'timeout'}") from exc
    ours, theirs = socket.socketpair()
    for sock in (ours, theirs):  # room for a whole message: fewer, larger WebSocket frames
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, MESSAGE_SIZE)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, MESSAGE_SIZE)
    theirs.setblocking(False)
    conn = await wrap_socket(ours)
    pumps = [asyncio.create_task(_up(ws, theirs)), asyncio.create_task(_down(ws, theirs))]
    conn.tunnel = pumps  # type: ignore[attr-defined]  # keeps the pumps referenced
    return conn


async def _up(ws: Any, sock: socket.socket) -> None:
    """Bytes the protocol wrote -> WebSocket messages."""
    loop = asyncio.get_running_loop()
    try:
        while data := await loop.sock_recv(sock, MESSAGE_SIZE):
            await ws.send(data)
    except Exception:  # the WebSocket or the socket went away: both ends get closed below
        pass
    finally:
        await ws.close()


async def _down(ws: Any, sock: socket.socket) -> None:
    """WebSocket messages -> bytes for the protocol; the end of either closes the socket."""
    loop = asyncio.get_running_loop()
    try:
        async for message in ws:
            if isinstance(message, str):
                break
            await loop.sock_sendall(sock, message)
    except Exception:
        pass
    finally:
        with contextlib.suppress(OSError):
            sock.close()
