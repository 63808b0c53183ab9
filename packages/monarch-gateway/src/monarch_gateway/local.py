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
from typing import TYPE_CHECKING, Any

from monarch_proxy import GatewayConnection, JobState, connect

if TYPE_CHECKING:
    from monarch_gateway.workspace import SyncWorkspace

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
        sync: bool = False,
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
        self.sync = sync  # a monarch-sync agent per host, for job.sync()
        self.sync_peers: list[str] = []
        self.agents: list[subprocess.Popen[bytes]] = []
        self.addresses: list[str] = []
        self.workers: list[subprocess.Popen[bytes]] = []
        self.gateway: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self) -> LocalCluster:
        atexit.register(self.close)
        try:
            if self.sync:
                self._start_agents()
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

    def _sync_root(self, index: int) -> Path:
        """Agent root of worker host ``index``; index ``hosts`` is the gateway's."""
        return self.log_dir / f"sync-{index}"

    def _sync_env(self, index: int) -> dict[str, str] | None:
        if not self.sync:
            return None
        from monarch_sync import synced_path

        live = str(synced_path(self._sync_root(index)))  # first on the import path
        return {
            "MONARCH_SYNC_ROOT": live,
            "PYTHONPATH": os.pathsep.join([live, child_env()["PYTHONPATH"]]),
        }

    def _start_agents(self) -> None:
        # One agent per worker host, and one for the gateway, which imports actor classes too.
        for i in range(self.hosts + 1):
            host, port = worker_endpoint(i)
            self.sync_peers.append(f"{host}:{port}")
            argv = [
                sys.executable,
                "-m",
                "monarch_sync.cli",
                "agent",
                "--listen",
                f"{host}:{port}",
                "--root",
                str(self._sync_root(i)),
            ]
            self.agents.append(
                self._spawn(argv, f"sync-agent-{i}", {"MONARCH_SYNC_TOKEN": self.token})
            )
        for peer, agent in zip(self.sync_peers, self.agents, strict=True):
            wait_for_port(peer, agent, self.log_dir)
        # A first, empty version: the live tree exists before any process puts it on its path.
        empty = self.log_dir / "empty-workspace"
        empty.mkdir(exist_ok=True)
        self.workspace().push(str(empty))

    def workspace(self) -> SyncWorkspace:
        """The workspace ``job.sync()`` pushes to (needs ``sync=True``)."""
        if not self.sync:
            raise RuntimeError("this LocalCluster runs no sync agents; create it with sync=True")
        from monarch_gateway.workspace import SyncWorkspace

        return SyncWorkspace(self.sync_peers, self.token)

    def _start_workers(self) -> None:
        for i in range(self.hosts):
            host, port = worker_endpoint(i)
            address = f"tcp://{host}:{port}"
            self.addresses.append(address)
            argv = [sys.executable, "-m", "monarch_gateway.worker", address]
            self.workers.append(self._spawn(argv, f"worker-{i}", self._sync_env(i)))

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
        env = {"MONARCH_GATEWAY_TOKEN": self.token, **(self._sync_env(self.hosts) or {})}
        self.gateway = self._spawn(argv, "gateway", env)
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
        state = connect(self.url, self.token, **options)
        if self.sync:
            state.workspace = self.workspace()
        return state

    def kill_worker(self, index: int) -> None:
        """Kill one worker process abruptly, as a crashed node would die."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.workers[index].pid, signal.SIGKILL)
        self.workers[index].wait()

    def close(self) -> None:
        if self.gateway is not None:
            _stop(self.gateway, signal.SIGTERM, 15.0)
            self.gateway = None
        for process in [*self.workers, *self.agents]:
            _stop(process, signal.SIGKILL, 5.0)
        self.workers, self.agents = [], []
        atexit.unregister(self.close)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_for_port(peer: str, process: subprocess.Popen[bytes], log_dir: Path) -> None:
    host, _, port = peer.rpartition(":")
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
            return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"sync agent on {peer} did not start; see {log_dir}") from None
            time.sleep(0.05)


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
            GatewayConnection.open(cluster.url, cluster.token),
            on_close=cluster.close,
            workspace=cluster.workspace() if cluster.sync else None,
        )
    except BaseException:
        cluster.close()
        raise
