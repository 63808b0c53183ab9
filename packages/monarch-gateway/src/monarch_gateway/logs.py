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
    for name in ("monarch_gateway", "monarch_proxy"):
        log = logging.getLogger(name)
        log.handlers[:] = [handler]
        log.setLevel(level.upper())
        log.propagate = False
