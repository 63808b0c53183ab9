"""The process kubelet: Nodes, a pod watch, and a sync loop over :class:`PodWorker` objects.

One kubelet process serves every Node of the test cluster (so pod IPs and the shared hosts
file are allocated in one place). The watch thread only keeps a cache of the pods bound to our
nodes and wakes the loop; the loop, a single thread, does everything else:

1. a new pod gets an IP and a worker; a pod being deleted is terminated (SIGTERM, then
   SIGKILL after its grace period) and finally deleted with grace 0, as a kubelet confirms;
2. each worker advances (reap, probe, start, restart with back-off);
3. the status each worker computes is merge-patched when it differs from the last one sent;
4. every ``heartbeat`` seconds the Nodes' Ready condition is refreshed, so the node
   lifecycle controller keeps them Ready.
"""

from __future__ import annotations

import base64
import logging
import os
import secrets
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from k8s_testenv.kubelet.api import ApiError, RestClient
from k8s_testenv.kubelet.events import EventRecorder
from k8s_testenv.kubelet.logs import LogServer
from k8s_testenv.kubelet.mounts import PodVolumes
from k8s_testenv.kubelet.network import IpPool, sandbox_support
from k8s_testenv.kubelet.objects import ApiSources, list_watch
from k8s_testenv.kubelet.podspec import PodNetwork, hostname_of, render_hosts
from k8s_testenv.kubelet.runtime import KubeletSettings, PodWorker
from k8s_testenv.kubelet.status import State, rfc3339
from k8s_testenv.kubelet.streaming import StreamingServer, pod_facts

__all__ = ["Kubelet", "KubeletConfig", "NodeSpec"]

log = logging.getLogger("k8s_testenv.kubelet")


