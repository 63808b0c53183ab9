"""Pod Events, as ``kubectl describe pod`` shows them (core/v1 Events, source ``kubelet``).

Like client-go's ``EventCorrelator``, an Event repeated for the same object with the same type,
reason and message is not posted again: the first one's ``count`` and ``lastTimestamp`` are
patched. Posting happens on a background thread so the kubelet loop never waits on it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from k8s_testenv.kubelet.api import ApiError, RestClient
from k8s_testenv.kubelet.status import rfc3339

__all__ = ["EventRecorder"]

log = logging.getLogger("k8s_testenv.kubelet")
_MAX_KEYS = 4096  # client-go's LRU size for de-duplication


@dataclass
class _Seen:
    name: str
    count: int
    first: float


class EventRecorder:
    """Records Events about pods; :meth:`run` (a thread) posts them."""

    def __init__(self, client: RestClient, component: str = "kubelet") -> None:
        self.client = client
        self.component = component
        self._queue: queue.Queue[tuple[dict[str, Any], str, str, str, float]] = queue.Queue()
        self._seen: dict[tuple[str, str, str, str], _Seen] = {}

    def warning(self, pod: Mapping[str, Any], reason: str, message: str) -> None:
        """Record a Warning Event about ``pod`` (returns at once)."""
        self._queue.put((dict(pod), "Warning", reason, message, time.time()))

    def start(self, stop: threading.Event) -> None:
        threading.Thread(target=self.run, args=(stop,), daemon=True, name="events").start()

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                item = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                self._post(*item)
            except Exception as exc:  # an Event is best effort, as upstream
                log.warning("event not recorded: %s", exc)

    def _post(self, pod: dict[str, Any], kind: str, reason: str, message: str, now: float) -> None:
        meta = pod["metadata"]
        namespace = meta["namespace"]
        key = (meta["uid"], kind, reason, message)
        seen = self._seen.get(key)
        if seen is not None:
            seen.count += 1
            try:
                self.client.merge_patch(
                    f"/api/v1/namespaces/{namespace}/events/{seen.name}",
                    {"count": seen.count, "lastTimestamp": rfc3339(now)},
                )
                return
            except ApiError as exc:
                if exc.status != 404:
                    raise
        if len(self._seen) >= _MAX_KEYS:
            self._seen.pop(next(iter(self._seen)))
        node = pod.get("spec", {}).get("nodeName", "")
        seen = _Seen(f"{meta['name']}.{time.time_ns():x}", 1, now)
        self._seen[key] = seen
        self.client.request(
            "POST",
            f"/api/v1/namespaces/{namespace}/events",
            {
                "apiVersion": "v1",
                "kind": "Event",
                "metadata": {"name": seen.name, "namespace": namespace},
                "involvedObject": {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "namespace": namespace,
                    "name": meta["name"],
                    "uid": meta["uid"],
                    "resourceVersion": meta.get("resourceVersion", ""),
                },
                "reason": reason,
                "message": message,
                "type": kind,
                "source": {"component": self.component, "host": node},
                "reportingComponent": self.component,
                "reportingInstance": node,
                "firstTimestamp": rfc3339(seen.first),
                "lastTimestamp": rfc3339(now),
                "count": 1,
            },
        )
