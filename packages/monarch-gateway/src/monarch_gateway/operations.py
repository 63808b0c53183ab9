"""What each request does to the real Monarch meshes. The only module that calls Monarch's API.

Every operation takes the session's :class:`HandleTable`, the request's meta and payload, and
returns the reply's meta and payload; it raises to fail just that request.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from monarch_gateway.handles import Entry, HandleTable, select_hosts
from monarch_gateway.monitor import Worker
from monarch_gateway.shim import to_monarch
from monarch_gateway.views import apply_view
from monarch_proxy import codec
from monarch_proxy.errors import (
    FAILURE_CATEGORIES,
    ActorImportError,
    GatewayError,
    ProtocolError,
    ProxyError,
)
from monarch_proxy.values import Extent

Result = tuple[dict[str, Any], bytes]
EmitItem = Callable[[dict[str, Any], bytes], Awaitable[None]]
Describe = Callable[[BaseException], tuple[dict[str, Any], bytes]]

logger = logging.getLogger("monarch_gateway")

STOP_TIMEOUT_S = 30.0
OUTPUT_SETTLE_S = 0.05
FLUSH_TIMEOUT_S = 1.0
CALL_METHODS = frozenset({"call", "call_one", "choose", "broadcast", "stream"})
# Methods with exactly one result: the session waits for them without a task (see start_call).
SINGLE_RESULT_METHODS = frozenset({"call", "call_one", "choose"})


def field(meta: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = meta.get(name)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ProtocolError(f"request field {name!r} is missing or not of the right type")
    return value


def require(entry: Entry, *kinds: str) -> None:
    if entry.kind not in kinds:
        raise GatewayError(
            f"{entry.name!r} is a {entry.kind} mesh; this operation needs a "
            f"{' or '.join(kinds)} mesh"
        )


def extent_of(mesh: Any) -> dict[str, list[Any]]:
    extent = mesh.extent
    return codec.extent_meta(Extent(tuple(extent.labels), tuple(extent.sizes)))


def handle_reply(table: HandleTable, entry: Entry) -> Result:
    handle = table.add(entry)
    meta: dict[str, Any] = {"handle": handle, "extent": extent_of(entry.obj), "name": entry.name}
    if entry.kind == "actor":
        meta["endpoints"] = endpoints_of(entry.obj)
    return meta, b""


# Monarch objects that cross the wire as references (see codec's docstring) -------------------


@functools.cache
def monarch_classes() -> dict[type, str]:
    """Monarch's mesh classes and the proxy kind each becomes (imported on first use)."""
    from monarch._src.actor.actor_mesh import ActorMesh
    from monarch._src.actor.host_mesh import HostMesh
    from monarch._src.actor.proc_mesh import ProcMesh

    return {ActorMesh: "actor", ProcMesh: "proc", HostMesh: "host"}


def monarch_value_mesh(labels: list[str], sizes: list[int], values: list[Any]) -> Any:
    from monarch._rust_bindings.monarch_hyperactor.shape import Shape, Slice
    from monarch._src.actor.actor_mesh import ValueMesh

    return ValueMesh(Shape(list(labels), Slice.new_row_major(list(sizes))), list(values))


def reference_loader(refs: dict[int, Entry]) -> codec.LoadRef:
    """Turns the persistent ids of a request's arguments into Monarch objects: a mesh handle
    (resolved when the request arrived) into the real mesh, a value mesh into Monarch's."""

    def load(pid: Any) -> Any:
        tag = pid[0] if isinstance(pid, tuple) and pid else None
        if tag == codec.MESH_REF and len(pid) == 2 and pid[1] in refs:
            return refs[pid[1]].obj
        if tag == codec.VALUE_MESH_REF and len(pid) == 4:
            return monarch_value_mesh(pid[1], pid[2], pid[3])
        raise ProtocolError(f"arguments hold a reference this request did not list: {pid!r}")

    return load


def reference_saver(table: HandleTable, origin: Entry) -> codec.SaveRef:
    """Registers each Monarch mesh in a result in the session (as a proxy on the client, never
    a raw Monarch mesh that would dial the workers itself); value meshes travel as values."""
    classes = monarch_classes()
    from monarch._src.actor.actor_mesh import ValueMesh

    def save(obj: Any) -> Any:
        kind = classes.get(type(obj))
        if kind is None:
            kind = next((k for c, k in classes.items() if isinstance(obj, c)), None)
        if kind is not None:
            name = str(getattr(obj, "_mesh_name", None) or getattr(obj, "_name", None) or kind)
            extent = extent_of(obj)
            # The workers it spans are unknown: those of the mesh it came from, when sizes agree.
            same = obj.extent.labels[:1] == ["hosts"] and obj.extent.sizes[0] == len(origin.hosts)
            entry = Entry(kind, obj, name, origin.hosts if same else (), origin.mesh)
            handle = table.add(entry)
            endpoints = endpoints_of(obj) if kind == "actor" else None
            return (
                codec.MESH_REF,
                kind,
                handle,
                extent["labels"],
                extent["sizes"],
                name,
                endpoints,
            )
        if isinstance(obj, ValueMesh):
            extent = extent_of(obj)
            return (codec.VALUE_MESH_REF, extent["labels"], extent["sizes"], list(obj.values()))
        return None

    return save


