"""Capture the gateway's stdout and stderr at the file-descriptor level.

Monarch's log forwarding writes worker output to file descriptors 1 and 2 of the process that
holds the meshes (from Rust, so ``sys.stdout`` never sees it). The tee swaps each descriptor for
a pipe, copies everything to the original destination, and hands each chunk to a callback that
routes it to the session whose actors wrote it (:class:`OutputRouter`).
"""

from __future__ import annotations

import os
import re
import secrets
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


# Worker output reaches the gateway as lines that Monarch prefixes with the process that wrote
# them, "[vm <proc mesh name>-<rank><uid>@<address>] text". The gateway names each proc mesh a
# session spawns "<name>_<tag>", with a tag per session, so a line is routed to the session whose
# actors wrote it; a line that names no session's tag (the gateway's own output, a traceback,
# Monarch's diagnostics) goes to no client at all, only to the gateway's own stdout/stderr.
TAG_PATTERN = re.compile(r"_(o[0-9a-f]{12})-\d+")
MAX_LINE = 64 * 1024  # a longer unfinished line is routed as it is


def new_tag() -> str:
    """A session's output tag: part of its proc meshes' names, hard to guess from another."""
    return "o" + secrets.token_hex(6)


def tag_of(line: str) -> str | None:
    """The session tag in a line's ``[...]`` prefix, if it has one."""
    if not line.startswith("["):
        return None
    end = line.find("]")
    match = TAG_PATTERN.search(line, 0, end if end > 0 else min(len(line), 512))
    return match.group(1) if match else None


class OutputRouter:
    """Splits each stream into lines and says which session tag each line belongs to. Pure."""

    def __init__(self) -> None:
        self._partial: dict[str, str] = {}  # stream -> the unfinished last line

    def feed(self, stream: str, text: str) -> list[tuple[str, str]]:
        """(tag, text) runs of complete lines, in order; lines of no session are dropped."""
        buffered = self._partial.pop(stream, "") + text
        lines = buffered.splitlines(keepends=True)
        if lines and not lines[-1].endswith(("\n", "\r")) and len(lines[-1]) < MAX_LINE:
            self._partial[stream] = lines.pop()
        runs: list[tuple[str, str]] = []
        for line in lines:
            tag = tag_of(line)
            if tag is None:
                continue
            end = line.find("]")  # the client sees its own mesh names, without the tag
            line = line[:end].replace(f"_{tag}", "") + line[end:]
            if runs and runs[-1][0] == tag:
                runs[-1] = (tag, runs[-1][1] + line)
            else:
                runs.append((tag, line))
        return runs
