"""Proxies that mirror Monarch's job and mesh API over one gateway connection.

    job = monarch_proxy.connect("wss://gateway:8443", token=...)
    procs = job.trainers.spawn_procs(per_host={"gpus": 8})
    actors = procs.spawn("trainer", Trainer, lr=0.1)
    print(actors.step.call(1).get())              # ValueMesh with coordinates
    actors.slice(hosts=0, gpus=0).step.call_one(1).get()

Every mesh is a handle held by the gateway; the proxy frees it when it is garbage collected,
and the gateway frees all of a session's handles when the session ends.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import importlib
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from monarch_proxy import codec
from monarch_proxy.connection import GatewayConnection
from monarch_proxy.errors import (
    ActorImportError,
    ArgumentEncodingError,
    CallTimeoutError,
    ProxyError,
    WorkerReattachError,
    WorkspaceUnavailableError,
)
from monarch_proxy.futures import FutureProxy, StreamProxy
from monarch_proxy.protocol.names import Op
from monarch_proxy.values import Extent, Shape, ShapeOps, ValueMesh

M = TypeVar("M", bound="MeshProxy")
N = TypeVar("N", bound="MeshProxy")
Selection = int | slice


def _selection_meta(selection: dict[str, Selection]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for label, sel in selection.items():
        if isinstance(sel, bool) or not isinstance(sel, int | slice):
            raise TypeError(f"slice({label}=...) takes an int or a slice, not {type(sel).__name__}")
        out[label] = sel if isinstance(sel, int) else [sel.start, sel.stop, sel.step]
    return out


class MeshProxy(ShapeOps):
    """A mesh held by the gateway: its handle, shape and the connection it lives on.

    Public attributes are exactly those of Monarch's meshes (``slice``, ``split``, ``flatten``,
    ``rename``, ``size``, ``sizes``, ``extent``, ``stop``, ...): everything else on an actor
    mesh is an endpoint, so the proxy's own state lives in underscore names.
    """

    _kind = "mesh"

    def __init__(
        self,
        connection: GatewayConnection,
        handle: int,
        extent: Extent,
        name: str,
        shape: Shape | None = None,
    ) -> None:
        self._connection = connection
        self._handle = handle
        self._name = name
        # Monarch's shape arithmetic, done here: bad labels and indices fail without a round
        # trip, with Monarch's exception types; the gateway repeats the view on the real mesh.
        self._mesh_shape = shape if shape is not None else Shape.dense(extent)
        self._finalizer = weakref.finalize(self, connection.release, handle)

    @property
    def _shape(self) -> Shape:
        return self._mesh_shape

    def _new_with_shape(self: M, shape: Shape, view: tuple[str, dict[str, Any]]) -> M:
        method, args = view
        meta: dict[str, Any] = {"handle": self._handle}
        if method == "slice":
            meta["selection"] = _selection_meta(args)
        else:
            meta["view"], meta["args"] = method, args
        reply, _ = self._connection.request(Op.MESH_SLICE, meta)
        return self._derive(type(self), reply, shape)

    def stop(self, reason: str | None = None) -> FutureProxy[None]:
        """Stop the mesh's actors or processes on the workers (``reason`` as in Monarch)."""
        meta: dict[str, Any] = {"handle": self._handle}
        if reason is not None:
            meta["reason"] = str(reason)
        future = self._connection.submit(Op.MESH_STOP, meta)
        return FutureProxy(future, lambda _m, _p: None, f"{self._name}.stop()")

    def _derive(self, cls: type[N], meta: dict[str, Any], shape: Shape | None = None) -> N:
        derived = cls(
            self._connection,
            int(meta["handle"]),
            codec.extent_from_meta(meta["extent"]),
            str(meta.get("name", self._name)),
            shape,
        )
        if "endpoints" in meta:  # an actor mesh: other names fail at once (AttributeError)
            derived.__dict__["_endpoints"] = frozenset(meta["endpoints"])
        return derived

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._name!r} {self.extent!r}>"


class HostMeshProxy(MeshProxy):
    _kind = "host"

    def spawn_procs(
        self,
        per_host: dict[str, int] | None = None,
        bootstrap: Callable[[], Any] | None = None,
        name: str | None = None,
    ) -> ProcMeshProxy:
        """Start processes on every host: ``per_host={"gpus": 8}`` gives 8 per host;
        ``bootstrap`` (a function, sync or async) runs in each process first, as in Monarch."""
        per_host = dict(per_host or {})
        for label, size in per_host.items():
            if not isinstance(size, int) or isinstance(size, bool) or size < 1:
                raise ValueError(f"per_host[{label!r}] must be a positive int, got {size!r}")
        if bootstrap is not None and not callable(bootstrap):
            raise TypeError(f"bootstrap must be callable, not {type(bootstrap).__name__}")
        payload = codec.dumps_call((bootstrap,), {}) if bootstrap is not None else b""
        meta, _ = self._connection.request(
            Op.HOST_SPAWN_PROCS,
            {"handle": self._handle, "per_host": per_host, "name": name or "anon"},
            payload,
        )
        return self._derive(ProcMeshProxy, meta)


