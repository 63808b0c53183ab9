"""``KubernetesJob``: a Monarch job on Kubernetes, driven from a laptop through one gateway.

    job = KubernetesJob(compute=kt.Compute(cpus="4", replicas=2))   # or selector={...}, or name=
    state = job.state()              # creates the MonarchMesh, waits, connects, syncs the code
    actors = state.workers.spawn_procs(per_host={"gpus": 1}).spawn("t", Trainer)
    job.sync()                       # edit -> push -> reload, through the same gateway
    job.kill()                       # removes what this job created, and nothing else

The MonarchMesh gets a gateway (``spec.gateway``) and sync agents (``spec.sync``); the operator
makes the pods. From outside the cluster the gateway is reached by a port-forward made with the
official Python client (no kubectl); ``MONARCH_GATEWAY_URL`` (an ingress) takes precedence, and
inside the cluster the gateway's Service is dialled directly.
"""

from __future__ import annotations

import contextlib
import os
import queue
import secrets
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kubernetes.client.exceptions import ApiException

from monarch_k8s.cluster import MeshApi, new_client_factory
from monarch_k8s.errors import (
    AuthenticationError,
    InvalidJobError,
    MeshNotReadyError,
    WorkerPodLostError,
)
from monarch_k8s.names import (
    APP_LABEL,
    GATEWAY_APP,
    GATEWAY_PORT,
    MESH_LABEL,
    TOKEN_KEY,
    WORKER_PORT,
    gateway_name,
    token_secret_name,
    worker_labels,
)
from monarch_k8s.pods import lost_reason, not_ready_reasons, progress
from monarch_k8s.spec import (
    JOB_LABEL,
    MeshSpec,
    attach_manifest,
    check_name,
    mesh_manifest,
    setup_files,
    to_spec,
)
from monarch_k8s.tunnel import PortForward
from monarch_proxy import GatewayConnection, JobState, SyncResult
from monarch_proxy.job import Job, state_is_open

__all__ = ["KubernetesJob", "git_root"]

#: ``state().workers`` is the mesh, as in kubetorch's job (the gateway names it after the
#: MonarchMesh, so ``state().<mesh name>`` works too)
MESH_ALIAS = "workers"
POLL_S = 0.25


def git_root(start: str | Path = ".") -> Path | None:
    """The enclosing git work tree of ``start`` (the default folder to sync), or None."""
    path = Path(start).resolve()
    for folder in (path, *path.parents):
        if (folder / ".git").exists():
            return folder
    return None


def _stderr(message: str) -> None:
    print(f"[monarch-k8s] {message}", file=sys.stderr, flush=True)


