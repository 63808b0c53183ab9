"""FutureProxy and StreamProxy: results of calls, usable blocking (``get``) or with ``await``."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import queue
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from typing import Any, Generic, TypeVar

from monarch_proxy import codec
from monarch_proxy.connection import Reply
from monarch_proxy.errors import CallTimeoutError

T = TypeVar("T")


class FutureProxy(Generic[T]):
    """The eventual result of a call through the gateway, like Monarch's ``Future``.

    Decoding (unpickling) happens in the thread that asks for the value, never on the
    connection's event loop.
    """

    def __init__(
        self,
        future: concurrent.futures.Future[Reply],
        decode: Callable[[dict[str, Any], bytes | memoryview], T],
        description: str,
    ) -> None:
        self._future = future
        self._decode = decode
        self._description = description

    def get(self, timeout: float | None = None) -> T:
        """Block until the result is in; raise the remote error, or CallTimeoutError."""
        try:
            meta, payload = self._future.result(timeout)
        except concurrent.futures.TimeoutError:
            raise CallTimeoutError(
                f"{self._description} did not finish within {timeout}s (it is still running)"
            ) from None
        return self._decode(meta, payload)

    def result(self, timeout: float | None = None) -> T:
        return self.get(timeout)

    def exception(self, timeout: float | None = None) -> Exception | None:
        """The error the call raised, or ``None`` once it has succeeded (as Monarch's)."""
        try:
            self.get(timeout)
        except Exception as exc:
            return exc
        return None

    def done(self) -> bool:
        return self._future.done()

    def __await__(self) -> Generator[Any, None, T]:
        return self._wait().__await__()

    async def _wait(self) -> T:
        meta, payload = await asyncio.wrap_future(self._future)
        return self._decode(meta, payload)

    def __repr__(self) -> str:
        state = "done" if self.done() else "pending"
        return f"<FutureProxy {self._description} {state}>"


_END = object()


class StreamProxy(Generic[T]):
    """Values from every actor of a mesh, in the order they arrive (``endpoint.stream``).

    Iterating yields completed :class:`FutureProxy` objects, as Monarch's ``stream`` does, so
    ``for f in stream: f.get()`` works the same; ``async for value in stream`` yields values.
    """

    def __init__(self, description: str, load_ref: codec.LoadRef | None = None) -> None:
        self._description = description
        self._queue: queue.Queue[Any] = queue.Queue()
        self._done: concurrent.futures.Future[Reply] | None = None
        self._decode = functools.partial(codec.value_from, load_ref=load_ref)

    def _attach(self, done: concurrent.futures.Future[Reply]) -> None:
        self._done = done
        done.add_done_callback(lambda _: self._queue.put(_END))

    def _on_item(self, meta: dict[str, Any], payload: bytes | memoryview) -> None:
        self._queue.put((meta, bytes(payload)))

    def __iter__(self) -> Iterator[FutureProxy[T]]:
        """One completed future per actor; an actor that failed fails only its own future."""
        while True:
            item = self._queue.get()
            if item is _END:
                assert self._done is not None
                self._done.result()  # raise the stream's failure, if any
                return
            meta, payload = item
            resolved: concurrent.futures.Future[Reply] = concurrent.futures.Future()
            failure = meta.get("failure")
            if isinstance(failure, dict):
                resolved.set_exception(codec.decode_failure(failure, payload))
            else:
                resolved.set_result((meta, payload))
            yield FutureProxy(resolved, self._decode, self._description)

    async def __aiter__(self) -> AsyncIterator[T]:
        iterator = iter(self)
        while True:
            future = await asyncio.to_thread(next, iterator, None)
            if future is None:
                return
            yield future.get()