class ProcMeshProxy(MeshProxy):
    _kind = "proc"

    def spawn(
        self, name: str, actor: type | str | codec.ByValue, *args: Any, **kwargs: Any
    ) -> ActorMeshProxy:
        """Spawn ``actor`` on every process. ``actor`` is a class or a ``"module:Class"`` name;
        every other argument, keywords included, goes to its constructor.

        Classes that workers can import travel by reference; classes from ``__main__``, a
        notebook or a function body travel by value (cloudpickle). If the gateway cannot import
        a class by reference, it is sent again by value; ``monarch_proxy.by_value(cls)`` sends
        it by value at once.
        """
        by_value: bool | None = None
        if isinstance(actor, codec.ByValue):
            actor, by_value = actor.cls, True
        if isinstance(actor, str):
            reference, cls = actor, None
            if ":" not in reference:
                raise ValueError(f"actor name {actor!r} must look like 'package.module:Class'")
        else:
            reference, cls = codec.class_reference(actor), actor
        send_value = cls is not None and (
            by_value or (by_value is None and codec.ships_by_value(cls))
        )
        try:
            return self._spawn(name, reference, cls if send_value else None, args, kwargs)
        except ActorImportError:
            if cls is None or send_value or by_value is False:
                raise
            return self._spawn(name, reference, cls, args, kwargs)

    def _spawn(
        self,
        name: str,
        reference: str,
        cls: type | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> ActorMeshProxy:
        class_bytes = codec.dumps_class(cls) if cls is not None else b""
        arguments, refs = codec.encode_call(args, kwargs)
        request: dict[str, Any] = {
            "handle": self._handle,
            "name": name,
            "actor": reference,
            "by_value": cls is not None,
            "class_size": len(class_bytes),
        }
        if refs is not None:
            request["refs"] = refs
        meta, _ = self._connection.request(Op.PROC_SPAWN, request, class_bytes + arguments)
        return self._derive(ActorMeshProxy, meta)


class ActorMeshProxy(MeshProxy):
    """Actors on a proc mesh: any attribute that is not one of Monarch's mesh methods is an
    endpoint (``actors.name.call()`` works; Monarch itself refuses endpoints called ``slice``,
    ``size``, ``stop``... when it spawns the class)."""

    _kind = "actor"

    def __getattr__(self, endpoint: str) -> EndpointProxy:
        if endpoint.startswith("_"):
            raise AttributeError(endpoint)
        return EndpointProxy(self, endpoint)

    @property
    def initialized(self) -> FutureProxy[None]:
        """Done: the gateway waits for the actors' constructors before it answers a spawn."""
        done: concurrent.futures.Future[Any] = concurrent.futures.Future()
        done.set_result(({}, b""))
        return FutureProxy(done, lambda _m, _p: None, f"{self._name}.initialized")


class EndpointProxy:
    """``actors.<endpoint>``: the ways to call one endpoint, as in Monarch."""

    def __init__(self, mesh: ActorMeshProxy, name: str) -> None:
        endpoints = mesh.__dict__.get("_endpoints")  # from the gateway, when it spawned them
        if endpoints is not None and name not in endpoints:
            raise AttributeError(
                f"actor mesh {mesh.__dict__.get('_name') or mesh.__dict__.get('name')!r} has no "
                f"endpoint {name!r}; its "
                f"endpoints are {sorted(endpoints)}"
            )
        self._mesh = mesh
        self._name = name

    def _load_ref(self, pid: Any) -> Any:
        return load_reference(self._mesh._connection, pid)

    def _value(self, meta: dict[str, Any], payload: bytes | memoryview) -> Any:
        return codec.value_from(meta, payload, self._load_ref)

    def _value_mesh(self, meta: dict[str, Any], payload: bytes | memoryview) -> ValueMesh[Any]:
        return codec.value_mesh_from(meta, payload, self._load_ref)

    def _submit(
        self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], **options: Any
    ) -> Any:
        meta: dict[str, Any] = {
            "handle": self._mesh._handle,
            "endpoint": self._name,
            "method": method,
        }
        payload, refs = codec.encode_call(args, kwargs)
        if refs is not None:
            meta["refs"] = refs
        return self._mesh._connection.submit(Op.ENDPOINT_CALL, meta, payload, **options)

    def _describe(self, method: str) -> str:
        return f"{self._mesh._name}.{self._name}.{method}()"

    def call(self, *args: Any, **kwargs: Any) -> FutureProxy[ValueMesh[Any]]:
        """Call every actor; the result has one value per point of the mesh."""
        return FutureProxy(
            self._submit("call", args, kwargs), self._value_mesh, self._describe("call")
        )

    def call_one(self, *args: Any, **kwargs: Any) -> FutureProxy[Any]:
        """Call the single actor of a size-1 mesh (slice first)."""
        return FutureProxy(
            self._submit("call_one", args, kwargs), self._value, self._describe("call_one")
        )

    def choose(self, *args: Any, **kwargs: Any) -> FutureProxy[Any]:
        """Call one actor of the mesh, picked by Monarch."""
        return FutureProxy(
            self._submit("choose", args, kwargs), self._value, self._describe("choose")
        )

    def broadcast(self, *args: Any, **kwargs: Any) -> None:
        """Send to every actor without waiting for results. A failure to send (bad arguments,
        a stopped mesh) is reported to the fault hook, as Monarch reports a failed broadcast."""
        future = self._submit("broadcast", args, kwargs)
        future.add_done_callback(
            functools.partial(self._mesh._connection.report_background, self._describe("broadcast"))
        )

    def stream(self, *args: Any, **kwargs: Any) -> StreamProxy[Any]:
        """Call every actor; iterate over the results as they arrive."""
        stream: StreamProxy[Any] = StreamProxy(self._describe("stream"), self._load_ref)
        stream._attach(self._submit("stream", args, kwargs, on_item=stream._on_item))
        return stream


