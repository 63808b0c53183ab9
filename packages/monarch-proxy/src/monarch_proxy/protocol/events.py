"""Events the sans-I/O sessions hand to their adapters. Small frozen values; dispatch on type."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


# Client-side events.
@dataclass(frozen=True, slots=True)
class Welcomed:
    version: int
    session_id: str
    resumed: bool
    max_frame_size: int
    replay: list[bytes] = field(default_factory=list)  # requests to send again after a resume
    lost: list[int] = field(default_factory=list)  # requests the gateway lost with the session


@dataclass(frozen=True, slots=True)
class Replied:
    id: int
    meta: dict[str, Any]
    payload: bytes | memoryview


@dataclass(frozen=True, slots=True)
class Failed:
    id: int
    meta: dict[str, Any]
    payload: bytes | memoryview


@dataclass(frozen=True, slots=True)
class Streamed:
    id: int
    meta: dict[str, Any]
    payload: bytes | memoryview


@dataclass(frozen=True, slots=True)
class Logged:
    stream: str
    text: str


@dataclass(frozen=True, slots=True)
class MembershipChanged:
    """A worker was lost or replaced; ``state`` is how every mesh stands now."""

    state: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Rejected:
    """The gateway refused the connection or the session (version, expired session, bad frame)."""

    code: str
    message: str
    meta: dict[str, Any] = field(default_factory=dict)


# Server-side events.
@dataclass(frozen=True, slots=True)
class Requested:
    id: int
    op: str
    meta: dict[str, Any]
    payload: bytes | memoryview


@dataclass(frozen=True, slots=True)
class Released:
    handles: list[int]


@dataclass(frozen=True, slots=True)
class Departed:
    """The client ended its session on purpose (BYE): free everything now."""


@dataclass(frozen=True, slots=True)
class Hello:
    """A client opened a connection: a new session, or a resume of ``session_id``."""

    version: int
    session_id: str | None
    last_seq: int
    # The client asked that its proc meshes outlive the session (else the gateway stops them
    # when the session ends for good).
    keep_procs: bool = False


@dataclass(frozen=True, slots=True)
class Faulted:
    """A mesh of this session failed with nobody waiting on a call to hear it (``mesh``: the
    name the client gave it; ``report``: Monarch's); the client runs its fault hook."""

    mesh: str
    report: str


# Both sides.
@dataclass(frozen=True, slots=True)
class ConnectionFailed:
    """The peer broke the protocol or a cap: send ``message`` (an ERROR frame, or nothing),
    then close the connection with ``close_code``. The core is CLOSED and ignores later bytes."""

    error: Exception
    message: bytes | None
    close_code: int
