"""Where the gateway learns its workers' addresses, now and as they change.

A source answers one question, "which worker addresses are listed right now?", whenever the
gateway asks (every ``--poll`` seconds); what to do with the answer is decided in
:mod:`monarch_gateway.membership`. ``None`` means "cannot tell right now" (a DNS outage, the
API server unreachable): the gateway then keeps what it has.

- :class:`StaticSource`: a fixed list (``--mesh NAME=ADDR,...``).
- :class:`FileSource`: one address per line in a file that something else rewrites
  (``--mesh-file NAME=PATH``; the local default uses it).
- :class:`DnsSource`: the ``A`` records of a name, e.g. a headless Service
  (``--mesh-dns NAME=HOST:PORT``), resolved again at every poll.
- :class:`KubernetesSource`: the Ready pods matching a label selector in one namespace
  (``--mesh-selector NAME=NAMESPACE/SELECTOR:PORT``), kept by a list+watch with the official
  ``kubernetes`` client (``pip install monarch-gateway[kubernetes]``; RBAC: get, list and watch
  on ``pods`` in that namespace).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from pathlib import Path
from typing import Any, Protocol

from monarch_gateway.monitor import WORKER_NAMES

__all__ = [
    "DnsSource",
    "FileSource",
    "KubernetesSource",
    "StaticSource",
    "WorkerSource",
    "parse_source",
]

logger = logging.getLogger("monarch_gateway.sources")


class WorkerSource(Protocol):
    async def addresses(self) -> list[str] | None:
        """The worker addresses listed now, in a stable order; None if unknown right now."""
        ...

    def close(self) -> None: ...


class StaticSource:
    def __init__(self, addresses: list[str]) -> None:
        self._addresses = list(addresses)

    async def addresses(self) -> list[str] | None:
        return list(self._addresses)

    def close(self) -> None:
        pass


class FileSource:
    """Lines of ``tcp://host:port``; blank lines and ``#`` comments are ignored."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    async def addresses(self) -> list[str] | None:
        try:
            text = self.path.read_text()
        except OSError:
            return None
        lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
        return [line for line in lines if line]

    def close(self) -> None:
        pass


class DnsSource:
    """``tcp://<each A record>:port`` for a name, sorted (a headless Service's pod IPs)."""

    def __init__(self, name: str, port: int) -> None:
        self.name, self.port = name, port

    async def addresses(self) -> list[str] | None:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(
                self.name, self.port, family=socket.AF_INET, type=socket.SOCK_STREAM
            )
        except OSError:
            return None
        ips = sorted({str(info[4][0]) for info in infos}, key=socket.inet_aton)
        return [f"tcp://{ip}:{self.port}" for ip in ips]

    def close(self) -> None:
        pass


def pod_address(pod: Any, port: int) -> str | None:
    """``tcp://podIP:port`` for a Ready, running pod that is not being deleted, else None."""
    status, meta = pod.status, pod.metadata
    if meta.deletion_timestamp is not None or status is None or not status.pod_ip:
        return None
    ready = any(c.type == "Ready" and c.status == "True" for c in status.conditions or [])
    return f"tcp://{status.pod_ip}:{port}" if ready and status.phase == "Running" else None


class KubernetesSource:
    """Ready pods matching ``selector`` in ``namespace``: a list, then a watch, in a thread.

    Credentials: the in-cluster service account, else the local kubeconfig (``KUBECONFIG``).
    """

    def __init__(self, namespace: str, selector: str, port: int, api: Any = None) -> None:
        self.namespace, self.selector, self.port = namespace, selector, port
        self._api = api
        self._pods: dict[str, str] = {}  # pod name -> address, Ready ones only
        self._synced = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _client(self) -> Any:
        if self._api is not None:
            return self._api
        try:
            from kubernetes import client, config
        except ImportError:
            raise RuntimeError(
                "--mesh-selector needs the kubernetes client: pip install "
                "'monarch-gateway[kubernetes]'"
            ) from None
        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        self._api = client.CoreV1Api()
        return self._api

    async def addresses(self) -> list[str] | None:
        if self._thread is None:
            self._client()  # fail at once (missing extra, no credentials), not in the thread
            self._thread = threading.Thread(target=self._run, name="k8s-pods", daemon=True)
            self._thread.start()
        with self._lock:
            if not self._synced:
                return None
            return [self._pods[name] for name in sorted(self._pods)]

    def _run(self) -> None:
        from kubernetes import watch

        api = self._client()
        while not self._stop.is_set():
            try:
                listed = api.list_namespaced_pod(self.namespace, label_selector=self.selector)
                with self._lock:
                    self._pods = {
                        p.metadata.name: a
                        for p in listed.items
                        if (a := pod_address(p, self.port)) is not None
                    }
                    self._synced = True
                    self._name(self._pods)
                stream = watch.Watch().stream(
                    api.list_namespaced_pod,
                    self.namespace,
                    label_selector=self.selector,
                    resource_version=listed.metadata.resource_version,
                    timeout_seconds=60,
                )
                for event in stream:
                    if self._stop.is_set():
                        return
                    pod = event["object"]
                    address = None if event["type"] == "DELETED" else pod_address(pod, self.port)
                    with self._lock:
                        if address is None:
                            self._pods.pop(pod.metadata.name, None)
                        else:
                            self._pods[pod.metadata.name] = address
                            self._name({pod.metadata.name: address})
            except Exception as exc:  # API server away or watch expired: list again shortly
                logger.warning("watching pods failed (%s); listing again", exc)
                self._stop.wait(1.0)

    def _name(self, pods: dict[str, str]) -> None:
        for name, address in pods.items():
            WORKER_NAMES[address] = f"pod {self.namespace}/{name}"

    def close(self) -> None:
        self._stop.set()


def parse_source(kind: str, value: str) -> tuple[str, WorkerSource]:
    """``NAME=...`` for ``--mesh-file``, ``--mesh-dns`` or ``--mesh-selector``."""
    name, sep, spec = value.partition("=")
    if not sep or not name or not spec:
        raise ValueError(f"expected NAME=..., got {value!r}")
    if kind == "file":
        return name, FileSource(spec)
    host, sep, port = spec.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"expected NAME=...:PORT, got {value!r}")
    if kind == "dns":
        return name, DnsSource(host, int(port))
    namespace, sep, selector = host.partition("/")
    if not sep or not namespace or not selector:
        raise ValueError(f"expected NAME=NAMESPACE/SELECTOR:PORT, got {value!r}")
    return name, KubernetesSource(namespace, selector, int(port))
