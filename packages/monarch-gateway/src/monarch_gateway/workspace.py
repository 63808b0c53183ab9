"""``job.sync()`` on monarch-sync: a differential push to an agent on every worker host.

Each worker host runs a monarch-sync agent, and its processes import from the agent's live tree
(``MONARCH_SYNC_ROOT``, put first on ``PYTHONPATH``). A push sends only what changed, through a
pipelined tree of the agents, and each agent switches to the new version in one step.
"""

from __future__ import annotations

from monarch_sync import PushFailed, StatCache, push_sync, scan_tree
from monarch_sync.manifest import Entry


class SyncWorkspace:
    """A :class:`monarch_proxy.Workspace` backed by monarch-sync agents."""

    def __init__(self, peers: list[str], token: str, *, fanout: int | None = None) -> None:
        self.peers = peers
        self.token = token
        self.fanout = fanout
        self._stat_cache = StatCache()
        self._last: dict[str, Entry] | None = None

    def push(self, src: str) -> list[str]:
        """Push ``src`` to every agent; return the paths that changed since the last push."""
        current = scan_tree(src, cache=self._stat_cache).by_path
        report = push_sync(src, self.peers, self.token, fanout=self.fanout)
        if not report.ok:
            raise PushFailed([f"{n.peer}: {n.error}" for n in report.failed])
        last, self._last = self._last, current
        if last is None:
            return sorted(current)
        changed = {p for p, e in current.items() if p not in last or not e.same_content(last[p])}
        return sorted(changed | (last.keys() - current.keys()))
