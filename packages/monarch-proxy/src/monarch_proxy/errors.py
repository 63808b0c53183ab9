"""Every error monarch-proxy raises, in one tree.

    ProxyError
    ├── InvalidStateError          a frame was sent in a state that does not allow it (a bug here;
    │                              also an AssertionError)
    ├── ProtocolError              a peer broke the wire protocol (malformed or unexpected frame)
    │   ├── ProtocolVersionError   client and gateway share no protocol version
    │   ├── FrameTooLargeError     a frame is over the negotiated maximum size
    │   ├── SessionLimitError      a session passed one of the gateway's per-session memory caps
    │   └── SessionSupersededError another connection resumed this session; this one is fenced
    ├── TransportError             the connection is gone and could not be resumed
    ├── AuthenticationError        the gateway refused the bearer token
    ├── WorkspaceUnavailableError  job.sync() needs monarch-sync here (also an ImportError)
    ├── CallTimeoutError           a FutureProxy.get(timeout) ran out (also a TimeoutError)
    ├── GatewayError               the gateway could not carry out a request
    │   ├── UnknownHandleError     the request named a mesh handle the session does not hold
    │   ├── ArgumentEncodingError  arguments or results could not be pickled or unpickled
    │   ├── ActorImportError       the gateway could not import an actor class by reference
    │   └── WorkerLostError        a worker process died or became unreachable mid-call
    └── RemoteError                an actor raised, and its exception type is not importable here

Remote exceptions whose type *is* importable are re-raised as that type, with the remote
traceback attached as ``__cause__`` (a :class:`RemoteTraceback`), so ``except ValueError`` works
the same through the proxy as it does in-process.
"""

from __future__ import annotations

from monarch_proxy.protocol.names import ErrorCode


class ProxyError(Exception):
    """Base class of every error raised by monarch-proxy itself."""


class InvalidStateError(ProxyError, AssertionError):
    """This side tried to send a frame its connection state does not allow (raised at once)."""


class ProtocolError(ProxyError):
    """A frame could not be parsed or was not valid in the current state.

    ``code`` is the ERROR frame code the receiving side answers with before it closes.
    """

    code: ErrorCode = ErrorCode.PROTOCOL


class ProtocolVersionError(ProtocolError):
    """The client and gateway have no protocol version in common."""

    code = ErrorCode.VERSION_MISMATCH

    @classmethod
    def between(cls, client: tuple[int, int], gateway: tuple[int, int]) -> ProtocolVersionError:
        return cls(
            f"the client speaks wire protocol {client[0]}..{client[1]} but the gateway speaks "
            f"{gateway[0]}..{gateway[1]}; install matching monarch-proxy and monarch-gateway "
            "versions"
        )


class FrameTooLargeError(ProtocolError):
    """A frame exceeds the maximum frame size agreed at the handshake."""

    def __init__(self, size: int, max_size: int) -> None:
        self.size = size
        self.max_size = max_size
        super().__init__(
            f"frame of {size} bytes is over the {max_size}-byte limit; send smaller arguments or "
            "start the gateway with a larger --max-frame-size"
        )


class SessionLimitError(ProtocolError):
    """A session went over one of the gateway's per-session caps; the gateway closed it.

    ``limit`` names the cap (``unacked_bytes``, ``outbox_bytes``, ``partial_frames``), ``size``
    is what the session reached and ``max_size`` the cap. Other sessions are unaffected.
    """

    CODES = {
        "unacked_bytes": ErrorCode.UNACKED_LIMIT,
        "outbox_bytes": ErrorCode.OUTBOX_LIMIT,
        "partial_frames": ErrorCode.PARTIAL_LIMIT,
        "partial_bytes": ErrorCode.PARTIAL_LIMIT,
    }
    ADVICE = {
        "unacked_bytes": "the client did not acknowledge replies; it must keep reading",
        "outbox_bytes": "the client did not read what the gateway sent",
        "partial_frames": "too many frames were left half sent in pieces",
        "partial_bytes": "too many bytes of frames were left half sent in pieces",
    }
    FLAGS = {
        "unacked_bytes": "--max-unacked-bytes",
        "outbox_bytes": "--max-outbox-bytes",
        "partial_frames": "--max-partial-frames",
        "partial_bytes": "--max-frame-size (twice it)",
    }

    def __init__(self, limit: str, size: int, max_size: int) -> None:
        self.limit = limit
        self.size = size
        self.max_size = max_size
        self.code = self.CODES.get(limit, ErrorCode.PROTOCOL)
        super().__init__(
            f"session closed: {limit} reached {size}, over the gateway's cap of {max_size} "
            f"({self.ADVICE.get(limit, 'a per-session limit')}); the gateway's "
            f"{self.FLAGS.get(limit, 'limit flags')} sets the cap"
        )


class SessionSupersededError(ProtocolError):
    """Another connection presented this session's id and took it over; this one is closed."""

    code = ErrorCode.SUPERSEDED


class TransportError(ProxyError):
    """The connection to the gateway was lost and could not be resumed."""


class AuthenticationError(ProxyError):
    """The gateway rejected (or was not given) the bearer token."""


class WorkspaceUnavailableError(ProxyError, ImportError):
    """``job.sync()`` found no workspace: monarch-sync is not installed in this environment."""


class CallTimeoutError(ProxyError, TimeoutError):
    """Waiting for a result took longer than the caller's timeout."""


class GatewayError(ProxyError):
    """The gateway could not carry out a request; the session stays usable."""


class UnknownHandleError(GatewayError):
    """A request named a mesh handle that this session does not hold (freed or never made)."""


class ArgumentEncodingError(GatewayError, TypeError):
    """Arguments or results could not be pickled or unpickled."""


class ActorImportError(GatewayError, ImportError):
    """The gateway could not import an actor class that was shipped by reference."""


class WorkerLostError(GatewayError):
    """A worker process died or stopped answering while a call needed it."""


class RemoteError(ProxyError):
    """An actor raised an exception whose type cannot be imported in this process."""

    def __init__(self, type_name: str, message: str, remote_traceback: str) -> None:
        self.type_name = type_name
        self.remote_message = message
        self.remote_traceback = remote_traceback
        super().__init__(f"{type_name}: {message}")


class RemoteTraceback(Exception):
    """Carries a remote traceback's text; set as ``__cause__`` of re-raised remote errors."""

    def __init__(self, text: str) -> None:
        self.text = text
        super().__init__(text)

    def __str__(self) -> str:
        return f"\n\nRemote traceback:\n{self.text}"


def error_for_code(code: str, message: str, meta: dict[str, object] | None = None) -> ProtocolError:
    """The error a client raises for an ERROR frame (code, message, meta) the gateway sent."""
    meta = meta or {}
    if code == ErrorCode.VERSION_MISMATCH:
        return ProtocolVersionError(message)
    if code == ErrorCode.SUPERSEDED:
        return SessionSupersededError(message)
    limit, size, max_size = meta.get("limit"), meta.get("size"), meta.get("max_size")
    if isinstance(limit, str) and isinstance(size, int) and isinstance(max_size, int):
        return SessionLimitError(limit, size, max_size)
    return ProtocolError(f"gateway closed the session ({code}): {message}")


# Wire names of the gateway-side failure categories, mapped to the error raised on the client.
FAILURE_CATEGORIES: dict[str, type[ProxyError]] = {
    "protocol": ProtocolError,
    "unknown_handle": UnknownHandleError,
    "bad_arguments": ArgumentEncodingError,
    "actor_import": ActorImportError,
    "worker_lost": WorkerLostError,
    "gateway": GatewayError,
}
