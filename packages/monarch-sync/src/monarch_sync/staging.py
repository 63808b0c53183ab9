"""Filling a staging tree from received blobs and local copies (I/O).

Each needed blob is written once, at its first location in the new tree; that location is also
where it is read back to serve children that fall behind or get re-attached. :meth:`finish`
fills every other chunk (duplicates, and chunks the agent already held, hashing what it copies),
creates folders, symlinks and file modes (exactly: 0600 stays 0600), and removes what the
manifest no longer lists.

Containment is checked on disk, not only as text: files are opened relative to the staging
folder one component at a time with ``O_NOFOLLOW`` (:func:`open_beneath`), so no write goes
through a symlink, and every symlink created is resolved afterwards and refused if it lands
outside the tree (a chain of links that each look inside can still climb out).
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from .diff import Plan, diff
from .exceptions import DigestMismatch, PathEscape
from .manifest import Entry, Kind, Manifest, chunk_digest
from .store import Store

__all__ = ["LocalChunks", "Readers", "Staging", "begin_staging", "check_links", "open_beneath"]

Location = tuple[str, int, int]  # path, offset, size


class LocalChunks:
    """The chunks of a committed version: ``digest in local``, ``local[digest]`` -> Location.

    A view over the version manifest's cached :attr:`~Manifest.first_locations`: the store keeps
    that manifest between pushes, so nothing is rebuilt per push (an edit used to spend a third
    of an agent's CPU building this table).
    """

    def __init__(self, manifest: Manifest | None = None, folder: Path | None = None) -> None:
        self._table = manifest.first_locations if manifest is not None else {}
        self._base = f"{folder}/"

    def __contains__(self, digest: object) -> bool:
        return digest in self._table

    def __getitem__(self, digest: bytes) -> Location:
        path, off, size = self._table[digest]
        return self._base + path, off, size


_UMASK = os.umask(0)
os.umask(_UMASK)
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def open_beneath(
    root: str, rel: str, flags: int, mode: int = 0o600, *, dirs: dict[str, int] | None = None
) -> int:
    """Open ``root/rel`` without following a symlink anywhere below ``root`` (raises OSError).

    ``dirs``: folder descriptors kept between calls (relative folder -> fd; the caller closes
    them), so the files of one folder cost one open each.
    """
    parent, _, name = rel.rpartition("/")
    own = dirs is None
    cache: dict[str, int] = {} if dirs is None else dirs
    try:
        dfd = cache.get(parent)
        if dfd is None:
            dfd = cache.get("")
            if dfd is None:
                dfd = cache[""] = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            walked = ""
            for part in parent.split("/") if parent else ():
                walked = f"{walked}/{part}" if walked else part
                nfd = cache.get(walked)
                if nfd is None:
                    nfd = cache[walked] = os.open(part, DIR_FLAGS, dir_fd=dfd)
                dfd = nfd
        return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dfd)
    finally:
        if own:
            for fd in cache.values():
                os.close(fd)


def check_links(folder: Path, links: list[Entry]) -> None:
    """Refuse symlinks that resolve outside ``folder`` on disk; raises PathEscape."""
    top = os.path.realpath(folder)
    for e in links:
        real = os.path.realpath(os.path.join(folder, e.path))
        if real != top and not real.startswith(top + "/"):
            raise PathEscape(e.path, f"symlink {e.target!r} resolves outside the tree on disk")


def read_at(loc: Location) -> bytes:
    fd = os.open(loc[0], os.O_RDONLY)
    try:
        return os.pread(fd, loc[2], loc[1])
    finally:
        os.close(fd)


class Readers:
    """Read-only descriptors kept open across reads (chunks of one file are read in a row).

    At most ``limit`` are open at once; :meth:`close` releases them all. A descriptor keeps
    reading its file after a rename of the folder around it (the commit), which is the same
    inode with the same bytes.
    """

    def __init__(self, limit: int = 32) -> None:
        self._fds: dict[str, int] = {}
        self._limit = limit

    def read(self, loc: Location) -> bytes:
        path, off, size = loc
        fd = self._fds.get(path)
        if fd is None:
            fd = os.open(path, os.O_RDONLY)
            if len(self._fds) >= self._limit:
                os.close(self._fds.pop(next(iter(self._fds))))
            self._fds[path] = fd
        return os.pread(fd, size, off)

    def close(self) -> None:
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)


class Staging:
    def __init__(
        self,
        folder: Path,
        manifest: Manifest,
        plan: Plan,
        local: LocalChunks,
        tampered: list[str],
        base_hash: str | None = None,
    ) -> None:
        self.folder = folder
        self.base_hash = base_hash
        self.manifest = manifest
        self.plan = plan
        self.local = local
        self.tampered = tampered
        self.received: set[int] = set()
        self.final: Path | None = None  # where the tree lives once committed
        self.first: dict[int, Location] = {}  # blob index -> its first location in the tree
        self._sizes = {str(folder) + "/" + e.path: e.size for e in plan.write}
        self._fds: dict[str, int] = {}
        self._dirs: dict[str, int] = {}  # folder descriptors for open_beneath
        self._modes = {str(folder) + "/" + e.path: e.mode for e in plan.write}
        self.readers = Readers()  # serving children from disk; close_readers() at the end
        index = manifest.blob_index
        base = str(folder) + "/"
        for e in plan.write:
            off = 0
            for digest, size in e.chunks:
                i = index[digest]
                if i in plan.need and i not in self.first:
                    self.first[i] = (base + e.path, off, size)
                off += size

    def prepare(self, *, empty: bool = False) -> None:
        """Make room: drop changed and removed paths, create the files to fill.

        ``empty``: the folder holds nothing yet (no base to clone), so there is nothing to drop.
        """
        base = str(self.folder) + "/"
        for path in self.tampered:
            _remove(base + path)
        for e in self.plan.remove:
            _remove(base + e.path)
        for d in self.plan.mkdirs:
            os.makedirs(base + d, exist_ok=True)
        if empty:
            return
        for e in self.plan.write:  # files are created by their first write, or in finish()
            _remove(base + e.path)

    def write_blob(self, index: int, data: bytes | memoryview) -> None:
        path, off, size = self.first[index]
        fd = self._fds.get(path)
        if fd is None:
            fd = self._open(path)
            if off == 0 and size == self._sizes.get(path):  # a whole small file: done with it
                os.write(fd, data)
                os.close(fd)
                self.received.add(index)
                return
            if len(self._fds) >= 32:
                os.close(self._fds.pop(next(iter(self._fds))))
            self._fds[path] = fd
        os.pwrite(fd, data, off)
        self.received.add(index)

    def _open(self, path: str) -> int:
        """A file of the tree for writing (``path`` under the folder), never through a link."""
        base = str(self.folder)
        # Created with its mode (writable for us meanwhile); finish() fixes what umask changed.
        mode = self._modes.get(path, 0o600) | 0o200
        try:
            return open_beneath(
                base, path[len(base) + 1 :], os.O_WRONLY | os.O_CREAT, mode, dirs=self._dirs
            )
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise PathEscape(
                    path[len(base) + 1 :], "a folder on its way is a symlink"
                ) from None
            raise

    @property
    def blobs(self) -> list[tuple[bytes, int]]:
        return self.manifest.blobs

    def has(self, index: int) -> bool:
        return index in self.received or self.manifest.blobs[index][0] in self.local

    def read_blob(self, index: int) -> bytes:
        if index not in self.received:
            return self.readers.read(self.local[self.manifest.blobs[index][0]])
        path, off, size = self.first[index]
        try:
            return self.readers.read((path, off, size))
        except FileNotFoundError:
            if self.final is None:
                raise
            moved = str(self.final) + path[len(str(self.folder)) :]
            return read_at((moved, off, size))

    def missing(self) -> set[int]:
        return self.plan.need - self.received

    def finish(self) -> None:
        """Complete every file, verifying copied chunks; raises DigestMismatch."""
        self.close_files()
        index = self.manifest.blob_index
        base = str(self.folder) + "/"
        for e in self.plan.write:
            path = base + e.path
            if self._complete(e.path, e.chunks):
                _fix_mode(path, e.mode)
                continue
            fd = self._open(path)
            try:
                off = 0
                for digest, size in e.chunks:
                    i = index[digest]
                    loc = self.first.get(i)
                    if loc is None or loc[:2] != (path, off):
                        if i in self.received and loc is not None:
                            data = read_at(loc)
                        else:
                            data = read_at(self.local[digest])
                            if chunk_digest(data) != digest:
                                raise DigestMismatch(e.path, digest.hex(), "local copy")
                        os.pwrite(fd, data, off)
                    off += size
            finally:
                os.close(fd)
            _fix_mode(path, e.mode)
        for e in self.plan.links:
            _remove(base + e.path)
            os.symlink(e.target, base + e.path)
        check_links(self.folder, self.plan.links)
        # A clone of a tampered base may hold paths this manifest does not list.
        if self.tampered:
            _sweep(self.folder, self.manifest)

    def _complete(self, path: str, chunks: tuple[tuple[bytes, int], ...]) -> bool:
        """Every chunk of the file was received and written in place (the common case)."""
        full = str(self.folder) + "/" + path
        index = self.manifest.blob_index
        off = 0
        for digest, size in chunks:
            loc = self.first.get(index[digest])
            if loc is None or loc[0] != full or loc[1] != off or index[digest] not in self.received:
                return False
            off += size
        return True

    def close_files(self) -> None:
        for fd in [*self._fds.values(), *self._dirs.values()]:
            os.close(fd)
        self._fds.clear()
        self._dirs.clear()

    def close_readers(self) -> None:
        self.readers.close()


def begin_staging(store: Store, manifest: Manifest, name: str) -> Staging:
    """Clone the current version, diff it against ``manifest`` and make room (blocking)."""
    base_hash = store.current_hash()
    base = store.load_manifest(base_hash) if base_hash else None
    tampered: list[str] = []
    local = LocalChunks()
    folder = store.begin(name, base_hash, base)
    if base is not None and base_hash is not None:
        base, tampered = store.verified_entries(base_hash, base)
        local = LocalChunks(base, store.version_dir(base_hash))
    staging = Staging(folder, manifest, diff(base, manifest, local), local, tampered, base_hash)
    with os.scandir(folder) as it:
        staging.prepare(empty=next(it, None) is None)
    return staging


def _fix_mode(path: str, mode: int) -> None:
    """Give a file we created its exact mode, where umask (or our write bit) changed it."""
    if (mode | 0o200) & ~_UMASK != mode:
        os.chmod(path, mode)  # created beneath the folder by us: no link on the way


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except IsADirectoryError:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass
    except PermissionError:  # EPERM for unlink on a folder on some systems
        shutil.rmtree(path)


def _sweep(folder: Path, manifest: Manifest) -> None:
    listed = manifest.by_path
    for dirpath, dirnames, filenames in os.walk(folder, topdown=True):
        rel = os.path.relpath(dirpath, folder)
        rel = "" if rel == "." else rel + "/"
        for name in list(dirnames):
            e = listed.get(rel + name)
            if e is None or e.kind is not Kind.DIR:
                _remove(os.path.join(dirpath, name))
                dirnames.remove(name)
        for name in filenames:
            if rel + name not in listed:
                _remove(os.path.join(dirpath, name))
