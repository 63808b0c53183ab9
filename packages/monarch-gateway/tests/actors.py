"""Actor classes importable by name on the workers (tests ship them by reference); the
conformance suite (``conformance/conformance_actors.py``) builds on them too."""

from __future__ import annotations

import os
import sys
import time

from monarch.actor import Actor, current_rank, endpoint


class NotPicklable(Exception):
    """Carries a lock, so it cannot cross a process boundary as itself."""


class Basics(Actor):
    """Endpoints the gateway tests' Worker and the conformance suite's Probe share."""

    @endpoint
    def echo(self, value: object) -> object:
        return value

    @endpoint
    def sleep(self, seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    @endpoint
    def fail(self, message: str) -> None:
        raise ValueError(message)


class Worker(Basics):
    def __init__(self, label: str = "w") -> None:
        self.label = label

    @endpoint
    def whoami(self) -> dict[str, object]:
        return {"label": self.label, "rank": dict(current_rank()), "pid": os.getpid()}

    @endpoint
    def speak(self, text: str) -> None:
        print(f"stdout:{text}", flush=True)
        print(f"stderr:{text}", file=sys.stderr, flush=True)


class BrokenInit(Actor):
    def __init__(self) -> None:
        raise RuntimeError("constructor failed on purpose")

    @endpoint
    def never(self) -> None:
        pass


class Chatter(Actor):
    @endpoint
    def chatter(self, kib: int) -> int:
        """Print ``kib`` lines of 1 KiB: worker output for a client to receive (or not)."""
        line = "c" * 1023
        for _ in range(kib):
            print(line, flush=False)
        sys.stdout.flush()
        return kib

    @endpoint
    def pause(self, seconds: float) -> float:
        time.sleep(seconds)
        return seconds