class MeshService:
    """The gateway's named host meshes, and the operations sessions run on them."""

    def __init__(
        self,
        host_meshes: dict[str, Any],
        workers: dict[str, list[Worker]],
        *,
        stream_logs: bool = False,
    ) -> None:
        self.host_meshes = host_meshes  # replaced by membership.py when a worker is replaced
        self.workers = workers
        self.stream_logs = stream_logs

    def host_entry(self, name: str) -> Entry:
        """A whole host mesh as it is now."""
        workers = tuple(self.workers[name])
        return Entry("host", self.host_meshes[name], name, workers, name, whole=True)

    def meshes(self, table: HandleTable) -> Result:
        described = {}
        for name in self.host_meshes:
            meta, _ = handle_reply(table, self.host_entry(name))
            described[name] = meta
        return {"meshes": described}, b""

    async def flush_output(self) -> Result:
        """Push buffered worker output to the clients before a session ends."""
        if self.stream_logs:
            from monarch._src.actor.logging import _flush_all_proc_mesh_logs_async

            # Bounded: a mesh with a dead or broken process never answers the flush.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(_flush_all_proc_mesh_logs_async(), FLUSH_TIMEOUT_S)
            await asyncio.sleep(OUTPUT_SETTLE_S)  # let the output tee relay what just arrived
        return {}, b""

    async def spawn_procs(
        self,
        table: HandleTable,
        entry: Entry,
        meta: dict[str, Any],
        output_tag: str = "",
        payload: bytes | memoryview = b"",
    ) -> Result:
        """Spawn proc meshes; Monarch names them ``<name>_<output_tag>``, so the output their
        processes write is routed to the session that spawned them (see output.py)."""
        require(entry, "host")
        per_host = field(meta, "per_host", dict)
        if not all(
            isinstance(k, str) and isinstance(v, int) and v > 0 for k, v in per_host.items()
        ):
            raise ProtocolError("per_host must map labels to positive integers")
        name = field(meta, "name", str)
        mesh, hosts = entry.obj, entry.hosts
        if entry.whole:  # the mesh as it is now: replaced workers included
            mesh, hosts = self.host_meshes[entry.mesh], tuple(self.workers[entry.mesh])
        monarch_name = f"{name}_{output_tag}" if output_tag else name
        bootstrap = codec.loads(payload, "bootstrap")[0][0] if len(payload) else None
        procs = mesh.spawn_procs(per_host=per_host, bootstrap=bootstrap, name=monarch_name)
        if self.stream_logs:
            await procs.logging_option(stream_to_client=True, aggregate_window_sec=None)
        procs_entry = Entry("proc", procs, name, hosts, entry.mesh)
        table.proc_meshes.append(procs_entry)
        return handle_reply(table, procs_entry)

    async def spawn(
        self,
        table: HandleTable,
        entry: Entry,
        meta: dict[str, Any],
        payload: bytes | memoryview,
        refs: dict[int, Entry] | None = None,
    ) -> Result:
        require(entry, "proc")
        name = field(meta, "name", str)
        reference = field(meta, "actor", str)
        class_size = field(meta, "class_size", int)
        view = memoryview(payload)
        if field(meta, "by_value", bool):
            actor_class = codec.loads(view[:class_size], f"actor class {reference}")
        else:
            try:
                actor_class = codec.import_reference(reference)
            except (ImportError, AttributeError, ValueError) as exc:
                raise ActorImportError(
                    f"the gateway cannot import actor class {reference} ({exc}); install its "
                    "module where the gateway and workers run, or spawn with by_value=True"
                ) from None
        load_ref = reference_loader(refs or {}) if "refs" in meta else None
        args, kwargs = codec.loads(view[class_size:], "spawn arguments", load_ref)
        actor_class = to_monarch(actor_class)  # a class written with monarch_proxy.actor
        actors = entry.obj.spawn(name, actor_class, *args, **kwargs)
        await actors.initialized  # surface constructor failures at spawn, not at first call
        with contextlib.suppress(Exception):  # supervision events name the mesh this way
            table.monarch_names[str(await actors._inner.name().as_asyncio())] = name
        return handle_reply(table, Entry("actor", actors, name, entry.hosts, entry.mesh))

    def slice(self, table: HandleTable, entry: Entry, meta: dict[str, Any]) -> Result:
        if "view" in meta:  # split, flatten or rename: the hosts they span stay the same
            viewed = apply_view(entry.obj, meta)
            return handle_reply(
                table, Entry(entry.kind, viewed, entry.name, entry.hosts, entry.mesh)
            )
        selection = field(meta, "selection", dict)
        arguments: dict[str, int | slice] = {}
        for label, sel in selection.items():
            if isinstance(sel, int) and not isinstance(sel, bool):
                arguments[label] = sel
            elif (
                isinstance(sel, list)
                and len(sel) == 3
                and all(s is None or isinstance(s, int) for s in sel)
            ):
                arguments[label] = slice(*sel)
            else:
                raise ProtocolError(
                    f"selection for {label!r} must be an int or [start, stop, step]"
                )
        sliced = entry.obj.slice(**arguments)
        # After a split or rename "hosts" may not be the workers' dimension: keep them all then.
        same_hosts = entry.obj.sizes.get("hosts") == len(entry.hosts)
        hosts = select_hosts(entry.hosts, selection.get("hosts") if same_hosts else None)
        return handle_reply(table, Entry(entry.kind, sliced, entry.name, hosts, entry.mesh))

    async def reload(
        self,
        table: HandleTable,
        meta: dict[str, Any],
        usable: Callable[[Entry], bool] = lambda entry: True,
    ) -> Result:
        """Reload changed modules in every process this session spawned, on the proc meshes
        that are ``usable`` (those spanning a dead worker can only fail)."""
        paths = field(meta, "paths", list)
        if not all(isinstance(p, str) for p in paths):
            raise ProtocolError("reload paths must be strings")
        from monarch_gateway.reload import HotReloader, reload_changed, synced_root

        root = synced_root()  # the gateway holds actor classes too: reload them here first
        local = reload_changed(root, paths) if root else []
        meshes = [e for e in table.proc_meshes if usable(e)]
        for entry in meshes:
            if entry.reloader is None:
                entry.reloader = entry.obj.spawn("_hot_reloader", HotReloader)
        results = await asyncio.gather(*(e.reloader.reload.call(paths) for e in meshes))
        counts: dict[str, int] = dict.fromkeys(local, 0)
        for values in results:
            for modules in values.values():
                for module in modules:
                    counts[module] = counts.get(module, 0) + 1
        return {"reloaded": counts, "processes": sum(len(v) for v in results)}, b""

    async def stop(self, table: HandleTable, entry: Entry, meta: dict[str, Any]) -> Result:
        require(entry, "proc", "actor")
        reason = meta.get("reason")
        if entry.kind == "proc":
            await flush_before_stop(entry.obj)
        if reason is None:
            await entry.obj.stop()
        else:
            await entry.obj.stop(str(reason))
        table.proc_meshes[:] = [e for e in table.proc_meshes if e.obj is not entry.obj]
        return {}, b""

    async def stop_procs(self, entries: list[Entry]) -> None:
        """Stop proc meshes of a session that ended; one that fails (a dead worker) is logged."""
        await asyncio.gather(*(flush_before_stop(e.obj) for e in entries))
        results = await asyncio.gather(
            *(
                asyncio.wait_for(e.obj.stop("the client's session ended"), STOP_TIMEOUT_S)
                for e in entries
            ),
            return_exceptions=True,
        )
        for entry, result in zip(entries, results, strict=True):
            if isinstance(result, BaseException):
                logger.warning(
                    "could not stop a proc mesh of an ended session",
                    extra={"mesh": entry.name, "error": repr(result)},
                )

    async def stream(
        self, table: HandleTable, entry: Entry, futures: Any, emit_item: EmitItem
    ) -> Result:
        """Relay a stream started by :func:`start_call`, one ITEM per actor's result."""
        # Each actor's failure fails only its own item, as in Monarch; the stream goes on.
        save_ref = functools.partial(reference_saver, table, entry)
        for future in futures:
            try:
                value = await future
            except Exception as exc:
                failure, data = describe_failure(exc)
                await emit_item({"failure": failure}, data)
                continue
            data, used = codec.encode_value(value, save_ref)
            await emit_item({"refs": 1} if used else {}, data)
        return {}, b""


