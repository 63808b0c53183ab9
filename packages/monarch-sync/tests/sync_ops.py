"""Random tree edits for the property tests (shared by unit and integration tests)."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

from hypothesis import strategies as st

from monarch_sync.scan import CDC_THRESHOLD

NAMES = ["a", "b", "c", "d/e", "d/f", "g/h/i"]


def content(seed: int, kind: int) -> bytes:
    rnd = random.Random(seed)
    if kind == 2:  # large: goes through FastCDC
        return rnd.randbytes(CDC_THRESHOLD + rnd.randrange(200_000))
    return rnd.randbytes(rnd.randrange(0, 3000))


op = st.tuples(
    st.sampled_from(["write", "delete", "rename", "chmod", "link", "mkdir", "edit", "dirify"]),
    st.sampled_from(NAMES),
    st.sampled_from(NAMES),
    st.integers(0, 2**16),
    st.integers(0, 2),
)


def apply_op(root: Path, o: tuple[str, str, str, int, int]) -> None:
    try:
        _apply_op(root, o)
    except (FileExistsError, NotADirectoryError, FileNotFoundError):
        pass  # the op does not fit the current tree (say, a file where a folder should be)


def _apply_op(root: Path, o: tuple[str, str, str, int, int]) -> None:
    kind, a, b, seed, size = o
    pa, pb = root / a, root / b
    if kind == "write":
        if pa.is_dir() and not pa.is_symlink():
            return
        pa.parent.mkdir(parents=True, exist_ok=True)
        if pa.is_symlink():
            pa.unlink()
        pa.write_bytes(content(seed, size))
    elif kind == "delete" and (pa.is_file() or pa.is_symlink()):
        pa.unlink()
    elif kind == "delete" and pa.is_dir():
        shutil.rmtree(pa)
    elif (
        kind == "rename"
        and pa.is_file()
        and not pa.is_symlink()
        and not pb.exists()
        and not pb.is_symlink()
    ):
        pb.parent.mkdir(parents=True, exist_ok=True)
        os.rename(pa, pb)
    elif kind == "chmod" and pa.is_file() and not pa.is_symlink():
        pa.chmod(pa.stat().st_mode ^ 0o111)
    elif kind == "link" and not pa.exists() and not pa.is_symlink():
        pa.parent.mkdir(parents=True, exist_ok=True)
        pa.symlink_to(os.path.relpath(root / b, pa.parent))
    elif kind == "mkdir" and not pa.exists() and not pa.is_symlink():
        pa.mkdir(parents=True)
    elif kind == "edit" and pa.is_file() and not pa.is_symlink():
        data = bytearray(pa.read_bytes())
        pos = seed % (len(data) + 1)
        data[pos:pos] = b"edit" * (size + 1)
        pa.write_bytes(bytes(data))
    elif kind == "dirify" and pa.is_file() and not pa.is_symlink():
        pa.unlink()
        pa.mkdir()
        (pa / "inner").write_bytes(content(seed, 0))
