"""exec, attach and port-forward: the kubelet's streaming API, served by a Go helper.

``kubelet-streaming`` (``tools/k8s-testenv/cmd/kubelet-streaming``, built with the control plane)
listens with TLS on the kubelet port the Nodes advertise. It serves ``/exec``, ``/attach`` and
``/portForward`` with upstream's streaming library (SPDY/3.1 and the WebSocket channel
protocols) and proxies every other path to the :class:`~k8s_testenv.kubelet.logs.LogServer` on
a loopback port. For each request it asks that server for the pod's facts (:func:`pod_facts`):
the main pid of each container (exec enters its mount and UTS namespaces with ``nsenter``), the
environment the container was started with, its working directory, whether it runs, and the pod
IP (port-forward dials it).

The helper is the kubelet's child: it gets SIGKILL when the kubelet dies.
A container whose spec says ``stdin: true`` reads a FIFO (:func:`container_stdin`), which attach
writes to; other containers read /dev/null, and attach ignores the client's input for them.
"""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

from k8s_testenv.exceptions import StartupError
from k8s_testenv.kubelet.status import State

if TYPE_CHECKING:
    from k8s_testenv.kubelet.runtime import PodWorker

__all__ = ["TOKEN_ENV", "StreamingServer", "container_stdin", "pod_facts", "stdin_path"]

#: The helper reads the bearer token for the facts endpoint from this variable.
TOKEN_ENV = "K8S_TESTENV_STREAMING_TOKEN"


def stdin_path(root: Path, container: str) -> Path:
    return root / f"{container}.stdin"


def container_stdin(root: Path, container: dict[str, Any]) -> int:
    """The stdin to start a container with: a FIFO for ``stdin: true``, else ``DEVNULL``.

    The FIFO is opened read-write, so the container never reads EOF (as with ``stdinOnce:
    false``); the caller closes the returned descriptor once the process has started.
    """
    if not container.get("stdin"):
        return subprocess.DEVNULL
    path = stdin_path(root, container["name"])
    if not path.exists():
        os.mkfifo(path, 0o600)
    return os.open(path, os.O_RDWR)


def pod_facts(worker: PodWorker, *, namespaces: bool) -> dict[str, Any]:
    """What the streaming helper needs about a pod; ``namespaces``: containers run in their own
    mount and UTS namespaces (exec then enters them)."""
    meta, spec = worker.pod["metadata"], worker.pod["spec"]
    records = {r.name: r for r in [*worker.init_records, *worker.records]}
    containers: dict[str, dict[str, Any]] = {}
    for container in [*spec.get("initContainers", []), *spec.get("containers", [])]:
        name = container["name"]
        record = records[name]
        stdin = bool(container.get("stdin"))
        containers[name] = {
            "name": name,
            "running": record.state is State.RUNNING,
            "pid": int(record.extra.get("pid", 0)),
            "env": worker.envs.get(name, {}),
            "workingDir": container.get("workingDir") or str(worker.root),
            "tty": bool(container.get("tty")),
            "stdin": stdin,
            "stdinPath": str(stdin_path(worker.root, name)) if stdin else "",
            "logPath": str(worker.log_path(name)),
        }
    return {
        "uid": meta["uid"],
        "namespace": meta["namespace"],
        "name": meta["name"],
        "fullName": f"{meta['name']}_{meta['namespace']}",
        "podIP": worker.net.pod_ip,
        "namespaces": namespaces,
        "containers": containers,
    }


class StreamingServer:
    """The ``kubelet-streaming`` child process, serving TLS on ``port``."""

    def __init__(
        self, binary: Path, *, port: int, cert: Path, key: Path, backend: str, token: str
    ) -> None:
        self.binary = binary
        self.port = port
        self._argv = [
            str(binary),
            f"--listen=127.0.0.1:{port}",
            f"--cert={cert}",
            f"--key={key}",
            f"--backend={backend}",
        ]
        self._token = token
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15.0) -> None:
        """Start the helper (its output goes to the kubelet's log) and wait until it listens."""
        if not os.access(self.binary, os.X_OK):
            raise StartupError(
                "kubelet-streaming",
                f"{self.binary} is not an executable; run `k8s-testenv build` to build it",
            )
        # deferred imports: the runtime module imports this one
        from k8s_testenv.kubelet.runtime import kill_on_parent_death
        from k8s_testenv.procs import wait_for

        self._proc = subprocess.Popen(
            self._argv,
            stdin=subprocess.DEVNULL,
            env={**os.environ, TOKEN_ENV: self._token},
            preexec_fn=kill_on_parent_death,
        )
        why = wait_for(self._listening, timeout=timeout, pid=self._proc.pid)
        if why is not None:
            self.stop()
            raise StartupError("kubelet-streaming", why)

    def _listening(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), timeout=1):
            return True

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
