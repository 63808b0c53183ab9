"""The embedded local default: N worker processes on 127.0.0.x and a gateway, on this machine.

    from monarch_gateway.local import start_local
    with start_local(hosts=4) as job:
        procs = job.hosts.spawn_procs(per_host={"gpus": 2})

Workers and the gateway are real processes, exactly as in a cluster; only the addresses are
loopback ones. Each worker gets its own 127.0.0.x address, as each pod gets its own IP.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from monarch_proxy import GatewayConnection, JobState, connect

READY_TIMEOUT_S = 120.0


def worker_endpoint(index: int) -> tuple[str, int]:
    """A free loopback address for worker ``index``: its own 127.0.0.x where the system routes
    all of 127/8 to loopback (Linux), else 127.0.0.1 (macOS has only that one by default)."""
    for host in (f"127.0.0.{index + 2}", "127.0.0.1"):
        with socket.socket() as sock:
            try:
                sock.bind((host, 0))
            except OSError:
                continue
            return host, int(sock.getsockname()[1])
    raise OSError("no loopback address is available for a local worker")


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment, with its import path, so workers import what we import."""
    env = dict(os.environ)
    paths = [os.getcwd(), *(p for p in sys.path if p and os.path.isdir(p))]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env.update(extra or {})
    return env


class LocalCluster:
    """Worker processes and a gateway process on loopback; stop them with :meth:`close`."""

    def __init__(
        self,
        hosts: int = 2,
        *,
        mesh: str = "hosts",
        token: str | None = None,
        log_dir: str | None = None,
        stream_output: bool = True,
        resume_grace_s: float = 30.0,
        gateway_args: list[str] | None = None,
    ) -> None:
        if hosts < 1 or hosts > 250:
            raise ValueError(f"hosts must be between 1 and 250, got {hosts}")
        self.hosts = hosts
        self.mesh = mesh
        self.token = token or secrets.token_urlsafe(24)
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="monarch-local-"))
        self.stream_output = stream_output
        self.resume_grace_s = resume_grace_s
        self.gateway_args = list(gateway_args or [])  # extra `monarch-gateway serve` flags
        self.addresses: list[str] = []
        self.workers: list[subprocess.Popen[bytes]] = []
        self.gateway: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self) -> LocalCluster:
        atexit.register(self.close)
        try:
            self._start_workers()
            self._start_gateway()
        except BaseException:
            self.close()
            raise
        return self

    def _spawn(
        self, argv: list[str], name: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        # Log files, never pipes: a child blocks once a pipe nobody reads fills up.
        with (
            open(self.log_dir / f"{name}.out", "wb") as out,
            open(self.log_dir / f"{name}.log", "wb") as err,
        ):
            return subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=child_env(env),
                start_new_session=True,
            )

    def _start_workers(self) -> None:
        for i in range(self.hosts):
            host, port = worker_endpoint(i)
            address = f"tcp://{host}:{port}"
            self.addresses.append(address)
            self.workers.append(
                self._spawn(
                    [sys.executable, "-m", "monarch_gateway.worker", address], f"worker-{i}"
                )
            )

    def _start_gateway(self) -> None:
        ready = self.log_dir / "gateway.ready"
        argv = [
            sys.executable,
            "-m",
            "monarch_gateway",
            "serve",
            "--mesh",
            f"{self.mesh}={','.join(self.addresses)}",
            "--port",
            "0",
            "--ready-file",
            str(ready),
            "--resume-grace",
            str(self.resume_grace_s),
        ]
        if not self.stream_output:
            argv.append("--no-stream-output")
        argv += self.gateway_args
        self.gateway = self._spawn(argv, "gateway", {"MONARCH_GATEWAY_TOKEN": self.token})
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not ready.exists():
            if self.gateway.poll() is not None:
                raise RuntimeError(
                    f"the gateway exited with status {self.gateway.returncode}; "
                    f"see {self.log_dir / 'gateway.log'}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"the gateway was not ready within {READY_TIMEOUT_S:.0f}s; "
                    f"see {self.log_dir / 'gateway.log'}"
                )
            time.sleep(0.05)
        self.url = json.loads(ready.read_text())["url"]

    @property
    def health_url(self) -> str:
        return self.url.replace("ws", "http", 1) + "/healthz"

    def connect(self, **options: Any) -> JobState:
        return connect(self.url, self.token, **options)

    def kill_worker(self, index: int) -> None:
        """Kill one worker process abruptly, as a crashed node would die."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.workers[index].pid, signal.SIGKILL)
        self.workers[index].wait()

    def close(self) -> None:
        if self.gateway is not None:
            _stop(self.gateway, signal.SIGTERM, 15.0)
            self.gateway = None
        for worker in self.workers:
            _stop(worker, signal.SIGKILL, 5.0)
        self.workers = []
        atexit.unregister(self.close)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _stop(process: subprocess.Popen[bytes], sig: signal.Signals, timeout_s: float) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def start_local(hosts: int = 2, **options: Any) -> JobState:
    """Start ``hosts`` workers and a gateway here; return a connected JobState.

    Closing the JobState (or leaving its ``with`` block) stops every process it started.
    """
    cluster = LocalCluster(hosts, **options).start()
    try:
        return JobState.fetch(
            GatewayConnection.open(cluster.url, cluster.token), on_close=cluster.close
        )
    except BaseException:
        cluster.close()
        raise
