"""Write actors on a laptop without torchmonarch: ``Actor`` and ``endpoint`` as Monarch spells them.

    from monarch_proxy.actor import Actor, current_rank, endpoint

    class Counter(Actor):            # in __main__ or a notebook: it ships by value
        def __init__(self, start: int) -> None:
            self.n = start

        @endpoint
        def incr(self, by: int = 1) -> int:
            self.n += by
            return self.n

    procs.spawn("counters", Counter, 0).incr.call(2).get()

The gateway turns such a class into a subclass of Monarch's real ``Actor`` with Monarch's real
endpoints (``monarch_gateway.shim``), so it behaves exactly as if it had been written against
``monarch.actor``. Where torchmonarch is installed, Monarch's own classes work as before.
``current_rank``, ``current_size`` and ``context`` are Monarch's when they run in an actor.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, overload

F = TypeVar("F", bound=Callable[..., Any])

__all__ = ["Actor", "Endpoint", "context", "current_rank", "current_size", "endpoint"]


class Actor:
    """Base class of actors written without torchmonarch (Monarch's ``Actor`` on the workers)."""


class Endpoint:
    """A method marked with :func:`endpoint`, and the options Monarch's ``endpoint`` takes."""

    def __init__(self, method: Callable[..., Any], options: dict[str, Any]) -> None:
        self.method = method
        self.options = options

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, instance: object, owner: type | None = None) -> Any:
        # Called on the laptop (e.g. by a test of the class): behave as the plain method.
        return self if instance is None else self.method.__get__(instance, owner)


@overload
def endpoint(method: F, **options: Any) -> Endpoint: ...
@overload
def endpoint(method: None = None, **options: Any) -> Callable[[F], Endpoint]: ...
def endpoint(method: Any = None, **options: Any) -> Any:
    """``@endpoint`` or ``@endpoint(explicit_response_port=True, ...)``, as in Monarch."""
    if method is None:
        return lambda m: Endpoint(m, options)
    return Endpoint(method, options)


def _monarch(name: str) -> Any:
    try:
        import monarch.actor
    except ImportError:
        raise RuntimeError(
            f"{name}() runs inside an actor (on the workers), where torchmonarch is installed"
        ) from None
    return getattr(monarch.actor, name)


def current_rank() -> Any:
    """Monarch's ``current_rank()``: the calling actor's point in the mesh."""
    return _monarch("current_rank")()


def current_size() -> Any:
    """Monarch's ``current_size()``: the size of each dimension of the calling actor's mesh."""
    return _monarch("current_size")()


def context() -> Any:
    """Monarch's ``context()`` of the calling actor."""
    return _monarch("context")()


# The helpers above, replaced by Monarch's own in the code of a mapped class.
HELPERS = {"current_rank": current_rank, "current_size": current_size, "context": context}
