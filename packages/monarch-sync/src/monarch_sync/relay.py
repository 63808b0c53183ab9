"""Which child gets which blob, free of I/O.

Each child announced the blobs its subtree lacks (its NEED). When a blob becomes available here,
:meth:`RelayState.route` names the children that still want it, and forgets it for them, so a
blob is sent to a child at most once unless the child asks again (REFETCH). On re-attach, the
adopted child's NEED is what it still lacks; :meth:`backlog` lists those already available here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

__all__ = ["RelayState"]


class RelayState:
    def __init__(self) -> None:
        self.pending: dict[str, set[int]] = {}

    def add_child(self, peer: str, need: Iterable[int]) -> None:
        self.pending[peer] = set(need)

    def drop_child(self, peer: str) -> set[int]:
        return self.pending.pop(peer, set())

    def route(self, index: int) -> list[str]:
        out = []
        for peer, want in self.pending.items():
            if index in want:
                want.discard(index)
                out.append(peer)
        return out

    def route_many(self, indices: Sequence[int]) -> dict[str, list[int]]:
        """:meth:`route` for a run of blobs: per child, the positions in ``indices`` it wants."""
        out: dict[str, list[int]] = {}
        for peer, want in self.pending.items():
            if want:
                hits = []
                for k, i in enumerate(indices):
                    if i in want:
                        want.discard(i)
                        hits.append(k)
                if hits:
                    out[peer] = hits
        return out

    def backlog(self, peer: str, available: Callable[[int], bool]) -> list[int]:
        want = self.pending[peer]
        ready = sorted(i for i in want if available(i))
        want.difference_update(ready)
        return ready

    def union(self) -> set[int]:
        out: set[int] = set()
        for want in self.pending.values():
            out |= want
        return out