def load_reference(connection: GatewayConnection, pid: Any) -> Any:
    """What a persistent id in a result stands for (see codec): a mesh the gateway registered in
    this session becomes its proxy, a value mesh a ValueMesh."""
    tag = pid[0] if isinstance(pid, tuple) and pid else None
    if tag == codec.MESH_REF and len(pid) == 7:
        _, kind, handle, labels, sizes, name, endpoints = pid
        cls = {"host": HostMeshProxy, "proc": ProcMeshProxy, "actor": ActorMeshProxy}[kind]
        mesh = cls(connection, int(handle), Extent(tuple(labels), tuple(sizes)), str(name))
        if endpoints is not None:
            mesh.__dict__["_endpoints"] = frozenset(endpoints)
        return mesh
    if tag == codec.VALUE_MESH_REF and len(pid) == 4:
        return ValueMesh(Extent(tuple(pid[1]), tuple(pid[2])), pid[3])
    raise ArgumentEncodingError(f"the gateway sent a reference this client does not know: {pid!r}")


codec.register_handle_type(MeshProxy)


class Workspace(Protocol):
    """Puts a local folder on every worker host, where actors import it (e.g. monarch-sync)."""

    def push(self, src: str) -> list[str]:
        """Sync ``src``; return the paths (relative to ``src``) that changed."""
        ...


def gateway_workspace(connection: GatewayConnection) -> Workspace:
    """monarch-sync's workspace pushing through this gateway's ``/sync`` endpoint.

    Found by name, not declared: the proxy and monarch-sync are independent leaves, and a
    laptop that never calls ``sync()`` needs neither the other nor its dependencies.
    """
    try:
        sync = importlib.import_module("monarch_sync")
    except ImportError:
        raise WorkspaceUnavailableError(
            "job.sync() pushes with monarch-sync, which is not installed here: "
            "pip install monarch-sync (or set job.workspace to your own monarch_proxy.Workspace)"
        ) from None
    workspace: Workspace = sync.SyncWorkspace.through_gateway(
        connection.url, connection.token or "", ssl=connection.ssl
    )
    return workspace


@dataclass(frozen=True)
class SyncResult:
    changed: list[str]  # files that differ from the previous sync
    reloaded: dict[str, int]  # module name -> number of processes that reloaded it
    push_s: float
    reload_s: float


