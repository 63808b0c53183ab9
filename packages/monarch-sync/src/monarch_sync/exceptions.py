"""Errors raised by monarch-sync.

Tree::

    SyncError
    ├── SyncProtocolError        malformed, unauthenticated or unexpected frame (has .code)
    │   └── FrameTooLarge        a frame header announced more than the limit
    ├── InvalidState(AssertionError)  we tried to send a frame the state does not allow
    ├── BadToken                 the agent refused our token (or we refused theirs)
    ├── PathEscape(ValueError)   a manifest path or symlink leaves the synced root
    ├── DigestMismatch           received bytes do not hash to the announced digest
    ├── PeerLost(ConnectionError) a peer died, stalled or closed mid-push
    └── PushFailed               raised by the CLI helper when a node failed
"""

from __future__ import annotations

__all__ = [
    "BadToken",
    "DigestMismatch",
    "FrameTooLarge",
    "InvalidState",
    "PathEscape",
    "PeerLost",
    "PushFailed",
    "SyncError",
    "SyncProtocolError",
]


class SyncError(Exception):
    """Root of every monarch-sync error."""


class SyncProtocolError(SyncError):
    """The peer sent bytes that break the protocol; ``code`` is an ErrorCode value."""

    def __init__(self, message: str, *, code: str = "bad_frame") -> None:
        super().__init__(message)
        self.code = code


class InvalidState(SyncError, AssertionError):
    """Our side tried to send a frame its connection state does not allow (a local bug)."""


class FrameTooLarge(SyncProtocolError):
    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"frame of {size} bytes exceeds the {limit}-byte limit", code="too_large")
        self.size = size
        self.limit = limit


class BadToken(SyncError):
    """Authentication failed: the token does not match the agent's."""

    def __init__(self, peer: str = "") -> None:
        super().__init__(f"bad token for {peer}" if peer else "bad token")
        self.peer = peer


class PathEscape(SyncError, ValueError):
    """A path (or symlink target) would resolve outside the synced root."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"refusing {path!r}: {reason}")
        self.path = path
        self.reason = reason


class DigestMismatch(SyncError):
    def __init__(self, what: str, expected: str, actual: str) -> None:
        super().__init__(f"{what}: expected digest {expected[:16]}…, got {actual[:16]}…")
        self.what = what
        self.expected = expected
        self.actual = actual


class PeerLost(SyncError, ConnectionError):
    def __init__(self, peer: str, reason: str) -> None:
        super().__init__(f"{peer}: {reason}")
        self.peer = peer
        self.reason = reason


class PushFailed(SyncError):
    def __init__(self, failed: list[str]) -> None:
        super().__init__(f"{len(failed)} node(s) failed: {', '.join(failed)}")
        self.failed = failed
