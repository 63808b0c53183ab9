"""What each request does to the real Monarch meshes. The only module that calls Monarch's API.

Every operation takes the session's :class:`HandleTable`, the request's meta and payload, and
returns the reply's meta and payload; it raises to fail just that request.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

from monarch_gateway.handles import Entry, HandleTable, select_hosts
from monarch_gateway.monitor import Worker
from monarch_gateway.shim import to_monarch
from monarch_gateway.views import apply_view
from monarch_proxy import codec
from monarch_proxy.errors import ActorImportError, GatewayError, ProtocolError
from monarch_proxy.values import Extent

Result = tuple[dict[str, Any], bytes]
EmitItem = Callable[[bytes], Awaitable[None]]

OUTPUT_SETTLE_S = 0.05
FLUSH_TIMEOUT_S = 1.0
CALL_METHODS = frozenset({"call", "call_one", "choose", "broadcast", "stream"})
# Methods with exactly one result: the session starts them without a task (see begin_call).
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
    return {"handle": handle, "extent": extent_of(entry.obj), "name": entry.name}, b""


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
        self, table: HandleTable, entry: Entry, meta: dict[str, Any], output_tag: str = ""
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
        procs = mesh.spawn_procs(per_host=per_host, name=monarch_name)
        if self.stream_logs:
            await procs.logging_option(stream_to_client=True, aggregate_window_sec=None)
        procs_entry = Entry("proc", procs, name, hosts, entry.mesh)
        table.proc_meshes.append(procs_entry)
        return handle_reply(table, procs_entry)

    async def spawn(
        self, table: HandleTable, entry: Entry, meta: dict[str, Any], payload: bytes | memoryview
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
        args, kwargs = codec.loads(view[class_size:], "spawn arguments")
        actor_class = to_monarch(actor_class)  # a class written with monarch_proxy.actor
        actors = entry.obj.spawn(name, actor_class, *args, **kwargs)
        await actors.initialized  # surface constructor failures at spawn, not at first call
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

    async def stop(self, table: HandleTable, entry: Entry) -> Result:
        require(entry, "proc", "actor")
        await entry.obj.stop()
        table.proc_meshes[:] = [e for e in table.proc_meshes if e.obj is not entry.obj]
        return {}, b""

    async def call(
        self, entry: Entry, meta: dict[str, Any], payload: bytes | memoryview, emit_item: EmitItem
    ) -> Result:
        require(entry, "actor")
        method = field(meta, "method", str)
        if method not in CALL_METHODS:
            raise ProtocolError(
                f"unknown call method {method!r}; use one of {sorted(CALL_METHODS)}"
            )
        endpoint_name = field(meta, "endpoint", str)
        args, kwargs = codec.loads(payload, "call arguments")
        endpoint = getattr(entry.obj, endpoint_name)
        if method == "broadcast":
            endpoint.broadcast(*args, **kwargs)
            return {}, b""
        if method == "stream":
            for future in endpoint.stream(*args, **kwargs):
                await emit_item(codec.dumps_value(await future))
            return {}, b""
        return finish_call(meta, await getattr(endpoint, method)(*args, **kwargs))


def begin_call(entry: Entry, meta: dict[str, Any], payload: bytes | memoryview) -> Any:
    """Start a single-result call; return Monarch's result as an asyncio future.

    The hot path: no task and no coroutine per call, just a callback on the future.
    """
    require(entry, "actor")
    method = field(meta, "method", str)
    args, kwargs = codec.loads(payload, "call arguments")
    endpoint = getattr(entry.obj, field(meta, "endpoint", str))
    return getattr(endpoint, method)(*args, **kwargs).as_asyncio()


def finish_call(meta: dict[str, Any], value: Any) -> Result:
    """The reply to a call started by :func:`begin_call`."""
    if meta["method"] == "call":
        extent = Extent(tuple(value.extent.labels), tuple(value.extent.sizes))
        return {"extent": codec.extent_meta(extent)}, codec.dumps_value(list(value.values()))
    return {}, codec.dumps_value(value)


def unwrap_actor_error(exc: BaseException) -> tuple[BaseException, str | None]:
    """Monarch wraps an actor's exception in ActorError; hand the client the original."""
    inner = getattr(exc, "exception", None)
    if isinstance(inner, BaseException):
        formatted = getattr(exc, "exception_formatted", None)
        return inner, formatted if isinstance(formatted, str) else None
    return exc, None
