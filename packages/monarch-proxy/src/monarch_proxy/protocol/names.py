"""Every name the wire protocol spells out, in one place: request ops, error codes, close codes.

Both sides import these (the proxy's meshes and connection, the gateway's dispatch), so an op
or code can no longer be spelled one way by the client and another by the gateway. They are
``StrEnum``/``IntEnum`` members, so they serialize to the same JSON and WebSocket values as the
bare strings and numbers of protocol version 1.
"""

from __future__ import annotations

import enum

__all__ = ["CloseCode", "ErrorCode", "Op"]


class Op(enum.StrEnum):
    """The ``op`` of a REQUEST frame."""

    JOB_MESHES = "job.meshes"
    JOB_MEMBERS = "job.members"
    JOB_RELOAD = "job.reload"
    JOB_FLUSH_OUTPUT = "job.flush_output"
    MESH_SLICE = "mesh.slice"
    MESH_STOP = "mesh.stop"
    HOST_SPAWN_PROCS = "host.spawn_procs"
    PROC_SPAWN = "proc.spawn"
    ENDPOINT_CALL = "endpoint.call"


class ErrorCode(enum.StrEnum):
    """The ``code`` of an ERROR frame: why the gateway is closing this connection."""

    PROTOCOL = "protocol"  # a malformed or unexpected frame
    VERSION_MISMATCH = "version_mismatch"  # no protocol version in common
    UNACKED_LIMIT = "unacked_limit"  # replies the client never acknowledged passed the cap
    OUTBOX_LIMIT = "outbox_limit"  # messages the client never read passed the cap
    PARTIAL_LIMIT = "partial_limit"  # too many frames half sent in pieces
    SUPERSEDED = "superseded"  # another connection resumed this session


class CloseCode(enum.IntEnum):
    """WebSocket close codes the gateway uses (RFC 6455 section 7.4.1)."""

    GOING_AWAY = 1001  # the gateway shuts down
    PROTOCOL_ERROR = 1002
    POLICY_VIOLATION = 1008  # a limit, a version mismatch, or a session taken over
    MESSAGE_TOO_BIG = 1009


# The close code that goes with each error code.
CLOSE_CODE_OF: dict[ErrorCode, CloseCode] = {
    ErrorCode.PROTOCOL: CloseCode.PROTOCOL_ERROR,
    ErrorCode.VERSION_MISMATCH: CloseCode.POLICY_VIOLATION,
    ErrorCode.UNACKED_LIMIT: CloseCode.POLICY_VIOLATION,
    ErrorCode.OUTBOX_LIMIT: CloseCode.POLICY_VIOLATION,
    ErrorCode.PARTIAL_LIMIT: CloseCode.POLICY_VIOLATION,
    ErrorCode.SUPERSEDED: CloseCode.POLICY_VIOLATION,
}
