"""An agent's on-disk versions and the atomic switch between them (I/O).

Layout under the agent root::

    current -> versions/<root hash>     what readers use (see :func:`synced_path`)
    previous -> versions/<root hash>    kept for rollback
    versions/<hash>/                    immutable trees; <hash>.manifest and <hash>.stat beside
    staging/<push id>/                  the version being built
    spare/<hash>/                       a hard-link clone of a version, made ahead of time

A push builds the new tree in a hard-link clone of the current version (prepared in the
background after each commit, so a one-file edit costs one file, not a clone), rewrites only
what changed (new inodes, never writes through a link), then renames it into ``versions/`` and
replaces the ``current`` symlink with ``rename(2)``: a reader that resolves ``current`` sees the
old tree or the new one, whole. Unchanged files are trusted through the ``.stat`` record
written at commit; a file edited in place since then is dropped from the clone and re-fetched.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import uuid
from collections.abc import Callable, Collection
from pathlib import Path

from .manifest import Kind, Manifest

__all__ = ["Store", "synced_path"]


def synced_path(root: str | Path) -> Path:
    """Path of the live tree of an agent rooted at ``root`` (put this on sys.path)."""
    return Path(root) / "current"


def clone_tree(src: Path, dst: Path, manifest: Manifest) -> None:
    dst.mkdir(parents=True)
    link, symlink, mkdir = os.link, os.symlink, os.mkdir
    s, d = str(src) + "/", str(dst) + "/"
    for e in manifest.entries:
        if e.kind is Kind.DIR:
            mkdir(d + e.path)
        elif e.kind is Kind.FILE:
            link(s + e.path, d + e.path)
        else:
            symlink(e.target, d + e.path)


class Store:
    def __init__(self, root: str | Path, *, idle_delay: float = 1.0) -> None:
        self.root = Path(root)
        # Post-commit housekeeping waits this long, so it does not compete with a push still
        # running on other nodes of the same host; the next push runs it at once if needed.
        self.idle_delay = idle_delay
        self.versions = self.root / "versions"
        self.staging = self.root / "staging"
        self.spare = self.root / "spare"
        for p in (self.versions, self.staging, self.spare):
            p.mkdir(parents=True, exist_ok=True)
        for leftover in self.staging.iterdir():  # pushes that died with a previous agent
            shutil.rmtree(leftover, ignore_errors=True)
        self._after: _Deferred | None = None
        # root hash -> (manifest, stat record); versions are immutable, so this never goes stale
        self._known: dict[str, tuple[Manifest, dict[str, list[int]]]] = {}

    # -- reading -------------------------------------------------------------------------
    def _link_target(self, name: str) -> str | None:
        try:
            return Path(os.readlink(self.root / name)).name
        except OSError:
            return None

    def current_hash(self) -> str | None:
        return self._link_target("current")

    def previous_hash(self) -> str | None:
        return self._link_target("previous")

    def version_dir(self, root_hash: str) -> Path:
        return self.versions / root_hash

    def load_manifest(self, root_hash: str) -> Manifest | None:
        known = self._known.get(root_hash)
        if known is not None:
            return known[0]
        try:
            return Manifest.decode((self.versions / f"{root_hash}.manifest").read_bytes())
        except (OSError, ValueError):
            return None

    def _stat_record(self, root_hash: str) -> dict[str, list[int]]:
        known = self._known.get(root_hash)
        if known is not None:
            return known[1]
        try:
            record: dict[str, list[int]] = json.loads(
                (self.versions / f"{root_hash}.stat").read_text()
            )
            return record
        except (OSError, ValueError):
            return {}

    def verified_entries(self, root_hash: str, manifest: Manifest) -> tuple[Manifest, list[str]]:
        """The manifest minus files changed on disk since commit, and the changed paths."""
        record = self._stat_record(root_hash)
        base = str(self.versions / root_hash) + "/"
        keep, tampered = [], []
        for e in manifest.entries:
            if e.kind is Kind.FILE:
                try:
                    st = os.lstat(base + e.path)
                    ok = record.get(e.path) == [st.st_size, st.st_mtime_ns]
                except OSError:
                    ok = False
                if not ok:
                    tampered.append(e.path)
                    continue
            keep.append(e)
        # Untouched (the common case): the same object, whose cached tables serve every push.
        return (Manifest(keep) if tampered else manifest), tampered

    # -- building ------------------------------------------------------------------------
    def begin(self, push_id: str, base_hash: str | None, base: Manifest | None) -> Path:
        """A staging folder holding a hard-link clone of the base version (or empty)."""
        self.wait_spare()
        dst = self.staging / push_id
        if dst.exists():
            shutil.rmtree(dst)
        spare = self.spare / str(base_hash)
        if base_hash is not None and spare.is_dir():
            os.rename(spare, dst)
        elif base_hash is not None and base is not None:
            clone_tree(self.versions / base_hash, dst, base)
        else:
            dst.mkdir(parents=True)
        return dst

    def wait_spare(self) -> None:
        """Block until the background clone of the current version is done."""
        if self._after is not None:
            self._after.run_now()

    def abort(self, staging: Path) -> None:
        shutil.rmtree(staging, ignore_errors=True)

    def commit(
        self,
        staging: Path,
        manifest: Manifest,
        *,
        written: Collection[str] | None = None,
        base_hash: str | None = None,
        encoded: bytes | None = None,
        hold: bool = False,
    ) -> Path:
        """Move the built tree into versions/ and switch ``current`` to it in one rename.

        ``written`` names the files created for this version; the others are hard links into
        ``base_hash`` and keep its stat record. With ``hold`` the housekeeping's idle delay
        starts only at :meth:`settle` (an agent calls it once its whole subtree is done).
        """
        root_hash = manifest.root_hash
        final = self.versions / root_hash
        if final.is_dir():  # the same version again (after a rollback, say)
            shutil.rmtree(staging, ignore_errors=True)
            record = self._stat_record(root_hash)
        else:
            os.rename(staging, final)
            base_record = self._stat_record(base_hash) if base_hash and written is not None else {}
            fresh = set(written or ())
            record = {}
            base = str(final) + "/"
            for e in manifest.entries:
                if e.kind is Kind.FILE:
                    old = None if e.path in fresh else base_record.get(e.path)
                    if old is None:
                        st = os.lstat(base + e.path)
                        old = [st.st_size, st.st_mtime_ns]
                    record[e.path] = old
        self._known[root_hash] = (manifest, record)
        old_hash = self.current_hash()
        if old_hash != root_hash:
            if old_hash is not None:
                self._point("previous", old_hash)
            self._point("current", root_hash)
        keep = {root_hash, old_hash}
        self._known = {h: v for h, v in self._known.items() if h in keep}
        if self._after is not None:
            self._after.run_now()
        self._after = _Deferred(
            self.idle_delay,
            lambda: self._after_commit(root_hash, manifest, record, encoded),
            start=not hold,
        )
        return final

    def settle(self) -> None:
        """Start the idle delay of housekeeping held back by ``commit(hold=True)``."""
        if self._after is not None:
            self._after.start()

    def _after_commit(
        self,
        root_hash: str,
        manifest: Manifest,
        record: dict[str, list[int]],
        encoded: bytes | None,
    ) -> None:
        """Off the critical path: persist metadata, prune, clone a spare for the next push."""
        meta = self.versions / f"{root_hash}.manifest"
        if not meta.exists():
            tmp = meta.with_suffix(".tmp")
            tmp.write_bytes(encoded if encoded is not None else manifest.encode())
            os.replace(tmp, meta)
            (self.versions / f"{root_hash}.stat").write_text(json.dumps(record))
        self._prune()
        self._make_spare(root_hash, manifest)
        # The next push diffs against this version: build its lookup tables now, not then.
        manifest.by_path, manifest.first_locations  # noqa: B018

    def rollback(self) -> str:
        """Swap ``current`` and ``previous``; returns the root hash now live."""
        cur, prev = self.current_hash(), self.previous_hash()
        if prev is None or not (self.versions / prev).is_dir():
            raise FileNotFoundError("no previous version to roll back to")
        self._point("current", prev)
        if cur is not None:
            self._point("previous", cur)
        return prev

    def _point(self, name: str, root_hash: str) -> None:
        tmp = self.root / f".{name}.{uuid.uuid4().hex}"
        os.symlink(f"versions/{root_hash}", tmp)
        os.replace(tmp, self.root / name)

    def _prune(self) -> None:
        keep = {self.current_hash(), self.previous_hash()}
        for p in self.versions.iterdir():
            if p.name.split(".")[0] not in keep:
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)

    def _make_spare(self, root_hash: str, manifest: Manifest) -> None:
        for p in self.spare.iterdir():
            shutil.rmtree(p, ignore_errors=True)
        tmp = self.spare / f".{root_hash}.tmp"
        try:
            clone_tree(self.versions / root_hash, tmp, manifest)
            os.rename(tmp, self.spare / root_hash)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)


class _Deferred:
    """Run ``fn`` once, after ``delay`` seconds on a thread, or earlier via :meth:`run_now`."""

    def __init__(self, delay: float, fn: Callable[[], None], *, start: bool = True) -> None:
        self._fn: Callable[[], None] | None = fn
        self._lock = threading.Lock()
        self._timer = threading.Timer(delay, self.run_now)
        self._timer.daemon = True
        if start:
            self.start()

    def start(self) -> None:
        with self._lock:
            if self._fn is not None and not self._timer.is_alive():
                self._timer.start()

    def run_now(self) -> None:
        with self._lock:  # a second caller waits for the first to finish
            fn, self._fn = self._fn, None
            if fn is not None:
                self._timer.cancel()
                fn()
