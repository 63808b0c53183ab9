"""Build a :class:`Manifest` from a folder (this is I/O: it reads and hashes files).

Small files are one chunk; files above ``CDC_THRESHOLD`` are cut by FastCDC (min/avg/max about
16/64/256 KiB) so an edit changes only the chunks around it. A stat cache keyed by path keeps
``(size, mtime_ns, inode)`` with the chunk list, so unchanged files are never re-read. Files
modified in the last two seconds are not cached ("racy git": a write in the same mtime tick
would otherwise go unnoticed).
"""

from __future__ import annotations

import json
import mmap
import os
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pyfastcdc import FastCDC

from .exceptions import PathEscape
from .ignore import IgnoreRules
from .manifest import (
    DIGEST_SIZE,
    MODE_BITS,
    Chunk,
    Entry,
    Kind,
    Manifest,
    chunk_digest,
    validate_link,
)

__all__ = ["CDC_THRESHOLD", "StatCache", "chunk_file", "scan_tree"]

CDC_THRESHOLD = 256 * 1024
CDC_MIN, CDC_AVG, CDC_MAX = 16 * 1024, 48 * 1024, 256 * 1024  # pyfastcdc's mean is avg + min
RACY_WINDOW_NS = 2_000_000_000
HASH_BATCH_BYTES = 4 * 1024 * 1024  # files hashed per thread-pool task: about this many bytes
HASH_BATCH_FILES = 256  # or this many files

StatKey = tuple[int, int, int]  # size, mtime_ns, inode


class StatCache:
    """path -> (stat key, chunks). Persisted as JSON so a CLI push reuses the last scan."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.entries: dict[str, tuple[StatKey, tuple[Chunk, ...]]] = {}
        if path is not None and path.exists():
            try:
                raw = json.loads(path.read_text())
                for rel, (key, chunks) in raw.items():
                    self.entries[rel] = (
                        (key[0], key[1], key[2]),
                        tuple((_digest(d), n) for d, n in chunks),
                    )
            except (ValueError, TypeError, KeyError):
                self.entries = {}  # a corrupt cache only costs a re-hash

    def get(self, rel: str, key: StatKey) -> tuple[Chunk, ...] | None:
        hit = self.entries.get(rel)
        return hit[1] if hit is not None and hit[0] == key else None

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        raw = {rel: [list(k), [[d.hex(), n] for d, n in c]] for rel, (k, c) in self.entries.items()}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(raw, separators=(",", ":")))
        os.replace(tmp, self.path)


def _digest(hex_digest: str) -> bytes:
    digest = bytes.fromhex(hex_digest)
    if len(digest) != DIGEST_SIZE:  # a cache written with another digest: scan again
        raise ValueError("digest size")
    return digest


def chunk_file(path: str | Path, size: int) -> tuple[Chunk, ...]:
    if size == 0:
        return ((chunk_digest(b""), 0),)
    with open(path, "rb") as f:
        if size <= CDC_THRESHOLD:
            data = f.read()
            return ((chunk_digest(data), len(data)),)
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            cdc = FastCDC(CDC_AVG, min_size=CDC_MIN, max_size=CDC_MAX)
            view = memoryview(mm)
            try:
                return tuple(
                    (chunk_digest(view[c.offset : c.offset + c.length]), c.length)
                    for c in cdc.cut_buf(view)
                )
            finally:
                view.release()


def scan_tree(root: str | Path, *, cache: StatCache | None = None) -> Manifest:
    """Walk ``root`` honouring ignore files; raises PathEscape for symlinks leaving the tree."""
    root = Path(root)
    cache = cache if cache is not None else StatCache()
    now = time.time_ns()
    entries: list[Entry] = []
    to_hash: list[tuple[str, int, int, StatKey]] = []
    fresh: dict[str, tuple[StatKey, tuple[Chunk, ...]]] = {}

    def walk(rel: str, rules: IgnoreRules) -> None:
        rules = rules.load_folder(root, rel)
        with os.scandir(root / rel if rel else root) as it:
            items = sorted(it, key=lambda d: d.name)
        for d in items:
            sub = f"{rel}/{d.name}" if rel else d.name
            st = d.stat(follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                if rules.ignored(sub, False):
                    continue
                target = os.readlink(d.path)
                validate_link(sub, target)
                entries.append(Entry(sub, Kind.LINK, target=target))
            elif stat.S_ISDIR(st.st_mode):
                if rules.ignored(sub, True):
                    continue
                entries.append(Entry(sub, Kind.DIR))
                walk(sub, rules)
            elif stat.S_ISREG(st.st_mode):
                if rules.ignored(sub, False):
                    continue
                exe = st.st_mode & MODE_BITS
                key = (st.st_size, st.st_mtime_ns, st.st_ino)
                chunks = cache.get(sub, key)
                if chunks is None:
                    to_hash.append((sub, st.st_size, exe, key))
                else:
                    fresh[sub] = (key, chunks)
                    entries.append(Entry(sub, Kind.FILE, exe, st.st_size, chunks))
            # sockets, fifos and devices are not synced

    if not root.is_dir():
        raise PathEscape(str(root), "source is not a folder")
    walk("", IgnoreRules())
    # Files go to the threads in batches of about HASH_BATCH_BYTES (a large file alone): one
    # task per small file would cost more in scheduling than in hashing.
    batches: list[list[tuple[str, int, int, StatKey]]] = []
    batch_bytes = HASH_BATCH_BYTES
    for item in to_hash:
        if batch_bytes >= HASH_BATCH_BYTES or len(batches[-1]) >= HASH_BATCH_FILES:
            batches.append([])
            batch_bytes = 0
        batches[-1].append(item)
        batch_bytes += item[1]

    def hash_batch(batch: list[tuple[str, int, int, StatKey]]) -> list[tuple[Chunk, ...]]:
        return [chunk_file(root / t[0], t[1]) for t in batch]

    with ThreadPoolExecutor(max_workers=2) as pool:
        hashed = (chunks for done in pool.map(hash_batch, batches) for chunks in done)
        for (sub, size, exe, key), chunks in zip(to_hash, hashed, strict=True):
            if sum(n for _, n in chunks) != size:  # file changed while we read it: no cache
                size = sum(n for _, n in chunks)
            elif now - key[1] > RACY_WINDOW_NS:
                fresh[sub] = (key, chunks)
            entries.append(Entry(sub, Kind.FILE, exe, size, chunks))
    cache.entries = fresh
    return Manifest(entries)
