"""The table of mesh handles one session holds. Pure: no Monarch, no I/O."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from monarch_gateway.monitor import Worker
from monarch_proxy.errors import UnknownHandleError


@dataclass(slots=True)
class Entry:
    kind: str  # "host", "proc" or "actor"
    obj: Any  # the Monarch mesh
    name: str
    # The workers the mesh spans, so a dead worker fails exactly the calls on it (a replacement
    # at the same index is another Worker: meshes spawned before it still fail).
    hosts: tuple[Worker, ...]
    mesh: str  # name of the host mesh it descends from
    reloader: Any = None  # the HotReloader actors of a proc mesh, spawned on first reload
    whole: bool = False  # a whole host mesh: spawns go to its current workers, replacements too


class HandleTable:
    def __init__(self) -> None:
        self._entries: dict[int, Entry] = {}
        self._next = 1
        # Every proc mesh spawned in the session, freed handle or not: a reload reaches them all.
        self.proc_meshes: list[Entry] = []
        # Monarch's names of the actor meshes spawned in the session -> the client's names: a
        # supervision event names the mesh this way (see Gateway.mesh_failed).
        self.monarch_names: dict[str, str] = {}

    def add(self, entry: Entry) -> int:
        handle = self._next
        self._next += 1
        self._entries[handle] = entry
        return handle

    def get(self, handle: object) -> Entry:
        if not isinstance(handle, int) or isinstance(handle, bool):
            raise UnknownHandleError(f"handle must be an integer, got {handle!r}")
        entry = self._entries.get(handle)
        if entry is None:
            raise UnknownHandleError(
                f"handle {handle} is not held by this session (already freed, or never created)"
            )
        return entry

    def release(self, handles: list[int]) -> None:
        for handle in handles:
            self._entries.pop(handle, None)

    def clear(self) -> None:
        self._entries.clear()
        self.proc_meshes.clear()
        self.monarch_names.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def processes(self) -> int:
        """How many processes the session's live proc meshes hold on the workers."""
        return sum(math.prod(e.obj.extent.sizes) for e in self.proc_meshes)


def select_hosts(
    hosts: tuple[Worker, ...], selection: int | list[int | None] | None
) -> tuple[Worker, ...]:
    """The hosts left after slicing the ``hosts`` dimension with an int or [start, stop, step]."""
    if selection is None or not hosts:  # not hosts: a mesh an actor made, workers unknown
        return hosts
    if isinstance(selection, int):
        return (hosts[selection],)
    return hosts[slice(*selection)]
