"""Push progress: a bar on a terminal, plain lines otherwise."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import TextIO

__all__ = ["LineProgress", "Progress", "TerminalProgress", "default_progress"]


@dataclass
class Progress:
    bytes_sent: int
    bytes_total: int
    nodes_done: int
    nodes_failed: int
    nodes_total: int
    final: bool = False


def _fmt(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


class TerminalProgress:
    def __init__(self, stream: TextIO = sys.stderr, width: int = 30) -> None:
        self.stream = stream
        self.width = width

    def __call__(self, p: Progress) -> None:
        frac = p.bytes_sent / p.bytes_total if p.bytes_total else 1.0
        filled = int(self.width * min(1.0, frac))
        bar = "#" * filled + "-" * (self.width - filled)
        failed = f", {p.nodes_failed} failed" if p.nodes_failed else ""
        self.stream.write(
            f"\r[{bar}] {_fmt(p.bytes_sent)}/{_fmt(p.bytes_total)}  "
            f"nodes {p.nodes_done}/{p.nodes_total}{failed}\x1b[K"
        )
        if p.final:
            self.stream.write("\n")
        self.stream.flush()


class LineProgress:
    """One line per ``interval`` seconds and a last one at the end, for logs and CI."""

    def __init__(self, stream: TextIO = sys.stderr, interval: float = 1.0) -> None:
        self.stream = stream
        self.interval = interval
        self._last = float("-inf")  # the first update always prints

    def __call__(self, p: Progress) -> None:
        now = time.monotonic()
        if not p.final and now - self._last < self.interval:
            return
        self._last = now
        self.stream.write(
            f"sync: sent {_fmt(p.bytes_sent)} of {_fmt(p.bytes_total)}, "
            f"nodes done {p.nodes_done}/{p.nodes_total}, failed {p.nodes_failed}\n"
        )
        self.stream.flush()


def default_progress(stream: TextIO = sys.stderr) -> TerminalProgress | LineProgress:
    return TerminalProgress(stream) if stream.isatty() else LineProgress(stream)