class KubernetesJob(Job):
    """A Monarch job on Kubernetes: new pods (``compute``), existing pods (``selector``), or an
    existing MonarchMesh by ``name``. ``state().workers`` is a :class:`monarch_proxy.HostMeshProxy`.

    The job contract of :class:`monarch_proxy.job.Job`: a job named after a MonarchMesh that
    exists (made by another process, or the operator's user) reuses it.
    """

    def __init__(
        self,
        compute: Any = None,
        selector: dict[str, str] | None = None,
        name: str | None = None,
        namespace: str = "default",
        monarch_port: int = WORKER_PORT,
        use_websocket: bool = True,
        sync_dirs: list[str] | None = None,
        *,
        token: str | None = None,
        api_client: Any = None,
        kubeconfig: str | None = None,
        context: str | None = None,
        timeout: float = 600.0,
        log: Callable[[str], None] | None = _stderr,
    ) -> None:
        if compute is not None and selector is not None:
            raise InvalidJobError("pass compute= (new pods) or selector= (existing pods), not both")
        if not use_websocket:
            raise InvalidJobError("the gateway speaks WebSocket only; leave use_websocket=True")
        self.spec: MeshSpec | None = to_spec(compute) if compute is not None else None
        self.selector = dict(selector) if selector else None
        if self.spec is None and self.selector is None and name is None:
            raise InvalidJobError(
                "KubernetesJob needs compute= (new pods), selector= (existing pods) "
                "or name= (an existing MonarchMesh)"
            )
        super().__init__(check_name(name) if name else f"monarch{secrets.token_hex(4)}")
        self.namespace = namespace
        self.monarch_port = monarch_port
        self.sync_dirs = sync_dirs
        self.timeout = timeout
        self._token = token
        self._log = log or (lambda message: None)
        self._make_client = new_client_factory(api_client, kubeconfig, context)
        self._mesh = MeshApi(self._make_client(), namespace)
        self._id = secrets.token_hex(4)
        self._created = False
        self._added_gateway = False
        self._wait_timeout = timeout
        self._kill_wait: tuple[bool, float] = (True, 120.0)
        self._tunnel: PortForward | None = None
        self._pod_ips: dict[str, tuple[str, str]] = {}  # pod IP -> (name, uid)
        self._lost: queue.Queue[dict[str, Any]] = queue.Queue()
        self.lost_workers: list[WorkerPodLostError] = []
        self._staging: Path | None = None
        self._stopped = threading.Event()
        #: seconds from the last state() call to each phase it went through (for benchmarks):
        #: objects_created, pods_running, pods_ready, attached, synced
        self.timings: dict[str, float] = {}
        self._t0 = 0.0

    # -- the job contract -------------------------------------------------------------------

    def _is_running(self) -> bool:
        """A MonarchMesh of this name exists: reuse it (fronted by a gateway)."""
        existing = self._mesh.get(self.name)
        if existing is None:
            return False
        self._created = (existing["metadata"].get("labels") or {}).get(JOB_LABEL) is not None
        self._log(f"reusing MonarchMesh {self.namespace}/{self.name}")
        spec = existing.get("spec") or {}
        if not spec.get("gateway") and not spec.get("workerSelector"):
            # an upstream-style mesh: front it with a gateway, which kill() takes away again
            self._mesh.patch(self.name, {"spec": {"gateway": {"enabled": True}}})
            self._added_gateway = True
            self._log(f"added a gateway to MonarchMesh {self.name} (removed again by kill())")
        return True

    def _create(self) -> None:
        """Create the MonarchMesh, without waiting for it."""
        if self.spec is None and self.selector is None:
            raise InvalidJobError(
                f"no MonarchMesh {self.name!r} in namespace {self.namespace!r}: "
                "pass compute= to create one, or check the name and namespace"
            )
        if self.selector is not None:
            body = attach_manifest(
                self.name, self.namespace, self.selector, port=self.monarch_port, job_id=self._id
            )
            self._mesh.create(body)
        else:
            assert self.spec is not None
            data, files = setup_files(self.spec)
            configmap = f"{self.name}-setup-files" if files else None
            body = mesh_manifest(
                self.name, self.namespace, self.spec, port=self.monarch_port, job_id=self._id,
                files_configmap=configmap, files=files,
            )  # fmt: skip
            created = self._mesh.create(body)
            if configmap:
                self._create_files(configmap, data, created)
        self._created = True
        self._log(f"created MonarchMesh {self.namespace}/{self.name}")

    def state(self, timeout: float | None = None) -> JobState:
        """Create or find the mesh, wake it, wait for it, connect and sync; reused once open."""
        if self._state is not None and state_is_open(self._state):
            self._mesh.touch(self.name)
            return self._state
        self._t0, self.timings = time.perf_counter(), {}
        self._wait_timeout = timeout if timeout is not None else self.timeout
        return super().state()

    def _connect(self) -> JobState:
        self._mesh.touch(self.name)  # wakes a mesh the operator scaled to zero for idleness
        self._mark("objects_created")
        mesh = self._wait(self._wait_timeout)
        state = self._attach(mesh)
        self._mark("attached")
        self._sync_dirs(state)
        self._mark("synced")
        return state

    def _mark(self, phase: str) -> None:
        self.timings.setdefault(phase, time.perf_counter() - self._t0)

    def sync(self, reload: bool = True) -> SyncResult:
        """Push ``sync_dirs`` through the gateway and reload what changed in running actors."""
        state = self.state()
        result = self._sync_dirs(state, reload=reload)
        if result is None:
            raise InvalidJobError("nothing to sync: pass sync_dirs= (no git root found here)")
        return result

    def kill(self, wait: bool = True, timeout: float = 120.0) -> None:
        """Close the connection and delete what this job created; pods of a selector or of a
        MonarchMesh this job did not create are left alone (and we say so)."""
        self._kill_wait = (wait, timeout)
        super().kill()

    def _kill(self) -> None:
        wait, timeout = self._kill_wait
        self._close()
        if not self._created:
            if self._added_gateway:
                self._mesh.patch(self.name, {"spec": {"gateway": None}})
                self._added_gateway = False
                self._log(f"removed the gateway this job added to MonarchMesh {self.name}")
            self._log(f"left MonarchMesh {self.namespace}/{self.name}: this job did not create it")
            return
        self._mesh.delete(self.name)
        if self.selector is not None:
            count = len(self._mesh.pods(self.selector))
            self._log(
                f"deleted the gateway MonarchMesh {self.name}; left the {count} pods matching "
                f"{self.selector} running (not created by this job)"
            )
        else:
            self._log(f"deleted MonarchMesh {self.namespace}/{self.name} and its pods")
        self._created = False
        if wait:
            self._wait_gone(timeout)

    # -- waiting ----------------------------------------------------------------------------

    def _worker_selector(self, mesh: dict[str, Any]) -> dict[str, str]:
        selector = (mesh.get("spec") or {}).get("workerSelector")
        if selector:
            return dict(selector.get("matchLabels") or {})
        return worker_labels(self.name)

    def _gateway_selector(self, mesh: dict[str, Any]) -> dict[str, str]:
        service = self._mesh.service(self._gateway_service(mesh))
        if service and (service.get("spec") or {}).get("selector"):
            return dict(service["spec"]["selector"])
        return {APP_LABEL: GATEWAY_APP, MESH_LABEL: self.name}

    @staticmethod
    def _status_gateway(mesh: dict[str, Any]) -> dict[str, Any]:
        return dict((mesh.get("status") or {}).get("gateway") or {})

    def _gateway_service(self, mesh: dict[str, Any]) -> str:
        status = self._status_gateway(mesh)
        return str(status.get("serviceName") or status.get("service") or gateway_name(self.name))

    def _wait(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        said = ""
        touched = time.monotonic()
        while True:
            mesh = self._mesh.get(self.name)
            if mesh is None:
                raise InvalidJobError(f"MonarchMesh {self.namespace}/{self.name} was deleted")
            spec = mesh.get("spec") or {}
            idle = spec.get("idleTimeoutSeconds")
            if idle and time.monotonic() - touched > min(30.0, idle / 4):
                self._mesh.touch(self.name)  # waiting is use: no scale-down before we connect
                touched = time.monotonic()
            selector = self._worker_selector(mesh)
            workers = self._mesh.pods(selector)
            gateways = self._mesh.pods(self._gateway_selector(mesh))
            replicas = len(workers) if spec.get("workerSelector") else int(spec.get("replicas", 1))
            now = progress(workers)
            gateway_ready = progress(gateways).ready > 0
            message = f"{self.name}: {now.describe(replicas)}; gateway {'ready' if gateway_ready else 'starting'}"
            if message != said:
                self._log(message)
                said = message
            if now.running >= replicas:
                self._mark("pods_running")
            if gateway_ready and now.ready >= max(replicas, 1):
                self._mark("pods_ready")
                self._remember_pods(workers)
                return mesh
            if time.monotonic() > deadline:
                events = self._mesh.events()
                reasons = not_ready_reasons(workers, events, replicas, owner=self.name)
                reasons.update(
                    {f"{k} (gateway)": v for k, v in not_ready_reasons(gateways, events).items()}
                )
                if not gateways:
                    reasons["(gateway)"] = (
                        "no gateway pod: is the operator running? "
                        "kubectl get pods -A -l app.kubernetes.io/name=monarch-operator"
                    )
                detail = "; ".join(f"{pod}: {why}" for pod, why in reasons.items())
                raise MeshNotReadyError(
                    f"MonarchMesh {self.namespace}/{self.name} not ready after {timeout:g}s "
                    f"({now.describe(replicas)}): {detail}",
                    reasons,
                )
            time.sleep(POLL_S)

    def _wait_gone(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        labels = worker_labels(self.name) if self.selector is None else None
        while time.monotonic() < deadline:
            left = self._mesh.get(self.name) is not None
            if labels is not None:
                left = left or bool(self._mesh.pods(labels))
            left = left or bool(self._mesh.pods({APP_LABEL: GATEWAY_APP, MESH_LABEL: self.name}))
            if not left:
                return
            time.sleep(POLL_S)
        self._log(f"{self.name}: objects still terminating after {timeout:g}s")

    # -- connecting -------------------------------------------------------------------------

    def _token_for(self, mesh: dict[str, Any]) -> tuple[str, str]:
        if self._token is not None:
            return self._token, "token="
        if os.environ.get("MONARCH_GATEWAY_TOKEN"):
            return os.environ["MONARCH_GATEWAY_TOKEN"], "MONARCH_GATEWAY_TOKEN"
        status = self._status_gateway(mesh)
        secret = str(
            status.get("tokenSecret") or status.get("secret") or token_secret_name(self.name)
        )
        value = self._mesh.secret_value(secret, TOKEN_KEY)
        if value is None:
            raise InvalidJobError(
                f"the gateway token Secret {self.namespace}/{secret} (key {TOKEN_KEY!r}) is "
                "missing or unreadable: check the operator's logs and your RBAC for secrets"
            )
        return value, f"Secret {self.namespace}/{secret}"

    def _gateway_url(self, mesh: dict[str, Any]) -> str:
        if os.environ.get("MONARCH_GATEWAY_URL"):
            return os.environ["MONARCH_GATEWAY_URL"]
        status = self._status_gateway(mesh)
        port = int(status.get("port") or GATEWAY_PORT)
        host = f"{self._gateway_service(mesh)}.{self.namespace}.svc"
        if os.environ.get("KUBERNETES_SERVICE_HOST") and _resolves(host):
            return f"ws://{host}:{port}"
        self._tunnel = PortForward(
            self._make_client, self.namespace, lambda: self._gateway_pod(port)
        )
        return f"ws://{self._tunnel.address}"

    def _gateway_pod(self, port: int) -> tuple[str, int]:
        """A Ready gateway pod and its port (the Service's target port), for each new stream."""
        mesh = self._mesh.get(self.name) or {}
        service = self._mesh.service(self._gateway_service(mesh)) or {}
        target: Any = port
        for entry in (service.get("spec") or {}).get("ports") or []:
            target = entry.get("targetPort") or entry.get("port") or port
            break
        pods = self._mesh.pods(self._gateway_selector(mesh))
        ready = [
            p for p in pods if progress([p]).ready and not p["metadata"].get("deletionTimestamp")
        ]
        if not ready:
            raise MeshNotReadyError(f"no Ready gateway pod for {self.name}", {})
        pod = ready[0]
        if isinstance(target, str):  # a named port: find it in the pod's containers
            for container in pod["spec"]["containers"]:
                for p in container.get("ports") or []:
                    if p.get("name") == target:
                        target = p["containerPort"]
        return pod["metadata"]["name"], int(target)

    def _attach(self, mesh: dict[str, Any]) -> JobState:
        token, source = self._token_for(mesh)
        url = self._gateway_url(mesh)
        self._log(f"{self.name}: connecting to the gateway at {url}")
        try:
            connection = GatewayConnection.open(url, token)
        except AuthenticationError as exc:
            self._close()
            raise AuthenticationError(
                f"the gateway of {self.namespace}/{self.name} refused the token from {source}: "
                f"{exc}; unset MONARCH_GATEWAY_TOKEN or pass the token in Secret "
                f"{token_secret_name(self.name)}"
            ) from exc
        except BaseException:
            self._close()
            raise
        fetched = JobState.fetch(connection)
        meshes = {name: fetched[name] for name in fetched.names}
        if MESH_ALIAS not in meshes and len(meshes) == 1:
            meshes = {MESH_ALIAS: next(iter(meshes.values())), **meshes}
        state = JobState(connection, meshes)
        replicas = self._expected_workers(mesh)
        self._wait_attached(state, replicas)
        state.on_membership(self._lost.put)
        self._stopped.clear()
        threading.Thread(target=self._report_lost, name="monarch-k8s-lost", daemon=True).start()
        return state

    def _expected_workers(self, mesh: dict[str, Any]) -> int:
        return len(self._pod_ips)

    def _wait_attached(self, state: JobState, replicas: int) -> None:
        deadline = time.monotonic() + self.timeout
        while True:
            members = state.members()
            listed = members.get("meshes") or {}
            if self.name in listed:
                workers = len(listed[self.name].get("workers") or [])
            else:  # a gateway without membership: its mesh is as big as it started
                workers = max((state[n].size() for n in state.names), default=0)
            if members.get("whole") and workers >= replicas:
                self._log(f"{self.name}: {workers} workers attached")
                return
            if time.monotonic() > deadline:
                raise MeshNotReadyError(
                    f"{self.name}: only {workers} of {replicas} workers attached to the gateway "
                    f"after {self.timeout:g}s: {members}",
                    {},
                )
            time.sleep(POLL_S)

    def _remember_pods(self, pods: list[dict[str, Any]]) -> None:
        for pod in pods:
            ip = (pod.get("status") or {}).get("podIP")
            if ip:
                self._pod_ips[ip] = (pod["metadata"]["name"], pod["metadata"]["uid"])

    def _report_lost(self) -> None:
        """Name lost workers' pods and why Kubernetes says they went (off the I/O thread)."""
        while not self._stopped.is_set():
            try:
                event = self._lost.get(timeout=1.0)
            except queue.Empty:
                continue
            for address in event.get("lost") or []:
                self._explain_lost(str(address))
            for old, new in (event.get("replaced") or {}).items():
                self._log(f"{self.name}: worker {old} replaced by {new}; re-attached")
                with contextlib.suppress(Exception):
                    selector = self._worker_selector(self._mesh.get(self.name) or {})
                    self._remember_pods(self._mesh.pods(selector))

    def _explain_lost(self, address: str) -> None:
        host = address.split("://")[-1].rsplit(":", 1)[0]
        name, uid = self._pod_ips.get(host, (address, ""))
        try:
            pods = [
                p
                for p in self._mesh.pods(worker_labels(self.name))
                if p["metadata"]["name"] == name
            ]
            pod = pods[0] if pods and pods[0]["metadata"]["uid"] == uid else None
            events = [
                e
                for e in self._mesh.events()
                if not uid or (e.get("involvedObject") or {}).get("uid") == uid
            ]
            reason = lost_reason(pod, events, name)
        except ApiException as exc:
            reason = f"unknown (the API server said {exc.status})"
        error = WorkerPodLostError(
            f"worker pod {self.namespace}/{name} ({address}) was lost: {reason}", name, reason
        )
        self.lost_workers.append(error)
        self._log(f"{self.name}: {error}; waiting for its replacement")

    # -- sync -------------------------------------------------------------------------------

    def _dirs(self) -> list[Path]:
        if self.sync_dirs is not None:
            return [Path(d).resolve() for d in self.sync_dirs]
        root = git_root()
        return [root] if root is not None else []

    def _sync_dirs(self, state: JobState, reload: bool = True) -> SyncResult | None:
        dirs = self._dirs()
        if not dirs:
            return None
        mesh = self._mesh.get(self.name) or {}
        if not (mesh.get("spec") or {}).get("sync"):
            self._log(
                f"{self.name}: spec.sync is off on this mesh, so {[str(d) for d in dirs]} are "
                "not pushed (set spec.sync.enabled: true to sync code to the workers)"
            )
            return None
        src = dirs[0] if len(dirs) == 1 else self._stage(dirs)
        result = state.sync(str(src), reload=reload)
        self._log(
            f"{self.name}: synced {len(result.changed)} changed files in {result.push_s:.2f}s"
            + (f", reloaded {sorted(result.reloaded)}" if result.reloaded else "")
        )
        return result

    def _stage(self, dirs: list[Path]) -> Path:
        """Several folders are one tree on the workers, each under its own name (hard links)."""
        if self._staging is None:
            self._staging = Path(tempfile.mkdtemp(prefix="monarch-k8s-sync-"))
        for folder in dirs:
            target = self._staging / folder.name
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(folder, target, copy_function=_link_or_copy, dirs_exist_ok=True)
        return self._staging

    # -- cleanup ----------------------------------------------------------------------------

    def _create_files(self, configmap: str, data: dict[str, str], owner: dict[str, Any]) -> None:
        meta = owner["metadata"]
        body: Any = {
            "metadata": {
                "name": configmap,
                "labels": {JOB_LABEL: self._id},
                "ownerReferences": [
                    {
                        "apiVersion": owner["apiVersion"],
                        "kind": owner["kind"],
                        "name": meta["name"],
                        "uid": meta["uid"],
                        "controller": False,
                    }
                ],
            },
            "binaryData": data,
        }
        self._mesh.core.create_namespaced_config_map(self.namespace, body)

    def _close(self) -> None:
        self._stopped.set()
        state, self._state = self._state, None
        if state is not None:
            with contextlib.suppress(Exception):
                state.close()
        if self._tunnel is not None:
            self._tunnel.close()
            self._tunnel = None
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None

    def __repr__(self) -> str:
        mode = "selector" if self.selector else "compute" if self.spec else "name"
        return f"KubernetesJob({self.namespace}/{self.name}, {mode})"


def _resolves(host: str) -> bool:
    try:
        socket.getaddrinfo(host, None)
    except OSError:
        return False
    return True


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
