"""Capture the gateway's stdout and stderr at the file-descriptor level.

Monarch's log forwarding writes worker output to file descriptors 1 and 2 of the process that
holds the meshes (from Rust, so ``sys.stdout`` never sees it). The tee swaps each descriptor for
a pipe, copies everything to the original destination, and hands each chunk to a callback that
streams it to the connected clients.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

Sink = Callable[[str, str], None]  # (stream name, text)


class OutputTee:
    def __init__(self, sink: Sink) -> None:
        self._sink = sink
        self._saved: dict[int, int] = {}
        self._threads: list[threading.Thread] = []

    def original_fd(self, fd: int) -> int:
        """Where output for ``fd`` really goes; for the gateway's own logs."""
        return self._saved.get(fd, fd)

    def start(self) -> None:
        for fd, name in ((1, "stdout"), (2, "stderr")):
            saved = os.dup(fd)
            read_end, write_end = os.pipe()
            os.dup2(write_end, fd)
            os.close(write_end)
            self._saved[fd] = saved
            thread = threading.Thread(
                target=self._pump, args=(read_end, saved, name), name=f"tee-{name}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def _pump(self, read_end: int, destination: int, name: str) -> None:
        while True:
            try:
                chunk = os.read(read_end, 65536)
            except OSError:
                return
            if not chunk:
                return
            os.write(destination, chunk)
            self._sink(name, chunk.decode("utf-8", "replace"))
