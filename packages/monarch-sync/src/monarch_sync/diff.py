"""Manifest diff, free of I/O.

An agent builds the next version in a hard-link clone of its current one, so the plan says how
to turn the old tree into the new one: what to remove, which folders and symlinks to create,
which files to (re)write and which blobs it must receive because it holds no copy. A file whose
content is unchanged but whose mode changed is rewritten from the local copy, because a
chmod on a hard link would also change the old version.
"""

from __future__ import annotations

from collections.abc import Container
from dataclasses import dataclass, field

from .manifest import Entry, Kind, Manifest

__all__ = ["Plan", "diff"]


@dataclass
class Plan:
    remove: list[Entry] = field(default_factory=list)  # deepest first
    mkdirs: list[str] = field(default_factory=list)  # parents first
    write: list[Entry] = field(default_factory=list)
    links: list[Entry] = field(default_factory=list)
    need: set[int] = field(default_factory=set)  # blob indices of ``new`` to receive

    @property
    def is_noop(self) -> bool:
        return not (self.remove or self.mkdirs or self.write or self.links)


def diff(old: Manifest | None, new: Manifest, available: Container[bytes] = ()) -> Plan:
    """Plan the edit from ``old`` (what the clone holds) to ``new``.

    ``available`` holds the chunk digests the agent can read locally; every other chunk of a
    file to write ends up in ``plan.need``.
    """
    plan = Plan()
    old_by_path = old.by_path if old is not None else {}
    new_by_path = new.by_path
    for path, was in old_by_path.items():
        now = new_by_path.get(path)
        if (
            now is None
            or now.kind is not was.kind
            or (was.kind is Kind.LINK and now.target != was.target)
        ):
            plan.remove.append(was)
        elif was.kind is Kind.FILE and (now.chunks != was.chunks or now.mode != was.mode):
            plan.remove.append(was)  # break the hard link before writing a new inode
    plan.remove.sort(key=lambda e: (-e.path.count("/"), e.path))
    removed = {e.path for e in plan.remove}
    for e in new.entries:  # sorted by path, so parents come before children
        if e.path in old_by_path and e.path not in removed:
            continue
        if e.kind is Kind.DIR:
            plan.mkdirs.append(e.path)
        elif e.kind is Kind.LINK:
            plan.links.append(e)
        else:
            plan.write.append(e)
    index = new.blob_index
    for e in plan.write:
        for digest, _ in e.chunks:
            if digest not in available:
                plan.need.add(index[digest])
    return plan
