"""A pod's "container" for the integration tests: an HTTP server on the pod IP.

It answers ``GET /`` with what the process sees: hostname, the address its hostname
resolves to, and selected environment variables, so tests can check the kubelet's sandbox.
"""

from __future__ import annotations

import json
import os
import socket
from http.server import BaseHTTPRequestHandler, HTTPServer


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
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
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


if __name__ == "__main__":
    print(f"serving on {os.environ['POD_IP']}:8080", flush=True)
    HTTPServer((os.environ["POD_IP"], 8080), Handler).serve_forever()
