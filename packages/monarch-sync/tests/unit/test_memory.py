"""keep_freed_memory: socket reads stop faulting in fresh pages (the agent's receive pattern)."""

from __future__ import annotations

import subprocess
import sys

import pytest

# Reads 1 MiB at a time (whole: MSG_WAITALL) from loopback TCP and keeps the last 16 buffers alive, as an agent keeps
# received frames queued for its children; prints the minor page faults of 300 reads and the
# bytes they received.
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
    received = 0
    for _ in range(n):
        held.append(receiver.recv(1 << 20, socket.MSG_WAITALL))
        received += len(held[-1])
    return received
read(20)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
received = read(300)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, received)
"""


def faults_per_mib(mode: str) -> float:
    out = subprocess.run(
        [sys.executable, "-c", READS, mode], capture_output=True, text=True, check=True, timeout=60
    )
    faults, received = (int(x) for x in out.stdout.split())
    return faults / (received / (1 << 20))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="tunes glibc malloc")
def test_reads_reuse_heap_memory_instead_of_fresh_pages() -> None:
    plain, tuned = faults_per_mib("plain"), faults_per_mib("tuned")
    # Untuned, reads keep mapping fresh pages (about 12 faults per MiB measured, idle or
    # loaded); tuned, they land in memory the heap already holds (0 measured).
    assert plain > 5
    assert tuned < plain / 3
