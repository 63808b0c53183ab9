"""Keep freed memory in the heap: received data stops paying page faults on every read.

Each socket read makes a new buffer of up to 1 MiB. glibc serves blocks over its mmap threshold
(128 KiB, raised only to the size of the largest block freed so far) with fresh mappings and
unmaps them on free, so every read faults in and zeroes its pages again: about a fifth of an
agent's CPU in a full push (measured with perf). Raising the mmap and trim thresholds keeps
those blocks for the next read. An agent or a push is a single-purpose process that wants this
trade (it keeps its peak heap); the library leaves the choice to its caller.

monarch-proxy carries the same few lines for its own processes: neither package depends on the
other.
"""

from __future__ import annotations

import ctypes
import sys

__all__ = ["keep_freed_memory"]

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
    """Tune glibc malloc as above; False (and nothing changed) on other C libraries."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, THRESHOLD))
