"""The laptop side of ``job.sync()``: a workspace that pushes a folder and says what changed.

It satisfies monarch-proxy's ``Workspace`` protocol (``push(src) -> changed paths``) without
importing it: monarch-sync and monarch-proxy are independent leaves, and ``JobState.sync()``
finds this class by name when monarch-sync is installed. Two ways to reach the agents:

* ``SyncWorkspace.through_gateway(url, token)``: one WebSocket to the gateway's ``/sync`` path,
  same URL, TLS and token as calls; the agent beside the gateway fans out (see :mod:`.tunnel`).
  This is what a laptop outside the cluster uses, and what the local default uses.
* ``SyncWorkspace(peers, token)``: dial the agents directly (everything on one network).
"""

from __future__ import annotations

import asyncio
import ssl as ssl_module
from collections.abc import Sequence

from .client import PushReport, push
from .exceptions import PushFailed
from .manifest import Entry
from .scan import StatCache, scan_tree

__all__ = ["SyncWorkspace"]


class SyncWorkspace:
    """Pushes to monarch-sync agents, directly or through a gateway; remembers the last push."""

    def __init__(
        self,
        peers: Sequence[str],
        token: str,
        *,
        fanout: int | None = None,
        gateway: str | None = None,
        ssl: ssl_module.SSLContext | None = None,
    ) -> None:
        self.peers = list(peers)
        self.token = token
        self.fanout = fanout
        self.gateway = gateway
        self.ssl = ssl
        self.last_report: PushReport | None = None
        self._stat_cache = StatCache()
        self._last: dict[str, Entry] | None = None

    @classmethod
    def through_gateway(
        cls, url: str, token: str, *, ssl: ssl_module.SSLContext | None = None
    ) -> SyncWorkspace:
        """Push through the gateway at ``url`` (``ws://`` or ``wss://``) with its token."""
        return cls([], token, gateway=url, ssl=ssl)

    def push(self, src: str) -> list[str]:
        """Push ``src`` to every agent; return the paths that changed since the last push.

        Raises :class:`PushFailed` naming every node that did not switch to the new version.
        """
        current = scan_tree(src, cache=self._stat_cache).by_path
        report = asyncio.run(
            push(src, self.peers, self.token, self.fanout, gateway=self.gateway, ssl=self.ssl)
        )
        self.last_report = report
        if not report.ok:
            raise PushFailed([f"{n.peer}: {n.error}" for n in report.failed])
        last, self._last = self._last, current
        if last is None:
            return sorted(current)
        changed = {p for p, e in current.items() if p not in last or not e.same_content(last[p])}
        return sorted(changed | (last.keys() - current.keys()))