class JobState:
    """The named host meshes a gateway serves: ``job.trainers`` or ``job["trainers"]``."""

    def __init__(
        self,
        connection: GatewayConnection,
        meshes: dict[str, HostMeshProxy],
        *,
        on_close: Callable[[], None] | None = None,
        workspace: Workspace | None = None,
    ) -> None:
        self._connection = connection
        self._meshes = meshes
        self._on_close = on_close
        self.workspace = workspace

    @classmethod
    def fetch(
        cls,
        connection: GatewayConnection,
        *,
        on_close: Callable[[], None] | None = None,
        workspace: Workspace | None = None,
    ) -> JobState:
        """Ask the gateway for its host meshes. ``on_close`` runs after :meth:`close`."""
        meta, _ = connection.request(Op.JOB_MESHES, {})
        meshes = {
            name: HostMeshProxy(
                connection, int(m["handle"]), codec.extent_from_meta(m["extent"]), name
            )
            for name, m in meta["meshes"].items()
        }
        return cls(connection, meshes, on_close=on_close, workspace=workspace)

    def sync(self, src: str = ".", *, reload: bool = True) -> SyncResult:
        """Push ``src`` to every worker host, then reload changed modules in running actors.

        Actors import the synced folder by module name; with ``reload`` the modules that
        changed are re-imported in every process this session spawned, and live actors run the
        new code from their next call on.
        """
        if self.workspace is None:
            self.workspace = gateway_workspace(self._connection)
        started = time.perf_counter()
        changed = self.workspace.push(src)
        pushed = time.perf_counter()
        reloaded = self.reload(changed) if reload and changed else {}
        return SyncResult(changed, reloaded, pushed - started, time.perf_counter() - pushed)

    def members(self) -> dict[str, Any]:
        """How the meshes stand: ``{"meshes": {name: {"workers", "dead", "whole"}}, "whole"}``."""
        meta, _ = self._connection.request(Op.JOB_MEMBERS, {})
        return meta

    def on_membership(self, callback: Callable[[dict[str, Any]], None]) -> None:
        """Call ``callback(state)`` when a worker is lost or replaced (state as in
        :meth:`members`, plus ``"lost"`` or ``"replaced"``: old address -> new). It runs on the
        connection's I/O thread: keep it short and never block there on the gateway."""
        self._connection.membership_listeners.append(callback)

    def wait_for_workers(self, timeout: float | None = None) -> dict[str, Any]:
        """Block until every mesh is whole again (each lost worker replaced and attached, its
        sync agent brought up to date); return :meth:`members`. Meshes spawned afterwards use
        the new workers. Raises :class:`CallTimeoutError` after ``timeout`` seconds, and
        :class:`WorkerReattachError` as soon as the gateway reports a restarted worker it
        cannot take in (listed at an address it attached before: ``unattachable``)."""
        changed = threading.Event()
        listener: Callable[[dict[str, Any]], None] = lambda state: changed.set()  # noqa: E731
        self._connection.membership_listeners.append(listener)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                changed.clear()
                state = self.members()
                if state.get("whole"):
                    return state
                refused = [
                    why
                    for mesh in state.get("meshes", {}).values()
                    for why in (mesh.get("unattachable") or {}).values()
                ]
                if refused:
                    raise WorkerReattachError("; ".join(refused))
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise CallTimeoutError(
                        f"the meshes were not whole again within {timeout:g}s: {state}"
                    )
                changed.wait(1.0 if left is None else min(left, 1.0))
        finally:
            self._connection.membership_listeners.remove(listener)

    def reload(self, paths: list[str], timeout: float = 60.0) -> dict[str, int]:
        """Re-import the modules loaded from ``paths`` (relative to the synced folder)."""
        meta, _ = self._connection.request(Op.JOB_RELOAD, {"paths": list(paths)}, timeout=timeout)
        return {str(k): int(v) for k, v in meta["reloaded"].items()}

    @property
    def connection(self) -> GatewayConnection:
        return self._connection

    @property
    def names(self) -> list[str]:
        return list(self._meshes)

    def __getattr__(self, name: str) -> HostMeshProxy:
        meshes = self.__dict__.get("_meshes", {})
        if name in meshes:
            return meshes[name]
        raise AttributeError(f"no host mesh named {name!r}; this job has {sorted(meshes)}")

    def __getitem__(self, name: str) -> HostMeshProxy:
        try:
            return self._meshes[name]
        except KeyError:
            raise KeyError(
                f"no host mesh named {name!r}; this job has {sorted(self._meshes)}"
            ) from None

    def flush_output(self, timeout: float = 10.0) -> None:
        """Wait until worker output produced so far has reached this client."""
        self._connection.request(Op.JOB_FLUSH_OUTPUT, {}, timeout=timeout)

    def close(self) -> None:
        """Flush worker output, end the session (freeing its meshes) and disconnect."""
        try:
            with contextlib.suppress(ProxyError, TimeoutError):
                self.flush_output()
            self._connection.close()
        finally:
            if self._on_close is not None:
                self._on_close()

    def __enter__(self) -> JobState:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"JobState({', '.join(f'{n}={m.extent!r}' for n, m in self._meshes.items())})"


def connect(url: str, token: str | None = None, **options: Any) -> JobState:
    """Open a session with a gateway and return its host meshes."""
    return JobState.fetch(GatewayConnection.open(url, token, **options))