@functools.cache
def _endpoint_names(cls: type) -> frozenset[str]:
    from monarch._src.actor.endpoint import EndpointProperty

    return frozenset(n for n in dir(cls) if isinstance(getattr(cls, n, None), EndpointProperty))


async def flush_before_stop(procs: Any) -> None:
    """Flush a proc mesh's streamed output with a bound, before Monarch's ``stop()`` does it
    without one: a mesh with a crashed process never answers the flush, and its ``stop()``
    would hang (Monarch's client, which streams no output here, stops it at once)."""
    manager: Any = getattr(procs, "_logging_manager", None)
    if getattr(manager, "_logging_mesh_client", None) is None:
        return
    try:
        await asyncio.wait_for(manager.flush_async(), FLUSH_TIMEOUT_S)
    except TimeoutError:
        manager._logging_mesh_client = None  # so stop() does not wait for that flush again


def endpoints_of(actor_mesh: Any) -> list[str]:
    """The endpoint names of an actor mesh's class, so the client can refuse others at once."""
    cls = getattr(actor_mesh, "_class", None)
    return sorted(_endpoint_names(cls)) if isinstance(cls, type) else []


def endpoint_of(entry: Entry, name: str) -> Any:
    """The named endpoint of an actor mesh; AttributeError (as Monarch raises) naming the mesh
    and its endpoints if it has none of that name."""
    cls = getattr(entry.obj, "_class", None)
    if isinstance(cls, type) and name not in _endpoint_names(cls):
        raise AttributeError(
            f"actor mesh {entry.name!r} ({cls.__name__}) has no endpoint {name!r}; its "
            f"endpoints are {sorted(_endpoint_names(cls))}"
        )
    return getattr(entry.obj, name)