@dataclass(frozen=True)
class NodeSpec:
    """A Node the kubelet registers, with the capacity the scheduler will see."""

    name: str
    cpu: str = "32"
    memory: str = "128Gi"
    gpus: int = 0
    pods: int = 256
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class KubeletConfig:
    """Everything the kubelet process needs; written as JSON by the cluster launcher."""

    server: str
    token: str
    ca_file: str
    workdir: str
    port: int
    cert: str
    key: str
    kube_version: str
    nodes: list[NodeSpec]
    settings: KubeletSettings = field(default_factory=KubeletSettings)
    heartbeat: float = 10.0
    pod_network: str = "127.10.0.0/16"
    #: the kubelet-streaming binary, which serves ``port`` (see kubelet/streaming.py)
    streaming_binary: str = ""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KubeletConfig:
        return cls(
            **{
                **data,
                "nodes": [NodeSpec(**n) for n in data["nodes"]],
                "settings": KubeletSettings(**data.get("settings", {})),
            }
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Kubelet:
    def __init__(self, config: KubeletConfig) -> None:
        self.config = config
        self.client = RestClient(config.server, config.token, ca_file=config.ca_file)
        self.nodes = {n.name: n for n in config.nodes}
        self.workdir = Path(config.workdir)
        self.pgid_dir = self.workdir / "pgids"
        self.hosts_file = self.workdir / "hosts"
        self.ips = IpPool(config.pod_network)
        self.sources = ApiSources(self.client)
        self.events = EventRecorder(self.client)
        # volume set-up waits on the API server (TokenRequests); pods do it side by side
        self.volume_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="volumes")
        self.workers: dict[str, PodWorker] = {}
        self._by_name: dict[tuple[str, str], PodWorker] = {}
        self._reported: dict[str, dict[str, Any]] = {}
        self._finalized: set[str] = set()
        self._pods: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._hosts_text = ""
        self._boot = time.time()
        server_port = config.server.rsplit(":", 1)[1]
        self.base_env = {
            **os.environ,
            "KUBERNETES_SERVICE_HOST": "127.0.0.1",
            "KUBERNETES_SERVICE_PORT": server_port,
        }

    # -- lifecycle -------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Register the nodes and serve until ``stop`` is set; then kill every pod."""
        self.pgid_dir.mkdir(parents=True, exist_ok=True)
        self._write_hosts()
        sandbox_support()  # probe once, before the first pod
        self.sources.start(stop)
        self.events.start(stop)
        token = secrets.token_hex(16)
        logs = LogServer(locate=self._locate, facts=self._facts, token=token)
        logs.start()
        streaming = StreamingServer(
            Path(self.config.streaming_binary),
            port=self.config.port,
            cert=Path(self.config.cert),
            key=Path(self.config.key),
            backend=f"http://127.0.0.1:{logs.port}",
            token=token,
        )
        try:
            streaming.start()
        except BaseException:
            logs.stop()
            raise
        for node in self.config.nodes:
            self._register(node)
        watcher = threading.Thread(target=self._watch, args=(stop,), daemon=True)
        watcher.start()
        last_beat = time.time()
        try:
            while not stop.is_set():
                self._wake.wait(0.1)
                self._wake.clear()
                now = time.time()
                self._sync(now)
                if now - last_beat >= self.config.heartbeat:
                    last_beat = now
                    for node in self.config.nodes:
                        self._node_status(node, now)
        finally:
            for worker in self.workers.values():
                worker.kill_now()
                if worker.volumes is not None:
                    worker.volumes.teardown()
            streaming.stop()
            logs.stop()

    # -- nodes -----------------------------------------------------------------------------
    def _register(self, node: NodeSpec) -> None:
        labels = {
            "kubernetes.io/hostname": node.name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            **node.labels,
        }
        body = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": node.name, "labels": labels},
        }
        try:
            self.client.request("POST", "/api/v1/nodes", body)
        except ApiError as exc:
            if exc.status != 409:
                raise
        self._node_status(node, time.time())

    def _node_status(self, node: NodeSpec, now: float) -> None:
        capacity = {"cpu": node.cpu, "memory": node.memory, "pods": str(node.pods)}
        if node.gpus:
            capacity["nvidia.com/gpu"] = str(node.gpus)
        stamp = rfc3339(now)

        def cond(kind: str, ok: bool, reason: str) -> dict[str, str]:
            status = "True" if ok else "False"
            return {
                "type": kind,
                "status": status,
                "reason": reason,
                "message": reason,
                "lastHeartbeatTime": stamp,
                "lastTransitionTime": rfc3339(self._boot),
            }

        status = {
            "capacity": capacity,
            "allocatable": capacity,
            "conditions": [
                cond("MemoryPressure", False, "KubeletHasSufficientMemory"),
                cond("DiskPressure", False, "KubeletHasNoDiskPressure"),
                cond("PIDPressure", False, "KubeletHasSufficientPID"),
                cond("Ready", True, "KubeletReady"),
            ],
            "addresses": [
                {"type": "InternalIP", "address": "127.0.0.1"},
                {"type": "Hostname", "address": node.name},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.config.port}},
            "nodeInfo": {
                "machineID": node.name,
                "systemUUID": node.name,
                "bootID": str(self._boot),
                "kernelVersion": os.uname().release,
                "osImage": "k8s-testenv process kubelet",
                "containerRuntimeVersion": "process://1",
                "kubeletVersion": self.config.kube_version,
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": "amd64",
            },
        }
        try:
            self.client.merge_patch(f"/api/v1/nodes/{node.name}/status", {"status": status})
        except ApiError as exc:
            log.warning("node %s status update failed: %s", node.name, exc)

    # -- pods ------------------------------------------------------------------------------
    def _watch(self, stop: threading.Event) -> None:
        def relist(items: Iterable[dict[str, Any]]) -> None:
            with self._lock:
                self._pods = {p["metadata"]["uid"]: p for p in items}
            self._wake.set()

        def change(kind: str, obj: dict[str, Any]) -> None:
            with self._lock:
                if kind == "DELETED":
                    self._pods.pop(obj["metadata"]["uid"], None)
                else:
                    self._pods[obj["metadata"]["uid"]] = obj
            self._wake.set()

        list_watch(
            self.client,
            "/api/v1/pods",
            stop,
            on_list=relist,
            on_event=change,
            fieldSelector="spec.nodeName!=",
        )

    def _sync(self, now: float) -> None:
        with self._lock:
            pods = dict(self._pods)
        hosts_dirty = False
        for uid, pod in pods.items():
            if pod["spec"].get("nodeName") not in self.nodes or uid in self._finalized:
                continue
            worker = self.workers.get(uid)
            deleting = pod["metadata"].get("deletionTimestamp") is not None
            if worker is None:
                if deleting:
                    self._finalize(uid, pod)
                    continue
                if pod.get("status", {}).get("phase") in ("Succeeded", "Failed"):
                    continue  # finished before this kubelet started
                worker = self._new_worker(pod, now)
                hosts_dirty = True
            worker.pod = pod
            if deleting:
                grace = pod["metadata"].get("deletionGracePeriodSeconds")
                worker.begin_termination(now, float(30 if grace is None else grace))
            worker.sync(now)
            if deleting and worker.terminated:
                self._report(worker, now)
                self._finalize(uid, pod)
            elif not deleting:
                self._report(worker, now)
        for uid in [u for u in self.workers if u not in pods]:
            self._drop(uid)
            hosts_dirty = True
        self._finalized &= set(pods)
        if hosts_dirty:
            self._write_hosts()

    def _new_worker(self, pod: dict[str, Any], now: float) -> PodWorker:
        meta = pod["metadata"]
        net = PodNetwork(
            pod_ip=self.ips.allocate(), host_ip="127.0.0.1", node_name=pod["spec"]["nodeName"]
        )
        root = self.workdir / "pods" / f"{meta['namespace']}_{meta['name']}_{meta['uid']}"
        volumes = PodVolumes(
            pod,
            root,
            net=net,
            sources=self.sources,
            node_memory=self.nodes[pod["spec"]["nodeName"]].memory,
            warn=lambda reason, message: self.events.warning(worker.pod, reason, message),
            executor=self.volume_pool,
            wake=self._wake.set,
        )
        worker = PodWorker(
            pod,
            net=net,
            root=root,
            hosts_file=self.hosts_file,
            base_env=self.base_env,
            lookup=self._lookup,
            settings=self.config.settings,
            pgid_dir=self.pgid_dir,
            now=now,
            volumes=volumes,
        )
        self.workers[meta["uid"]] = worker
        self._by_name[(meta["namespace"], meta["name"])] = worker
        return worker

    def _drop(self, uid: str) -> None:
        worker = self.workers.pop(uid)
        worker.kill_now()
        if worker.volumes is not None:
            worker.volumes.teardown()
        self.ips.release(worker.net.pod_ip)
        self._reported.pop(uid, None)
        key = (worker.pod["metadata"]["namespace"], worker.pod["metadata"]["name"])
        if self._by_name.get(key) is worker:
            del self._by_name[key]

    def _report(self, worker: PodWorker, now: float) -> None:
        status = worker.status(now)
        if self._reported.get(worker.uid) == status:
            return
        meta = worker.pod["metadata"]
        try:
            self.client.merge_patch(
                f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}/status",
                {"status": status},
            )
            self._reported[worker.uid] = status
        except ApiError as exc:
            if exc.status != 404:
                log.warning("status of %s/%s not updated: %s", meta["namespace"], meta["name"], exc)

    def _finalize(self, uid: str, pod: dict[str, Any]) -> None:
        """Confirm a graceful deletion once the pod's processes are gone (grace period 0)."""
        meta = pod["metadata"]
        body = {
            "kind": "DeleteOptions",
            "apiVersion": "v1",
            "gracePeriodSeconds": 0,
            "preconditions": {"uid": uid},
        }
        try:
            self.client.request(
                "DELETE", f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}", body
            )
        except ApiError as exc:
            if exc.status not in (404, 409):
                log.warning(
                    "final delete of %s/%s failed: %s", meta["namespace"], meta["name"], exc
                )
                return
        self._finalized.add(uid)
        if uid in self.workers:
            self._drop(uid)
            self._write_hosts()

    def _write_hosts(self) -> None:
        entries = {w.net.pod_ip: hostname_of(w.pod) for w in self.workers.values()}
        text = render_hosts(entries)
        if text == self._hosts_text:
            return
        # rewrite in place: pods see this inode through a bind mount
        with self.hosts_file.open("w") as f:
            f.write(text)
        self._hosts_text = text

    def _lookup(self, kind: str, namespace: str, name: str) -> dict[str, str] | None:
        obj = self.sources.object(kind, namespace, name)
        if obj is None:
            return None
        data = obj.get("data") or {}
        if kind == "secret":
            return {k: base64.b64decode(v).decode() for k, v in data.items()}
        return dict(data)

    def _facts(self, namespace: str, pod: str) -> dict[str, Any] | None:
        worker = self._by_name.get((namespace, pod))
        return None if worker is None else pod_facts(worker, namespaces=bool(sandbox_support()))

    def _locate(self, namespace: str, pod: str, container: str, previous: bool) -> Any:
        worker = self._by_name.get((namespace, pod))
        if worker is None:
            return None
        records = {r.name: r for r in [*worker.init_records, *worker.records]}
        record = records.get(container)
        if record is None:
            return None
        return worker.log_path(container, previous=previous), lambda: record.state is State.RUNNING
