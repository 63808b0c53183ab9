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
    │   ├── WorkerLostError        a worker process died or became unreachable mid-call
    │   └── WorkerReattachError    a restarted worker cannot be taken in at its old address
    ├── SupervisionError           an actor or process of the mesh failed (also a RuntimeError,
    │                              like Monarch's, which is final and cannot be subclassed)
    └── RemoteError                an actor raised, and its exception type is not importable here

    ActorError                     an actor's endpoint raised (an Exception, as in Monarch)

An exception an actor's endpoint raises reaches the caller as Monarch raises it, an
``ActorError`` whose ``exception`` is the original, and *also* an instance of the original's type:
the class raised is made once per original type with both as bases
(``ActorError[ValueError]``), so ``except ActorError`` (Monarch code) and ``except ValueError``
(code written against earlier proxies, or in-process) both catch it. Where torchmonarch is
imported in this process, Monarch's own ``monarch.actor.ActorError`` is a base too. Its
``message``, ``exception_formatted`` and ``str()`` read as Monarch's; the remote traceback is
also ``__cause__`` (a :class:`RemoteTraceback`). A type that cannot be combined (a final
extension type) is carried by a plain ``ActorError``. Exceptions raised by Monarch itself while
serving a request (a bad slice label: ``TypeError``; a stopped mesh: ``RuntimeError``) are raised
as their own type, as Monarch raises them to its caller; a type not importable here becomes a
:class:`RemoteError`.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from typing import Any

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


class WorkerReattachError(GatewayError):
    """The gateway will not take in a worker restarted at an address it attached before
    (Monarch cannot attach two processes at one address from one gateway process); the
    message names the address and what to do."""


class RemoteError(ProxyError):
    """An actor raised an exception whose type cannot be imported in this process."""

    def __init__(self, type_name: str, message: str, remote_traceback: str) -> None:
        self.type_name = type_name
        self.remote_message = message
        self.remote_traceback = remote_traceback
        super().__init__(f"{type_name}: {message}")


class SupervisionError(ProxyError, RuntimeError):
    """An actor or process the call needed has failed (Monarch raises its own
    ``SupervisionError``, a ``RuntimeError``). ``endpoint`` names the call, as in Monarch."""

    endpoint: str | None = None


class ActorError(Exception):
    """An actor's endpoint raised ``exception`` (see the module docstring for the classes
    actually raised, which are also instances of ``type(exception)``)."""

    exception: BaseException
    exception_formatted: str
    message: str

    def __init__(
        self, exception: BaseException, message: str = "A remote actor call has failed."
    ) -> None:
        super().__init__(exception, message)
        self.exception = exception
        self.exception_formatted = str(exception)
        self.message = message

    def __str__(self) -> str:
        return f"{self.message}\n {self.exception_formatted}"

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_actor_error, (self.exception, self.message, self.exception_formatted))


def _rebuild_actor_error(exception: BaseException, message: str, formatted: str) -> ActorError:
    return actor_error(exception, message, formatted)


def _monarch_actor_error() -> type | None:
    """Monarch's ActorError, only if torchmonarch is already imported (never import it here)."""
    module = sys.modules.get("monarch._src.actor.actor_mesh")
    found = getattr(module, "ActorError", None)
    return found if isinstance(found, type) else None


@functools.cache
def _actor_error_class(original: type, monarch_error: type | None) -> type:
    bases: tuple[type, ...] = (
        (ActorError,) if monarch_error is None else (ActorError, monarch_error)
    )
    if issubclass(original, bases):
        return original
    try:
        return type(
            "ActorError",
            (*bases, original),
            {"__module__": __name__, "__qualname__": f"ActorError[{original.__qualname__}]"},
        )
    except TypeError:  # a final or layout-incompatible type: ActorError alone carries it
        return type("ActorError", bases, {"__module__": __name__}) if monarch_error else ActorError


def actor_error(
    exception: BaseException,
    message: str,
    formatted: str,
    cause: BaseException | None = None,
) -> ActorError:
    """The exception to raise for an actor's ``exception``: an ActorError that is also an
    instance of ``type(exception)`` (see the module docstring)."""
    cls: type[ActorError] = _actor_error_class(type(exception), _monarch_actor_error())  # type: ignore[arg-type]
    error: ActorError
    try:
        error = cls.__new__(cls, *exception.args)
        if cls is not ActorError:
            with contextlib.suppress(Exception):  # e.g. OSError's errno, parsed in __init__
                type(exception).__init__(error, *exception.args)
        if hasattr(exception, "__dict__"):
            error.__dict__.update(vars(exception))
    except Exception:
        error = ActorError.__new__(ActorError, exception, message)
    error.exception = exception
    error.exception_formatted = formatted
    error.message = message
    if cause is not None:
        error.__cause__ = cause
        exception.__cause__ = cause
    return error


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
    "supervision": SupervisionError,
}
