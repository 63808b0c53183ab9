"""How Python objects become frame payloads and back: arguments, results, classes, exceptions.

Shared by the client and the gateway so that both ends agree on one encoding:
- call arguments are cloudpickled, so lambdas and classes from ``__main__`` travel by value;
- results use plain pickle (protocol 5) and fall back to cloudpickle only when needed;
- an exception travels as its pickle plus its type name, message and formatted traceback, so the
  client can re-raise the original type, or a :class:`RemoteError` when that type is unknown here;
  an actor's own exception is raised as Monarch raises it, an :class:`ActorError` (see
  :func:`errors.actor_error`).

Objects that stand for something only one side can hold travel as pickle *persistent ids*
(``("monarch_proxy.mesh", ...)`` tuples), never as themselves: a mesh proxy in call arguments
becomes its handle, which the gateway swaps for the real Monarch mesh; a Monarch mesh in a result
is registered in the session by the gateway and becomes a proxy on the client; a value mesh
travels as its extent and values both ways. A frame whose payload holds any sets ``refs`` in its
meta (the handles, for requests), so the common payload without them is read by plain
``pickle.loads``; the gateway resolves those handles when the request arrives, in frame order.
"""

from __future__ import annotations

import collections
import importlib
import io
import pickle
import sys
import traceback
from collections.abc import Callable
from typing import Any

import cloudpickle

from monarch_proxy.errors import (
    FAILURE_CATEGORIES,
    ArgumentEncodingError,
    ProxyError,
    RemoteError,
    RemoteTraceback,
    actor_error,
)
from monarch_proxy.values import Extent, ValueMesh

PROTOCOL = 5

# Persistent-id tags (the first item of the tuple).
MESH_REF = "monarch_proxy.mesh"  # client->gateway (tag, handle); back (tag, kind, handle, labels,
#                                  sizes, name)
VALUE_MESH_REF = "monarch_proxy.value_mesh"  # (tag, labels, sizes, values), both ways

LoadRef = Callable[[Any], Any]  # persistent id -> object, on the receiving side
SaveRef = Callable[[Any], Any]  # object -> persistent id or None, on the sending side

# Classes whose instances stand for a gateway handle (monarch_proxy.meshes registers MeshProxy):
# they pickle as (MESH_REF, obj.handle).
HANDLE_TYPES: tuple[type, ...] = ()


def register_handle_type(cls: type) -> None:
    global HANDLE_TYPES
    HANDLE_TYPES = (*HANDLE_TYPES, cls)


def load_storage(data: bytes) -> Any:
    """A torch storage saved on the laptop, loaded onto the CPU as Monarch's own client loads
    what it receives (``map_location="cpu"``): a CUDA tensor sent from a laptop with a GPU
    reaches a gateway that has none."""
    import torch

    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)


def _reduce_storage(storage: Any) -> tuple[Any, tuple[bytes]]:
    import torch

    with io.BytesIO() as file:
        torch.save(storage, file, _use_new_zipfile_serialization=False)
        return load_storage, (file.getvalue(),)


def _storage_dispatch() -> dict[type, Any]:
    """Reducers for torch's storage classes, if torch is imported here (never import it)."""
    torch = sys.modules.get("torch")
    storage = getattr(torch, "storage", None)
    if storage is None:
        return {}
    classes: list[type] = [storage.UntypedStorage, storage.TypedStorage]
    for cls in classes:  # grows while it is walked: every subclass, transitively
        subclasses: list[type] = cls.__subclasses__()
        classes.extend(sub for sub in subclasses if sub not in classes)
    return dict.fromkeys(classes, _reduce_storage)


class _CallPickler(cloudpickle.Pickler):
    """cloudpickle, with mesh proxies as their handles, value meshes as extent + values and
    torch storages as Monarch sends them (see :func:`load_storage`)."""

    def __init__(self, file: io.BytesIO) -> None:
        storages = _storage_dispatch()
        if storages:  # read by the pickler's __init__: set it first
            self.dispatch_table = collections.ChainMap(storages, cloudpickle.Pickler.dispatch_table)
        super().__init__(file, protocol=PROTOCOL)
        self.refs: list[int] | None = None

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, HANDLE_TYPES):
            handle = int(getattr(obj, "_handle"))  # noqa: B009 - any registered type
            self.refs = [*(self.refs or []), handle]
            return (MESH_REF, handle)
        if isinstance(obj, ValueMesh):
            self.refs = self.refs or []
            return (
                VALUE_MESH_REF,
                list(obj.extent.labels),
                list(obj.extent.sizes),
                list(obj.values()),
            )
        return None


class _RefPickler(pickle.Pickler):
    """Persistent ids from the hook ``save_ref``; ``used``: whether it made any."""

    def __init__(self, file: io.BytesIO, save_ref: SaveRef) -> None:
        super().__init__(file, protocol=PROTOCOL)
        self._save_ref = save_ref
        self.used = False

    def persistent_id(self, obj: Any) -> Any:
        pid = self._save_ref(obj)
        if pid is not None:
            self.used = True
        return pid


class _RefCloudPickler(_RefPickler, cloudpickle.Pickler):
    """The same through cloudpickle (classes and functions by value)."""


