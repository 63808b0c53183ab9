"""A pod's "container" for the integration tests: an HTTP server on the pod IP.

It answers ``GET /`` with what the process sees: hostname, the address its hostname
resolves to, and selected environment variables, so tests can check the kubelet's sandbox.
``GET /bytes/N`` answers N bytes, byte i being ``i % 256``, and ``POST /sha256`` the SHA-256 of the
body, for transfers through port-forward. Requests are served concurrently.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PATTERN = bytes(range(256)) * 4096  # 1 MiB


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so round trips can be timed on one connection
    disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms delayed-ACK stall

    def do_GET(self) -> None:
        if self.path.startswith("/bytes/"):
            self._send_bytes(int(self.path.removeprefix("/bytes/")))
            return
        hostname = socket.gethostname()
        try:
            resolved = socket.gethostbyname(hostname)
        except OSError:
            resolved = ""
        body = json.dumps(
            {
                "hostname": hostname,
                "resolved": resolved,
                "pid": os.getpid(),
                "env": {k: v for k, v in os.environ.items() if k.startswith(("POD_", "MY_"))},
            }
        ).encode()
        self._reply(body)

    def do_POST(self) -> None:
        remaining = int(self.headers["Content-Length"])
        digest = hashlib.sha256()
        while remaining:
            chunk = self.rfile.read(min(remaining, 1 << 20))
            if not chunk:
                break
            digest.update(chunk)
            remaining -= len(chunk)
        self._reply(digest.hexdigest().encode())

    def _send_bytes(self, n: int) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(n))
        self.end_headers()
        sent = 0
        while sent < n:
            chunk = PATTERN[: min(len(PATTERN), n - sent)]
            self.wfile.write(chunk)
            sent += len(chunk)

    def _reply(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


if __name__ == "__main__":
    print(f"serving on {os.environ['POD_IP']}:8080", flush=True)
    ThreadingHTTPServer((os.environ["POD_IP"], 8080), Handler).serve_forever()
