"""The kubelet's log endpoint, so ``kubectl logs`` works through the API server.

kube-apiserver proxies ``pods/log`` to ``https://<node InternalIP>:<kubelet port>/containerLogs/
<namespace>/<pod>/<container>``; with no ``--kubelet-certificate-authority`` it does not verify
our certificate. The Go streaming helper (:mod:`k8s_testenv.kubelet.streaming`) terminates TLS on
that port and proxies these paths here, a plain-HTTP server on a loopback port. Supported query
parameters: ``tailLines``, ``previous``, ``follow``.

``/runtime/<namespace>/<pod>`` (only with the helper's bearer token) answers the pod's facts,
which the helper needs to exec into a container or port-forward to it.
"""

from __future__ import annotations

import hmac
import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

__all__ = ["LogServer"]

#: ``(namespace, pod, container, previous)`` -> (log file, is the container still running)
Locate = Callable[[str, str, str, bool], tuple[Path, Callable[[], bool]] | None]
#: ``(namespace, pod)`` -> the pod's runtime facts (JSON-able), or None for a pod not run here
Facts = Callable[[str, str], dict[str, Any] | None]


class LogServer:
    """A loopback HTTP server answering ``/containerLogs``, ``/healthz`` and ``/runtime``."""

    def __init__(self, *, locate: Locate, facts: Facts, token: str, port: int = 0) -> None:
        handler = _make_handler(locate, facts, token)
        self._server = ThreadingHTTPServer(("127.0.0.1", port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _make_handler(locate: Locate, facts: Facts, token: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:  # quiet
            pass

        def do_GET(self) -> None:
            url = urlparse(self.path)
            parts = url.path.strip("/").split("/")
            if parts == ["healthz"]:
                self._reply(200, b"ok")
                return
            if len(parts) == 3 and parts[0] == "runtime":
                self._facts(parts[1], parts[2])
                return
            if len(parts) != 4 or parts[0] != "containerLogs":
                self._reply(404, b"not found")
                return
            query = parse_qs(url.query)
            previous = query.get("previous", ["false"])[0] == "true"
            found = locate(parts[1], parts[2], parts[3], previous)
            if found is None or not found[0].exists():
                self._reply(404, f"no logs for {'/'.join(parts[1:])}".encode())
                return
            path, alive = found
            data = path.read_bytes()
            tail = query.get("tailLines", [None])[0]
            if tail is not None:
                lines = data.splitlines(keepends=True)
                data = b"".join(lines[-int(tail) :]) if int(tail) > 0 else b""
            follow = query.get("follow", ["false"])[0] == "true"
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            if not follow:
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            if follow:
                self._follow(path, path.stat().st_size, alive)

        def _follow(self, path: Path, offset: int, alive: Callable[[], bool]) -> None:
            try:
                with path.open("rb") as f:
                    f.seek(offset)
                    while True:
                        chunk = f.read(65536)
                        if chunk:
                            self.wfile.write(chunk)
                            self.wfile.flush()
                        elif not alive():
                            return
                        else:
                            time.sleep(0.2)
            except (BrokenPipeError, ConnectionResetError):
                return

        def _facts(self, namespace: str, pod: str) -> None:
            given = self.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                self._reply(403, b"forbidden")
                return
            found = facts(namespace, pod)
            if found is None:
                self._reply(404, b"pod does not exist")
                return
            self._reply(200, json.dumps(found).encode())

        def _reply(self, code: int, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler
