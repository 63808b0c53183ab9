"""Monarch's ``Accumulator``: fold the results of every actor of an endpoint into one value."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

from monarch_proxy.futures import FutureProxy

A = TypeVar("A")
R = TypeVar("R")


class Accumulator(Generic[R, A]):
    """``Accumulator(actors.count, 0, lambda acc, x: acc + x).accumulate(args).get()``.

    The results are folded in arrival order, as Monarch folds them, in the thread that asks
    for the value.
    """

    def __init__(self, endpoint: Any, identity: A, combine: Callable[[A, R], A]) -> None:
        self._endpoint = endpoint
        self._identity = identity
        self._combine = combine

    def accumulate(self, *args: Any, **kwargs: Any) -> FutureProxy[A]:
        stream = self._endpoint.stream(*args, **kwargs)

        def fold(_meta: dict[str, Any], _payload: bytes | memoryview) -> A:
            value = self._identity
            for future in stream:
                value = self._combine(value, future.get())
            return value

        assert stream._done is not None
        return FutureProxy(stream._done, fold, f"{stream._description} (accumulated)")