class _RefUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, load_ref: LoadRef) -> None:
        super().__init__(file)
        self._load_ref = load_ref

    def persistent_load(self, pid: Any) -> Any:
        return self._load_ref(pid)


# Exact types plain pickle handles the same everywhere: the common case skips cloudpickle's
# slower pickler (subclasses, which may live in __main__, still go through cloudpickle).
PLAIN_TYPES = frozenset({int, float, str, bytes, bool, type(None)})


def dumps_call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    """Pickle call arguments; name the argument that cannot be pickled."""
    return encode_call(args, kwargs)[0]


def encode_call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[bytes, list[int] | None]:
    """Pickle call arguments, and list the mesh handles they reference (None: no persistent
    ids at all; send the list as the request's ``refs``). Names an argument that cannot be
    pickled."""
    if all(type(a) in PLAIN_TYPES for a in args) and all(
        type(v) in PLAIN_TYPES for v in kwargs.values()
    ):
        return pickle.dumps((args, kwargs), protocol=PROTOCOL), None
    try:
        with io.BytesIO() as file:
            pickler = _CallPickler(file)
            pickler.dump((args, kwargs))
            return file.getvalue(), pickler.refs
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


def encode_value(value: Any, make_save_ref: Callable[[], SaveRef]) -> tuple[bytes, bool]:
    """Pickle a result, turning what the hook ``make_save_ref()`` returns recognises into
    persistent ids; True if any was (send ``refs`` in the meta). Plain values (the hot path)
    skip the hook, and never make it."""
    if type(value) in PLAIN_TYPES or (
        type(value) is list and all(type(v) in PLAIN_TYPES for v in value)
    ):
        return dumps_value(value), False
    save_ref = make_save_ref()
    with io.BytesIO() as file:
        pickler = _RefPickler(file, save_ref)
        try:
            pickler.dump(value)
        except Exception:
            file.seek(0)
            file.truncate()
            pickler = _RefCloudPickler(file, save_ref)
            pickler.dump(value)
        return file.getvalue(), pickler.used


def loads(payload: bytes | memoryview, what: str, load_ref: LoadRef | None = None) -> Any:
    """Unpickle; ``load_ref`` resolves persistent ids (pass it when the meta has ``refs``)."""
    try:
        if load_ref is None:
            return pickle.loads(payload)
        with io.BytesIO(payload) as file:
            return _RefUnpickler(file, load_ref).load()
    except ProxyError:
        raise
    except Exception as exc:
        raise ArgumentEncodingError(f"{what} could not be unpickled: {exc!r}") from exc


# Actor classes -----------------------------------------------------------------------------


class ByValue:
    """``by_value(cls)``: spawn ``cls`` shipped by value (cloudpickle), not by its import name."""

    def __init__(self, cls: type) -> None:
        self.cls = cls


def by_value(cls: type) -> ByValue:
    """Mark an actor class to travel by value: ``procs.spawn("a", by_value(MyActor))``."""
    return ByValue(cls)


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


def value_mesh_from(
    meta: dict[str, Any], payload: bytes | memoryview, load_ref: LoadRef | None = None
) -> ValueMesh[Any]:
    values = loads(payload, "result", load_ref if meta.get("refs") else None)
    return ValueMesh(extent_from_meta(meta["extent"]), values)


def value_from(
    meta: dict[str, Any], payload: bytes | memoryview, load_ref: LoadRef | None = None
) -> Any:
    """A single result (``call_one``, ``choose``, a stream item)."""
    return loads(payload, "result", load_ref if meta.get("refs") else None)


# Exceptions --------------------------------------------------------------------------------


def encode_exception(
    exc: BaseException,
    remote_traceback: str | None = None,
    category: str = "remote",
    *,
    actor_message: str | None = None,
) -> tuple[dict[str, Any], bytes]:
    """Meta and payload of a FAILURE frame for ``exc``.

    ``actor_message`` marks an actor's own exception, which Monarch wraps in ``ActorError``
    (this is its message, e.g. ``"Actor call w.fail failed."``); the client raises it so.
    """
    text = remote_traceback or "".join(traceback.format_exception(exc))
    meta = {
        "category": category,
        "type": f"{type(exc).__module__}.{type(exc).__qualname__}",
        "message": str(exc),
        "traceback": text,
    }
    if actor_message is not None:
        meta["actor"] = actor_message
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
    if category not in ("remote", "supervision"):
        error_type = FAILURE_CATEGORIES.get(category, ProxyError)
        return error_type(message)
    exc: BaseException | None = None
    if payload:
        try:
            exc = pickle.loads(payload)
        except Exception:
            exc = None
    if not isinstance(exc, BaseException):
        if category == "supervision":  # Monarch's own class is not picklable
            exc = FAILURE_CATEGORIES["supervision"](message)
            exc.endpoint = meta.get("endpoint")  # type: ignore[attr-defined]
        else:
            exc = RemoteError(str(meta.get("type", "Exception")), message, remote_tb)
    cause = RemoteTraceback(remote_tb)
    actor_message = meta.get("actor")
    if isinstance(actor_message, str):
        return actor_error(exc, actor_message, remote_tb, cause)
    exc.__cause__ = cause
    return exc


def current_exception_text() -> str:
    return "".join(traceback.format_exception(*sys.exc_info()))
