"""A small JSON-over-HTTPS client for the kubelet's own API traffic.

The kubelet reads and writes plain dicts at high rates (status patches, watches), so it
talks REST directly instead of going through the generated client's model classes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode

import urllib3

__all__ = ["ApiError", "RestClient"]


class ApiError(Exception):
    """The API server answered with an error status; ``status`` holds the HTTP code."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:500]}")
        self.status = status
        self.body = body


class RestClient:
    """Bearer-token client for one API server, verifying it against ``ca_file``."""

    def __init__(self, server: str, token: str, *, ca_file: str) -> None:
        self.server = server.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        self._pool = urllib3.PoolManager(
            cert_reqs="CERT_REQUIRED",
            ca_certs=ca_file,
            maxsize=8,
            retries=False,
            timeout=urllib3.Timeout(30),
        )

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = "application/json",
        query: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        headers = dict(self._headers)
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = content_type
        resp = self._pool.request(
            method, self.server + path + _qs(query), body=data, headers=headers
        )
        text = resp.data.decode()
        if resp.status >= 400:
            raise ApiError(resp.status, text)
        return json.loads(text) if text else {}

    def text(self, path: str) -> str:
        """GET a non-JSON endpoint such as ``/readyz``; raises ApiError unless 2xx."""
        resp = self._pool.request("GET", self.server + path, headers=self._headers)
        if resp.status >= 300:
            raise ApiError(resp.status, resp.data.decode())
        return str(resp.data.decode())

    def get(self, path: str, **query: str) -> dict[str, Any]:
        return self.request("GET", path, query=query or None)

    def merge_patch(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return self.request("PATCH", path, body, content_type="application/merge-patch+json")

    def watch(self, path: str, **query: str) -> Iterator[dict[str, Any]]:
        """Yield watch events (``{"type", "object"}``) until the server ends the stream."""
        resp = self._pool.request(
            "GET",
            self.server + path + _qs({**query, "watch": "true"}),
            headers=self._headers,
            preload_content=False,
            timeout=urllib3.Timeout(connect=10, read=None),
        )
        try:
            if resp.status >= 400:
                raise ApiError(resp.status, resp.read().decode())
            buffer = b""
            for chunk in resp.stream(65536, decode_content=True):
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if line.strip():
                        yield json.loads(line)
        finally:
            resp.release_conn()


def _qs(query: dict[str, str] | None) -> str:
    return "?" + urlencode(query) if query else ""
