"""The embedded local default: N worker processes on 127.0.0.x and a gateway, on this machine.

    from monarch_gateway.local import start_local
    with start_local(hosts=4) as job:
        procs = job.hosts.spawn_procs(per_host={"gpus": 2})

Workers and the gateway are real processes, exactly as in a cluster; only the addresses are
loopback ones. Each worker gets its own 127.0.0.x address, as each pod gets its own IP. The
gateway reads the worker list from a file here (``workers.txt``), the way it would follow a
headless Service or a label selector in a cluster, so a restarted worker is taken in.

This is the one place that composes the gateway with monarch-sync on one machine: with
``sync=True`` every worker host runs an agent on one shared port (as every pod would), and so
does the gateway; ``job.sync()`` pushes through the gateway's ``/sync`` endpoint, exactly as a
laptop outside a cluster does, and the gateway's agent fans out to the workers' agents.
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
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

from monarch_gateway.monitor import tcp_endpoint
from monarch_proxy import GatewayConnection, JobState, connect
from monarch_proxy.job import Job

if TYPE_CHECKING:
    from monarch_sync import SyncWorkspace

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


def common_port(hosts: list[str]) -> int:
    """A port free on every one of ``hosts`` (the agents of all worker hosts share one)."""
    for _ in range(200):
        with socket.socket() as sock:
            sock.bind((hosts[0], 0))
            port = int(sock.getsockname()[1])
        if all(_free(host, port) for host in set(hosts)):
            return port
    raise OSError(f"no port is free on all of {sorted(set(hosts))}")


def _free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


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
        self.sync_port = 0  # the worker hosts' agents all listen on this port
        self.sync_peers: list[str] = []  # the workers' agents, then the gateway's (the root)
        self.agents: list[subprocess.Popen[bytes]] = []
        self.addresses: list[str] = []
        self.workers_file = self.log_dir / "workers.txt"
        self._next_host = hosts  # restarted workers get fresh addresses from here on
        self._roots: dict[int, int] = {}  # host index -> generation of its agent root
        self.workers: list[subprocess.Popen[bytes]] = []
        self.gateway: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self) -> LocalCluster:
        atexit.register(self.close)
        try:
            self.addresses = [self._new_address(i) for i in range(self.hosts)]
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

    def sync_root(self, index: int) -> Path:
        """Agent root of worker host ``index`` (a replacement's is fresh, as a new pod's would
        be); index ``hosts`` is the gateway's."""
        return self.log_dir / f"sync-{index}-{self._roots.get(index, 0)}"

    def _sync_env(self, index: int) -> dict[str, str] | None:
        if not self.sync:
            return None
        from monarch_sync import synced_path

        live = str(synced_path(self.sync_root(index)))  # first on the import path
        return {
            "MONARCH_SYNC_ROOT": live,
            "PYTHONPATH": os.pathsep.join([live, child_env()["PYTHONPATH"]]),
        }

    def _new_address(self, slot: int) -> str:
        host, port = worker_endpoint(slot)
        return f"tcp://{host}:{port}"

    @property
    def members_file(self) -> Path:
        return self.log_dir / "sync-members.json"

    def _start_agent(self, index: int, listen: str, *extra: str) -> subprocess.Popen[bytes]:
        argv = [sys.executable, "-m", "monarch_sync.cli", "agent", "--listen", listen]
        argv += ["--root", str(self.sync_root(index)), *extra]
        env = {"MONARCH_SYNC_TOKEN": self.token}
        return self._spawn(argv, f"sync-agent-{index}-{listen.replace(':', '_')}", env)

    def _start_agents(self) -> None:
        # One agent per worker host, all on one port (as in pods), and one for the gateway: the
        # root of every push, which also imports actor classes.
        hosts = [host_of(a) for a in self.addresses]
        self.sync_port = common_port(hosts)
        for i, host in enumerate(hosts):
            self.sync_peers.append(f"{host}:{self.sync_port}")
            self.agents.append(self._start_agent(i, self.sync_peers[-1]))
        root_host, root_port = worker_endpoint(self.hosts)
        self.sync_peers.append(f"{root_host}:{root_port}")
        self.agents.append(
            self._start_agent(
                self.hosts, self.sync_peers[-1], "--members-file", str(self.members_file)
            )
        )
        for peer, agent in zip(self.sync_peers, self.agents, strict=True):
            wait_for_port(peer, agent, self.log_dir)
        self._push_empty(self.sync_peers)

    def _push_empty(self, peers: list[str]) -> None:
        """A first, empty version: the live tree exists before any process puts it on its path.
        (Direct: this process started the agents and can reach them; job.sync() cannot.)"""
        from monarch_sync import SyncWorkspace

        empty = self.log_dir / "empty-workspace"
        empty.mkdir(exist_ok=True)
        SyncWorkspace(peers, self.token).push(str(empty))

    @property
    def sync_agent(self) -> str:
        """The gateway's agent, the root of every push through the gateway."""
        return self.sync_peers[-1]

    def workspace(self) -> SyncWorkspace:
        """The workspace ``job.sync()`` pushes to: through the gateway (needs ``sync=True``)."""
        if not self.sync:
            raise RuntimeError("this LocalCluster runs no sync agents; create it with sync=True")
        from monarch_sync import SyncWorkspace

        return SyncWorkspace.through_gateway(self.url, self.token)

    def direct_workspace(self) -> SyncWorkspace:
        """A workspace dialling every agent itself (the baseline the benchmarks compare with)."""
        from monarch_sync import SyncWorkspace

        return SyncWorkspace(self.sync_peers, self.token)

    def _start_workers(self) -> None:
        for i, address in enumerate(self.addresses):
            argv = [sys.executable, "-m", "monarch_gateway.worker", address]
            self.workers.append(self._spawn(argv, f"worker-{i}", self._sync_env(i)))
        self._write_workers_file()

    def _write_workers_file(self) -> None:
        tmp = self.workers_file.with_suffix(".tmp")
        tmp.write_text("".join(f"{a}\n" for a in self.addresses))
        tmp.replace(self.workers_file)  # the gateway never reads half a list

    def restart_worker(self, index: int, *, same_address: bool = False) -> str:
        """Kill worker ``index`` (and its agent) and start a replacement at a new address, as a
        StatefulSet recreates a pod with a new IP (or at the same one, as a container restarts
        in its pod); return the replacement's address."""
        self.kill_worker(index)
        if self.sync:
            _stop(self.agents[index], signal.SIGKILL, 5.0)
        if not same_address:
            self.addresses[index] = self._new_address(
                self._next_host + 1
            )  # past the gateway's agent
            self._next_host += 1
        address = self.addresses[index]
        if self.sync:
            peer = f"{host_of(address)}:{self.sync_port}"
            self.sync_peers[index] = peer
            self._roots[index] = self._roots.get(index, 0) + 1  # it starts empty
            self.agents[index] = self._start_agent(index, peer)
            wait_for_port(peer, self.agents[index], self.log_dir)
            self._push_empty([peer])  # the gateway brings it to the current version
        argv = [sys.executable, "-m", "monarch_gateway.worker", address]
        self.workers[index] = self._spawn(argv, f"worker-{index}", self._sync_env(index))
        self._write_workers_file()
        return address

    def _start_gateway(self) -> None:
        ready = self.log_dir / "gateway.ready"
        argv = [
            sys.executable,
            "-m",
            "monarch_gateway",
            "serve",
            "--mesh-file",
            f"{self.mesh}={self.workers_file}",
            "--port",
            "0",
            "--ready-file",
            str(ready),
            "--resume-grace",
            str(self.resume_grace_s),
        ]
        if not self.stream_output:
            argv.append("--no-stream-output")
        if self.sync:
            argv += ["--sync-agent", self.sync_agent, "--sync-port", str(self.sync_port)]
            argv += ["--sync-members-file", str(self.members_file)]
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

    def health(self, token: str | None = None) -> dict[str, Any]:
        """The gateway's ``/healthz``: liveness only, or its details with the right ``token``."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        request = urllib.request.Request(self.health_url, headers=headers)
        with urllib.request.urlopen(request, timeout=5) as response:
            return dict(json.loads(response.read()))

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


def host_of(address: str) -> str:
    endpoint = tcp_endpoint(address)
    assert endpoint is not None, f"not a tcp:// address: {address}"
    return endpoint[0]


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


class LocalJob(Job):
    """The local default as a :class:`monarch_proxy.job.Job`: ``hosts`` workers and a gateway
    on this machine (a :class:`LocalCluster`; ``options`` are its keyword arguments).

    Unnamed, the processes live until :meth:`kill` or the end of this Python process. Named,
    they outlive it (as Monarch's jobs do) until some ``LocalJob`` of that name is killed: the
    running cluster is recorded in a file, and a ``LocalJob`` of the same name, in this
    process or another, reuses it.
    """

    def __init__(self, hosts: int = 2, *, name: str | None = None, **options: Any) -> None:
        super().__init__(name or f"local-{secrets.token_hex(4)}")
        self.hosts = hosts
        self.options = options
        self._named = name is not None
        self._cluster: LocalCluster | None = None
        self._kill_on_close = False  # start_local(): closing the JobState stops the processes

    @property
    def record_path(self) -> Path:
        return Path(tempfile.gettempdir()) / f"monarch-local-job-{self.name}.json"

    def _record(self) -> dict[str, Any] | None:
        """The running cluster of this name, if its gateway process is alive."""
        try:
            record: dict[str, Any] = json.loads(self.record_path.read_text())
            os.kill(int(record["pids"][0]), 0)
        except (OSError, ValueError, KeyError, IndexError):
            return None
        return record

    def _is_running(self) -> bool:
        cluster = self._cluster
        if cluster is not None and cluster.gateway is not None and cluster.gateway.poll() is None:
            return True
        return self._named and self._record() is not None

    def _create(self) -> None:
        cluster = LocalCluster(self.hosts, **self.options).start()
        self._cluster = cluster
        if self._named:
            atexit.unregister(cluster.close)  # a named job outlives us, until its kill()
            assert cluster.gateway is not None
            pids = [p.pid for p in [cluster.gateway, *cluster.workers, *cluster.agents]]
            record = {"url": cluster.url, "token": cluster.token, "sync": cluster.sync}
            tmp = self.record_path.with_suffix(".tmp")
            tmp.write_text(json.dumps({**record, "pids": pids}))
            tmp.replace(self.record_path)

    def _connect(self) -> JobState:
        if self._cluster is not None:
            url, token, sync = self._cluster.url, self._cluster.token, self._cluster.sync
        else:
            record = self._record()
            if record is None:
                raise RuntimeError(f"local job {self.name!r} stopped while connecting")
            url, token, sync = str(record["url"]), str(record["token"]), bool(record["sync"])
        workspace = None
        if sync:
            from monarch_sync import SyncWorkspace

            workspace = SyncWorkspace.through_gateway(url, token)
        return JobState.fetch(
            GatewayConnection.open(url, token),
            on_close=self._closed if self._kill_on_close else None,
            workspace=workspace,
        )

    def _closed(self) -> None:
        self._state = None
        self._kill()

    def _kill(self) -> None:
        cluster, self._cluster = self._cluster, None
        if cluster is not None:
            cluster.close()
        elif self._named and (record := self._record()) is not None:
            for pid in record["pids"]:  # each was started in a session of its own
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(int(pid), signal.SIGKILL)
        if self._named:
            self.record_path.unlink(missing_ok=True)


def start_local(hosts: int = 2, **options: Any) -> JobState:
    """Start ``hosts`` workers and a gateway here; return a connected JobState.

    Closing the JobState (or leaving its ``with`` block) stops every process it started. For
    the job contract (``apply``/``state``/``kill``, reuse by name) use :class:`LocalJob`.
    """
    job = LocalJob(hosts, **options)
    job._kill_on_close = True
    try:
        return job.state()
    except BaseException:
        job.kill()
        raise
