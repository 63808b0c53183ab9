"""The kubelet's HTTPS endpoint, so ``kubectl logs`` works through the API server.

kube-apiserver proxies ``pods/log`` to ``https://<node InternalIP>:<kubelet port>/containerLogs/
<namespace>/<pod>/<container>``; with no ``--kubelet-certificate-authority`` it does not verify
our certificate. Supported query parameters: ``tailLines``, ``previous``, ``follow``.
"""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

__all__ = ["LogServer"]

#: ``(namespace, pod, container, previous)`` -> (log file, is the container still running)
Locate = Callable[[str, str, str, bool], tuple[Path, Callable[[], bool]] | None]


class LogServer:
    """A TLS HTTP server answering ``/containerLogs`` and ``/healthz`` in a daemon thread."""

    def __init__(self, *, port: int, cert: Path, key: Path, locate: Locate) -> None:
        handler = _make_handler(locate)
        self._server = ThreadingHTTPServer(("127.0.0.1", port), handler)
        self._server.daemon_threads = True
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(cert), str(key))
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _make_handler(locate: Locate) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:  # quiet
            pass

        def do_GET(self) -> None:
            url = urlparse(self.path)
            parts = url.path.strip("/").split("/")
            if parts == ["healthz"]:
                self._reply(200, b"ok")
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

        def _reply(self, code: int, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler
