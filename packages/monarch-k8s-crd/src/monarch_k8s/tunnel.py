"""A port-forward to a pod with the official Kubernetes Python client, on a loopback listener.

No kubectl: each connection accepted on ``127.0.0.1:<port>`` opens its own port-forward stream
(``kubernetes.stream.portforward``) to the pod, found anew each time, so a replaced gateway pod
is reached by the next (re)connection. Each stream gets its own ``ApiClient``: the client's
stream helpers patch ``api_client.request`` and would break a client shared across threads.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Callable

import kubernetes.client
from kubernetes.stream import portforward

__all__ = ["PortForward"]

logger = logging.getLogger("monarch_k8s.tunnel")
_CHUNK = 1 << 20


class PortForward:
    """Forward ``127.0.0.1:self.port`` to ``resolve()``'s (pod, port) in ``namespace``."""

    def __init__(
        self,
        make_client: Callable[[], kubernetes.client.ApiClient],
        namespace: str,
        resolve: Callable[[], tuple[str, int]],
    ) -> None:
        self._make_client = make_client
        self._namespace = namespace
        self._resolve = resolve
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._closed = False
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        threading.Thread(target=self._accept, name="monarch-k8s-forward", daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._bridge, args=(conn,), daemon=True).start()

    def _bridge(self, local: socket.socket) -> None:
        api = None
        forward = None
        try:
            pod, port = self._resolve()
            api = self._make_client()
            core = kubernetes.client.CoreV1Api(api)
            forward = portforward(
                core.connect_get_namespaced_pod_portforward, pod, self._namespace, ports=str(port)
            )
            remote = forward.socket(port)
            remote.setblocking(True)
        except Exception as exc:  # the client sees its connection close, and retries
            logger.warning("port-forward to the gateway failed: %s", exc)
            local.close()
            if api is not None:
                api.close()
            return
        with self._lock:
            self._open.update((local, remote))
        pumps = [
            threading.Thread(target=_pump, args=(a, b), daemon=True)
            for a, b in ((remote, local), (local, remote))
        ]
        for pump in pumps:
            pump.start()
        for pump in pumps:
            pump.join()
        with self._lock:
            self._open.difference_update((local, remote))
        for sock in (local, remote):
            sock.close()
        with contextlib.suppress(Exception):
            forward.close()
        api.close()

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        with self._lock:
            socks = list(self._open)
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def _pump(src: socket.socket, dst: socket.socket) -> None:
    """Copy ``src`` to ``dst``; when either side ends, end both (a WebSocket session is over
    once one direction is; the kubernetes client's stream does not carry half-closes)."""
    try:
        while True:
            data = src.recv(_CHUNK)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    for sock in (src, dst):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