def start_call(
    entry: Entry,
    meta: dict[str, Any],
    payload: bytes | memoryview,
    refs: dict[int, Entry] | None = None,
) -> Any:
    """Send a call to the actors now, when its request arrives: Monarch keeps the order of
    messages from one sender to one actor, so a session's calls must reach Monarch in the
    order the client sent them (a broadcast run later in a task was overtaken by the next
    call). Returns Monarch's result as an asyncio future (call, call_one, choose), its
    iterator of futures (stream), or None (broadcast: nothing to wait for).

    The hot path: no task and no coroutine per call, just a callback on the future.
    """
    require(entry, "actor")
    method = field(meta, "method", str)
    if method not in CALL_METHODS:
        raise ProtocolError(f"unknown call method {method!r}; use one of {sorted(CALL_METHODS)}")
    endpoint = endpoint_of(entry, field(meta, "endpoint", str))
    load_ref = reference_loader(refs or {}) if "refs" in meta else None
    args, kwargs = codec.loads(payload, "call arguments", load_ref)
    if method == "broadcast":
        endpoint.broadcast(*args, **kwargs)
        return None
    if method == "stream":
        return endpoint.stream(*args, **kwargs)
    return getattr(endpoint, method)(*args, **kwargs).as_asyncio()


def finish_call(table: HandleTable, entry: Entry, meta: dict[str, Any], value: Any) -> Result:
    """The reply to a call started by :func:`start_call`; Monarch meshes in ``value`` are
    registered in the session (see :func:`reference_saver`)."""
    if meta["method"] == "call":
        extent = Extent(tuple(value.extent.labels), tuple(value.extent.sizes))
        reply: dict[str, Any] = {"extent": codec.extent_meta(extent)}
        value = list(value.values())
    else:
        reply = {}
    data, used = codec.encode_value(value, functools.partial(reference_saver, table, entry))
    if used:
        reply["refs"] = 1
    return reply, data


CATEGORY_OF = {error: name for name, error in FAILURE_CATEGORIES.items()}


def describe_failure(exc: BaseException) -> tuple[dict[str, Any], bytes]:
    """FAILURE meta and payload for an exception raised while serving a request: an actor's
    exception as Monarch's ActorError carries it, Monarch's SupervisionError by its fields (it
    cannot be pickled), the proxy's own errors by category, anything else as itself."""
    if isinstance(exc, ProxyError):
        category = next((CATEGORY_OF[t] for t in type(exc).__mro__ if t in CATEGORY_OF), "gateway")
        return codec.encode_exception(exc, category=category)
    inner = getattr(exc, "exception", None)
    if isinstance(inner, BaseException):  # Monarch's ActorError
        formatted = getattr(exc, "exception_formatted", None)
        message = getattr(exc, "message", None)
        return codec.encode_exception(
            inner,
            formatted if isinstance(formatted, str) else None,
            actor_message=message
            if isinstance(message, str)
            else "A remote actor call has failed.",
        )
    if type(exc).__name__ == "SupervisionError" and isinstance(exc, RuntimeError):
        meta, payload = codec.encode_exception(exc, category="supervision")
        meta["endpoint"] = getattr(exc, "endpoint", None)
        return meta, payload
    return codec.encode_exception(exc)
