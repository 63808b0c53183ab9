"""Keep freed memory for reuse: large payloads stop paying page faults on every call.

glibc returns big blocks (over its mmap threshold, 128 KiB by default) to the kernel as soon as
they are freed, so every 64 MiB argument or result maps fresh pages and faults on each of them
again: on a VM that costs more than copying the data. Raising the mmap and trim thresholds keeps
those blocks in the heap for the next payload. The price is that the process keeps its peak
memory; servers and workers want that trade, a laptop client may opt in.
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
    """Tune glibc malloc as above; False (and nothing changed) on other C libraries."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, THRESHOLD))
