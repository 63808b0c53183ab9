"""Structured logs: one JSON object per line, with the fields passed in ``extra=``."""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str = "info", fd: int = 2) -> None:
    """Log JSON lines to ``fd`` (the real stderr even when worker output is being captured)."""
    stream = os.fdopen(os.dup(fd), "w", buffering=1)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    # websockets' own logger too: its tracebacks must reach the real stderr, never the captured
    # descriptors whose output is streamed to clients.
    for name in ("monarch_gateway", "monarch_proxy", "websockets"):
        log = logging.getLogger(name)
        log.handlers[:] = [handler]
        log.setLevel(level.upper())
        log.propagate = False
    # One line per connection at INFO, and anyone can open connections: warnings only, and
    # those rate-limited.
    noisy = logging.getLogger("websockets")
    noisy.setLevel(max(logging.WARNING, logging.getLevelName(level.upper())))
    noisy.filters[:] = [RateLimitFilter()]


class RateLimit:
    """At most ``burst`` log lines per ``window_s``; the rest are counted, not written. Pure:
    the caller passes the clock. An unauthenticated peer must not be able to grow the log."""

    def __init__(self, burst: int = 10, window_s: float = 60.0) -> None:
        self.burst = burst
        self.window_s = window_s
        self._window_start = float("-inf")
        self._count = 0
        self.suppressed = 0  # lines not written in the window that just ended

    def allow(self, now: float) -> tuple[bool, int]:
        """Whether to log now, and how many lines were suppressed since the last one logged."""
        if now - self._window_start >= self.window_s:
            self._window_start, self._count = now, 0
        if self._count >= self.burst:
            self.suppressed += 1
            return False, 0
        self._count += 1
        suppressed, self.suppressed = self.suppressed, 0
        return True, suppressed


class RateLimitFilter(logging.Filter):
    """A :class:`RateLimit` on a logger (websockets logs every failed opening handshake)."""

    def __init__(self, burst: int = 10, window_s: float = 60.0) -> None:
        super().__init__()
        self.limit = RateLimit(burst, window_s)

    def filter(self, record: logging.LogRecord) -> bool:
        allowed, suppressed = self.limit.allow(time.monotonic())
        if allowed and suppressed:
            record.suppressed = suppressed
        return allowed
