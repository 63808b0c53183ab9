"""How Python objects become frame payloads and back: arguments, results, classes, exceptions.

Shared by the client and the gateway so that both ends agree on one encoding:
- call arguments are cloudpickled, so lambdas and classes from ``__main__`` travel by value;
- results use plain pickle (protocol 5) and fall back to cloudpickle only when needed;
- an exception travels as its pickle plus its type name, message and formatted traceback, so the
  client can re-raise the original type, or a :class:`RemoteError` when that type is unknown here.
"""

from __future__ import annotations

import importlib
import pickle
import sys
import traceback
from typing import Any

import cloudpickle

from monarch_proxy.errors import (
    FAILURE_CATEGORIES,
    ArgumentEncodingError,
    ProxyError,
    RemoteError,
    RemoteTraceback,
)
from monarch_proxy.values import Extent, ValueMesh

PROTOCOL = 5


# Exact types plain pickle handles the same everywhere: the common case skips cloudpickle's
# slower pickler (subclasses, which may live in __main__, still go through cloudpickle).
PLAIN_TYPES = frozenset({int, float, str, bytes, bool, type(None)})


def dumps_call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    """Pickle call arguments; name the argument that cannot be pickled."""
    if all(type(a) in PLAIN_TYPES for a in args) and all(
        type(v) in PLAIN_TYPES for v in kwargs.values()
    ):
        return pickle.dumps((args, kwargs), protocol=PROTOCOL)
    try:
        return cloudpickle.dumps((args, kwargs), protocol=PROTOCOL)
    except Exception as exc:
        for where, value in [
            *((f"argument {i}", a) for i, a in enumerate(args)),
            *((f"keyword argument {k!r}", v) for k, v in kwargs.items()),
        ]:
            try:
                cloudpickle.dumps(value, protocol=PROTOCOL)
            except Exception:
                raise ArgumentEncodingError(
                    f"{where} ({type(value).__name__}) cannot be pickled: {exc}"
                ) from exc
        raise ArgumentEncodingError(f"call arguments cannot be pickled: {exc}") from exc


def dumps_value(value: Any) -> bytes:
    """Pickle a result: plain pickle is fastest, cloudpickle handles dynamic classes."""
    try:
        return pickle.dumps(value, protocol=PROTOCOL)
    except Exception:
        return cloudpickle.dumps(value, protocol=PROTOCOL)


def loads(payload: bytes | memoryview, what: str) -> Any:
    try:
        return pickle.loads(payload)
    except Exception as exc:
        raise ArgumentEncodingError(f"{what} could not be unpickled: {exc!r}") from exc


# Actor classes -----------------------------------------------------------------------------


def class_reference(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def ships_by_value(cls: type) -> bool:
    """Classes from ``__main__``, notebooks or function bodies cannot be imported by name."""
    return cls.__module__ == "__main__" or "<locals>" in cls.__qualname__


def dumps_class(cls: type) -> bytes:
    """Pickle a class by value, even one from an importable module that workers lack."""
    module = sys.modules.get(cls.__module__)
    by_reference_normally = module is not None and cls.__module__ != "__main__"
    if by_reference_normally:
        cloudpickle.register_pickle_by_value(module)
    try:
        return cloudpickle.dumps(cls, protocol=PROTOCOL)
    finally:
        if by_reference_normally:
            cloudpickle.unregister_pickle_by_value(module)


def import_reference(reference: str) -> Any:
    module_name, _, qualname = reference.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


# Value meshes ------------------------------------------------------------------------------


def extent_meta(extent: Extent) -> dict[str, list[Any]]:
    return {"labels": list(extent.labels), "sizes": list(extent.sizes)}


def extent_from_meta(meta: dict[str, Any]) -> Extent:
    return Extent(tuple(meta["labels"]), tuple(int(s) for s in meta["sizes"]))


def value_mesh_from(meta: dict[str, Any], payload: bytes | memoryview) -> ValueMesh[Any]:
    return ValueMesh(extent_from_meta(meta["extent"]), loads(payload, "result"))


# Exceptions --------------------------------------------------------------------------------


def encode_exception(
    exc: BaseException, remote_traceback: str | None = None, category: str = "remote"
) -> tuple[dict[str, Any], bytes]:
    """Meta and payload of a FAILURE frame for ``exc``."""
    text = remote_traceback or "".join(traceback.format_exception(exc))
    meta = {
        "category": category,
        "type": f"{type(exc).__module__}.{type(exc).__qualname__}",
        "message": str(exc),
        "traceback": text,
    }
    payload = b""
    if category == "remote":
        try:
            payload = cloudpickle.dumps(exc, protocol=PROTOCOL)
        except Exception:
            payload = b""  # the client falls back to RemoteError with the text above
    return meta, payload


def decode_failure(meta: dict[str, Any], payload: bytes | memoryview) -> BaseException:
    """The exception a FAILURE frame stands for, ready to raise."""
    category = str(meta.get("category", "remote"))
    message = str(meta.get("message", ""))
    remote_tb = str(meta.get("traceback", ""))
    if category != "remote":
        error_type = FAILURE_CATEGORIES.get(category, ProxyError)
        return error_type(message)
    exc: BaseException | None = None
    if payload:
        try:
            exc = pickle.loads(payload)
        except Exception:
            exc = None
    if not isinstance(exc, BaseException):
        return RemoteError(str(meta.get("type", "Exception")), message, remote_tb)
    exc.__cause__ = RemoteTraceback(remote_tb)
    return exc


def current_exception_text() -> str:
    return "".join(traceback.format_exception(*sys.exc_info()))
