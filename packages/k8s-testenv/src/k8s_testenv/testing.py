"""Small helpers for tests that drive the cluster: polling and looking at pod processes."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

from k8s_testenv.procs import alive as pid_alive  # a process exists and is not a zombie

__all__ = ["container_pid", "pid_alive", "wait_until"]

T = TypeVar("T")


def wait_until(
    check: Callable[[], T | None],
    *,
    timeout: float = 60,
    what: str = "condition",
    interval: float = 0.2,
) -> T:
    """Poll ``check`` every ``interval`` s until it returns something truthy, and return that;
    an AssertionError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def container_pid(pod: Any, index: int = 0) -> int:
    """The host pid of a running container; the process kubelet reports ``process://<pid>``."""
    container_id = pod.status.container_statuses[index].container_id
    return int(container_id.removeprefix("process://"))


def statefulset_manifest(
    name: str, replicas: int, containers: list[dict[str, Any]], *, grace_s: int = 5
) -> dict[str, Any]:
    """A StatefulSet whose pods all start at once (``Parallel``), labelled ``app=<name>``."""
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": name},
        "spec": {
            "serviceName": name,
            "replicas": replicas,
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"terminationGracePeriodSeconds": grace_s, "containers": containers},
            },
        },
    }
