"""keep_freed_memory: socket reads stop faulting in fresh pages (the agent's receive pattern)."""

from __future__ import annotations

import subprocess
import sys

import pytest

# Reads 1 MiB at a time from loopback TCP and keeps the last 16 buffers alive, as an agent keeps
# received frames queued for its children; prints the minor page faults of 300 reads.
READS = """
import collections, resource, socket, sys, threading
from monarch_sync.memory import keep_freed_memory
if sys.argv[1] == "tuned":
    assert keep_freed_memory()
server = socket.create_server(("127.0.0.1", 0))
sender = socket.create_connection(server.getsockname())
receiver, _ = server.accept()
threading.Thread(target=sender.sendall, args=(b"x" * (512 << 20),), daemon=True).start()
held = collections.deque(maxlen=16)
def read(n):
    for _ in range(n):
        held.append(receiver.recv(1 << 20))
read(20)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
read(300)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def minor_faults(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", READS, mode], capture_output=True, text=True, check=True, timeout=60
    )
    return int(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="tunes glibc malloc")
def test_reads_reuse_heap_memory_instead_of_fresh_pages() -> None:
    plain, tuned = minor_faults("plain"), minor_faults("tuned")
    assert plain > 5000  # untuned: most reads map fresh pages and fault on each one they fill
    assert tuned < plain / 4
