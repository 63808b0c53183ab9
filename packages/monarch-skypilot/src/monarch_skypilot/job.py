"""``SkyPilotJob``: Monarch worker meshes on any cloud SkyPilot reaches, driven from a laptop.

    job = SkyPilotJob(meshes={"trainers": 2}, resources=sky.Resources(accelerators="H100:1"))
    state = job.state()          # launch (or reuse), start workers, attach
    procs = state.trainers.spawn_procs(per_host={"gpus": 1})
    job.sync()                   # gateway mode: push code through the gateway, hot reload
    job.kill()                   # sky down

Two modes. **Gateway** (the default off the cluster's network): the head node runs
monarch-gateway behind the one port opened on the resources; the client reaches it at the
address ``sky.endpoints`` gives, over TLS pinned to a certificate made for this cluster, with a
token passed as a SkyPilot secret; ``state()`` is monarch-proxy's ``JobState``. **Direct** (the
client in the cluster's network, e.g. batch mode's client on the head node): real Monarch host
meshes attached to every worker.

It is a torchmonarch ``JobTrait``, so Monarch's job cache (``.monarch/job_state.pkl``: a second
process reuses the running cluster) and ``apply(client_script)`` (batch mode, as a SkyPilot
managed job) behave as for Monarch's own jobs. The cluster-facing logic lives in methods that
need nothing of ``JobTrait`` but ``_running``, so moving onto monarch-proxy's job base is a
change of base class.
"""

from __future__ import annotations

import getpass
import os
import queue
import secrets
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, Literal

from monarch._src.job.job import BatchJob, JobTrait
from monarch._src.job.job import JobState as MonarchJobState

from monarch_proxy import GatewayConnection, SyncResult
from monarch_proxy import JobState as ProxyJobState
from monarch_proxy.errors import ProxyError
from monarch_proxy.protocol.names import Op
from monarch_skypilot.certs import ClusterCert, pinned_context
from monarch_skypilot.errors import (
    BatchJobError,
    ClusterNotUpError,
    CudaRequiredError,
    InvalidJobError,
    WorkersNotListeningError,
    cuda_missing,
)
from monarch_skypilot.sdk import Cluster, ManagedJob, SkyApi, SkyPilotSdk
from monarch_skypilot.task import (
    CERT_SECRET,
    DEFAULT_IMAGE_ID,
    DEFAULT_TIMEOUTS,
    KEY_SECRET,
    TOKEN_SECRET,
    Mode,
    TaskSpec,
    build_task,
    split_nodes,
)

__all__ = ["SkyPilotJob"]

DEFAULT_JOB_PATH = ".monarch/job_state.pkl"
POLL_S = 0.5
LOG_LINES = 40
LIVENESS_TIMEOUT_S = 10.0


def _stderr(message: str) -> None:
    print(f"[monarch-skypilot] {message}", file=sys.stderr, flush=True)


def in_cluster() -> bool:
    """True on a node of a SkyPilot cluster (batch mode's client runs there)."""
    return bool(os.environ.get("SKYPILOT_NODE_IPS"))


class SkyPilotJob(JobTrait):
    """Monarch host meshes on a SkyPilot cluster; see the module docstring."""

    def __init__(
        self,
        meshes: dict[str, int],
        resources: Any = None,
        cluster_name: str | None = None,
        monarch_port: int = 22222,
        idle_minutes_to_autostop: int | None = None,
        down_on_autostop: bool = True,
        python_exe: str = "python",
        setup_commands: str | None = None,
        workdir: str | None = None,
        file_mounts: dict[str, str] | None = None,
        *,
        mode: Literal["auto", "gateway", "direct"] = "auto",
        use_spot: bool | None = None,
        image_id: str | None = DEFAULT_IMAGE_ID,
        gateway_port: int = 8443,
        sync_port: int = 7878,
        timeouts: dict[str, str] | None = None,
        retry_until_up: bool = False,
        ready_timeout: float = 600.0,
        recover: bool = True,
        sky: SkyApi | None = None,
        log: Callable[[str], None] | None = _stderr,
    ) -> None:
        super().__init__()
        if mode not in ("auto", "gateway", "direct"):
            raise InvalidJobError(f"mode must be 'auto', 'gateway' or 'direct', not {mode!r}")
        self.mode: Mode = mode if mode != "auto" else ("direct" if in_cluster() else "gateway")
        self.spec = TaskSpec(
            meshes=dict(meshes),
            mode=self.mode,
            monarch_port=monarch_port,
            gateway_port=gateway_port,
            sync_port=sync_port,
            python_exe=python_exe,
            setup_commands=setup_commands,
            workdir=workdir,
            file_mounts=dict(file_mounts) if file_mounts else None,
            timeouts={**DEFAULT_TIMEOUTS, **(timeouts or {})},
        )
        self.resources = resources
        self._name_given = cluster_name is not None
        self.cluster_name = cluster_name or f"monarch-{getpass.getuser()}-{secrets.token_hex(3)}"
        self.idle_minutes_to_autostop = idle_minutes_to_autostop
        self.down_on_autostop = down_on_autostop
        self.use_spot = use_spot
        self.image_id = image_id
        self.retry_until_up = retry_until_up
        self.ready_timeout = ready_timeout
        self.recover = recover
        self._sky: SkyApi = sky if sky is not None else SkyPilotSdk()
        self._log = log or (lambda message: None)
        self._token: str | None = None
        self._cert: ClusterCert | None = None
        self._task: dict[str, Any] | None = None
        self._cluster: Cluster | None = None
        self._batch_job_id: int | None = None
        #: what recovery did, oldest first: (seconds since epoch, what happened)
        self.recoveries: list[tuple[float, str]] = []
        self._runtime_init()

    def _runtime_init(self) -> None:
        """Process-local state: never pickled into the job cache."""
        self._proxy: ProxyJobState | None = None
        self._host_meshes: dict[str, Any] | None = None
        self._events: queue.Queue[tuple[float, dict[str, Any]]] = queue.Queue()
        self._launched_at = 0.0
        self._stopped = threading.Event()
        self._recovering = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for key in ("_proxy", "_host_meshes", "_events", "_stopped", "_recovering"):
            state.pop(key, None)
        if not isinstance(state.get("_sky"), SkyPilotSdk):  # a test's fake cloud stays here
            state["_sky"] = None
        state["_log"] = _stderr
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self._sky is None:
            self._sky = SkyPilotSdk()
        self._runtime_init()

    # -- JobTrait -----------------------------------------------------------------------------

    def dump(self, filename: str) -> None:
        """Monarch's job cache, readable by this user only: it holds the gateway's token and
        the cluster's TLS key."""
        super().dump(filename)
        os.chmod(os.path.realpath(filename), 0o600)

    def _rebind_connection_inputs(self, spec: JobTrait) -> None:
        if isinstance(spec, SkyPilotJob):  # the SDK (or a test's cloud) and log of this process
            self._sky, self._log = spec._sky, spec._log

    def can_run(self, spec: JobTrait) -> bool:
        """A cached job serves ``spec`` when it asks for the same cluster and it is UP."""
        if not isinstance(spec, SkyPilotJob):
            return False
        same = (
            spec.spec == self.spec
            and repr(spec.resources) == repr(self.resources)
            and spec.use_spot == self.use_spot
            and (not spec._name_given or spec.cluster_name == self.cluster_name)
        )
        if not same:
            return False
        if self._batch_job_id is not None:
            record = self._sky.jobs_queue(self._batch_job_id)
            return record is not None and not record.finished
        cluster = self._sky.status(self.cluster_name)
        return cluster is not None and cluster.up

    def _create(self, client_script: str | None) -> None:
        if client_script is not None:
            self._create_batch(client_script)
            return
        secrets_ = self._new_secrets() if self.mode == "gateway" else {}
        self._task = build_task(
            self.spec, self.resources, secrets=secrets_, use_spot=self.use_spot,
            image_id=self.image_id,
        )  # fmt: skip
        self._launch(f"launching {self.spec.num_nodes} nodes as {self.cluster_name}")
        if self.idle_minutes_to_autostop is not None:
            self._log(
                f"{self.cluster_name}: autostop after {self.idle_minutes_to_autostop} idle "
                f"minutes ({'down' if self.down_on_autostop else 'stop'})"
            )

    def _state(self) -> MonarchJobState:
        if self.mode == "gateway":
            proxy = self.gateway_state()
            return MonarchJobState({name: proxy[name] for name in proxy.names})
        return MonarchJobState(self._attach_direct())

    def state(self, cached_path: str | None = DEFAULT_JOB_PATH) -> Any:
        """Launch or reuse the cluster and connect. Gateway mode returns monarch-proxy's
        ``JobState`` (with ``sync()``, ``on_membership()``, ``wait_for_workers()``); direct
        mode returns Monarch's ``JobState`` of real host meshes."""
        if self.mode == "direct":
            return super().state(cached_path)
        self._connect(cached_path)
        running = self._running
        assert isinstance(running, SkyPilotJob)
        proxy = running.gateway_state()
        if running is not self:
            self._proxy = proxy
        return proxy

    def _kill(self) -> None:
        self._close()
        if in_cluster():  # batch mode's client, done: the node command stops the workers
            return
        if self._batch_job_id is not None:
            self._log(f"cancelling managed job {self._batch_job_id}")
            self._sky.jobs_cancel(self._batch_job_id)
            return
        self._log(f"tearing down cluster {self.cluster_name} (sky down)")
        self._sky.down(self.cluster_name)
        self._cluster = None

    def __enter__(self) -> SkyPilotJob:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()

    # -- launching ----------------------------------------------------------------------------

    def _new_secrets(self) -> dict[str, str]:
        self._token = secrets.token_urlsafe(32)
        self._cert = ClusterCert.generate(self.cluster_name)
        return {
            TOKEN_SECRET: self._token,
            CERT_SECRET: self._cert.cert_pem,
            KEY_SECRET: self._cert.key_pem,
        }

    def _launch(self, why: str) -> Cluster:
        assert self._task is not None
        self._launched_at = time.monotonic()
        self._log(f"{why} ({self.mode} mode); progress follows")
        cluster = self._sky.launch(
            self._task,
            self.cluster_name,
            idle_minutes_to_autostop=self.idle_minutes_to_autostop,
            # without autostop, SkyPilot's down=True means "down when the job ends": a worker
            # that crashed would take the cluster (and its logs) with it
            down=self.down_on_autostop and self.idle_minutes_to_autostop is not None,
            retry_until_up=self.retry_until_up,
        )
        if not cluster.up or len(cluster.internal_ips) < self.spec.num_nodes:
            seen = self._sky.status(self.cluster_name)
            status = seen.status if seen else "missing"
            raise ClusterNotUpError(
                f"cluster {self.cluster_name} did not come up: status {status} with "
                f"{len(cluster.internal_ips)} of {self.spec.num_nodes} nodes. See "
                f"`sky status {self.cluster_name}` and `sky logs {self.cluster_name}`; "
                "kill() removes what was made.",
                self.cluster_name,
                status,
            )
        self._cluster = cluster
        self._log(f"{self.cluster_name} is up: nodes {cluster.internal_ips}")
        return cluster

    def _not_listening(self, what: str) -> Exception:
        job_id = self._cluster.job_id if self._cluster else None
        text = self._sky.job_log_tail(self.cluster_name, job_id, LOG_LINES)
        if cuda_missing(text):
            return CudaRequiredError(
                f"the workers of {self.cluster_name} need CUDA but the nodes have no GPU "
                "(libcuda.so.1 missing): request GPUs, e.g. "
                "resources=sky.Resources(accelerators='H100:1'), or install a CPU build in "
                f"setup_commands. Worker log:\n{text}"
            )
        return WorkersNotListeningError(
            f"{what} within {self.ready_timeout:g}s on cluster {self.cluster_name}. "
            f"`sky logs {self.cluster_name}` has the whole log; its last lines:\n{text}",
            text,
        )

    # -- gateway mode -------------------------------------------------------------------------

    def gateway_url(self) -> str:
        port = self.spec.gateway_port
        endpoint = self._sky.endpoints(self.cluster_name, port).get(port)
        if not endpoint:
            raise ClusterNotUpError(
                f"cluster {self.cluster_name} has no endpoint for port {port}: is it up? "
                f"(`sky status {self.cluster_name}`)",
                self.cluster_name,
                None,
            )
        return f"wss://{endpoint.split('://')[-1]}"

    def gateway_state(self) -> ProxyJobState:
        """monarch-proxy's JobState for the gateway on the head node (reconnected, and the
        cluster relaunched, when the head was lost)."""
        if self._proxy is not None:
            try:  # alive? (a connection resuming after a lost head would block for its grace)
                self._proxy.connection.request(Op.JOB_MEMBERS, {}, timeout=LIVENESS_TIMEOUT_S)
                return self._proxy
            except (ProxyError, TimeoutError):
                self._log(f"{self.cluster_name}: the gateway connection is gone; recovering")
                self._close()
                self._relaunch("the gateway was unreachable")
        if self._token is None or self._cert is None:
            raise InvalidJobError("this job was not launched in gateway mode (no token)")
        url = self.gateway_url()
        deadline = time.monotonic() + self.ready_timeout
        self._log(f"{self.cluster_name}: connecting to the gateway at {url}")
        while True:
            try:
                connection = GatewayConnection.open(
                    url, self._token, ssl=pinned_context(self._cert.cert_pem),
                    connect_timeout_s=10.0,
                )  # fmt: skip
                break
            except (OSError, ProxyError) as exc:
                if time.monotonic() > deadline:
                    raise self._not_listening(f"the gateway did not answer ({exc})") from exc
                time.sleep(1.0)
        state = ProxyJobState.fetch(connection)
        left = max(1.0, deadline - time.monotonic())
        state.wait_for_workers(timeout=left)
        state.on_membership(lambda event: self._events.put((time.monotonic(), event)))
        self._proxy = state
        if self.recover:
            self._stopped.clear()
            threading.Thread(target=self._watch, name="monarch-skypilot", daemon=True).start()
        self._log(f"{self.cluster_name}: attached to {state!r}")
        return state

    def sync(self, src: str = ".", *, reload: bool = True) -> SyncResult:
        """Push ``src`` to every node through the gateway, then reload changed modules."""
        if self.mode != "gateway":
            raise InvalidJobError("sync() goes through the gateway: use mode='gateway'")
        return self.state().sync(src, reload=reload)

    def set_autostop(self, idle_minutes: int, down: bool | None = None) -> None:
        """Change the running cluster's autostop (``-1`` cancels it)."""
        down = self.down_on_autostop if down is None else down
        self._sky.autostop(self.cluster_name, idle_minutes, down)
        self.idle_minutes_to_autostop = None if idle_minutes < 0 else idle_minutes
        self.down_on_autostop = down

    # -- recovery -----------------------------------------------------------------------------

    def _watch(self) -> None:
        """Relaunch when the gateway reports a lost worker (a preempted or failed node)."""
        while not self._stopped.is_set():
            try:
                seen, event = self._events.get(timeout=1.0)
            except queue.Empty:
                continue
            if event.get("lost"):
                lost = [str(a) for a in event["lost"]]
                self._log(f"{self.cluster_name}: lost {lost}; recovering")
                try:
                    self._relaunch(f"lost {', '.join(lost)}", since=seen, lost=lost)
                except Exception as exc:  # the caller still sees WorkerLostError and members()
                    self.recoveries.append((time.time(), f"recovery failed: {exc}"))
                    self._log(f"{self.cluster_name}: recovery failed: {exc}")
            for old, new in (event.get("replaced") or {}).items():
                self.recoveries.append((time.time(), f"replaced {old} by {new}"))
                self._log(f"{self.cluster_name}: {old} replaced by {new}; the mesh is whole")

    def _relaunch(
        self, why: str, since: float | None = None, lost: list[str] | None = None
    ) -> None:
        """Launch the same task on the same cluster: SkyPilot brings back missing nodes (spot
        preemption), and the node command keeps what still runs and takes the new nodes in.
        A loss that a later launch already covered (its node gone from a whole cluster) is not
        relaunched again."""
        with self._recovering:
            cluster = self._sky.status(self.cluster_name)
            if since is not None and cluster is not None and cluster.up:
                hosts = {a.split("://")[-1].rpartition(":")[0] for a in lost or []}
                if self._launched_at > since or not hosts & set(cluster.internal_ips):
                    return
            state = (
                f"{cluster.status} with {len(cluster.internal_ips)} nodes" if cluster else "gone"
            )
            self.recoveries.append((time.time(), f"relaunch: {why}; cluster {state}"))
            self._launch(f"relaunching {self.cluster_name} ({why}; it is {state})")

    # -- direct mode ----------------------------------------------------------------------------

    def _worker_addresses(self) -> dict[str, list[str]]:
        if in_cluster():  # batch mode's client, on the head node
            ips = [ip for ip in os.environ["SKYPILOT_NODE_IPS"].split() if ip]
        else:
            cluster = self._cluster or self._sky.status(self.cluster_name)
            if cluster is None or not cluster.up:
                raise ClusterNotUpError(
                    f"cluster {self.cluster_name} is not up; state() launches it",
                    self.cluster_name,
                    cluster.status if cluster else None,
                )
            ips = cluster.internal_ips  # direct mode: this client is in the cluster's network
        port = self.spec.monarch_port
        return {
            name: [f"tcp://{ip}:{port}" for ip in group]
            for name, group in split_nodes(self.spec.meshes, ips).items()
        }

    def _attach_direct(self) -> dict[str, Any]:
        if self._host_meshes is not None:
            return self._host_meshes
        from monarch._rust_bindings.monarch_hyperactor.channel import ChannelTransport
        from monarch.actor import attach_to_workers
        from monarch.config import configure

        meshes = self._worker_addresses()
        addresses = [a for group in meshes.values() for a in group]
        loopback = all(a.split("://")[1].startswith("127.") for a in addresses)
        configure(
            default_transport=ChannelTransport.TcpWithLocalhost
            if loopback
            else ChannelTransport.TcpWithHostname
        )
        self._wait_listening(addresses)
        host_meshes = {
            name: attach_to_workers(name=name, ca="trust_all_connections", workers=workers)
            for name, workers in meshes.items()
        }
        for mesh in host_meshes.values():
            mesh.initialized.get()
        self._host_meshes = host_meshes
        return host_meshes

    def _wait_listening(self, addresses: list[str]) -> None:
        import socket

        deadline = time.monotonic() + self.ready_timeout
        for address in addresses:
            host, _, port = address.split("://")[1].rpartition(":")
            while True:
                try:
                    socket.create_connection((host, int(port)), timeout=2).close()
                    break
                except OSError as exc:
                    if time.monotonic() > deadline:
                        raise self._not_listening(f"worker {address} did not listen") from exc
                    time.sleep(POLL_S)

    # -- batch mode (SkyPilot managed jobs) ---------------------------------------------------

    def _create_batch(self, client_script: str) -> None:
        """Run ``client_script`` on the cluster as a managed job: SkyPilot's controller
        relaunches it after a preemption; status and logs come from :meth:`batch_status` and
        :meth:`batch_logs` here."""
        workdir = self.spec.workdir or os.getcwd()
        script = os.path.relpath(os.path.abspath(client_script), workdir)
        if script.startswith(".."):
            raise InvalidJobError(
                f"the client script {client_script} must be inside workdir {workdir} "
                "(it is shipped with it)"
            )
        inside = SkyPilotJob.__new__(SkyPilotJob)
        inside.__setstate__({**self.__getstate__(), "mode": "direct", "_sky": None})
        inside.spec = TaskSpec(**{**self.spec.__dict__, "mode": "direct"})
        BatchJob(inside).dump(os.path.join(workdir, DEFAULT_JOB_PATH))
        spec = TaskSpec(
            **{**self.spec.__dict__, "mode": "direct", "workdir": workdir, "batch_script": script}
        )
        self._task = build_task(
            spec, self.resources, use_spot=self.use_spot, image_id=self.image_id
        )
        self._batch_job_id = self._sky.jobs_launch(self._task, self.cluster_name)
        self._log(
            f"managed job {self._batch_job_id} ({self.cluster_name}) runs {script} on the "
            "cluster; job.batch_status() / job.batch_logs() follow it"
        )

    def batch_status(self) -> ManagedJob:
        if self._batch_job_id is None:
            raise BatchJobError("no managed job: call apply(client_script=...) first")
        record = self._sky.jobs_queue(self._batch_job_id)
        if record is None:
            raise BatchJobError(
                f"managed job {self._batch_job_id} is unknown to the jobs controller "
                "(`sky jobs queue`)"
            )
        return record

    def batch_logs(self, follow: bool = False) -> str:
        if self._batch_job_id is None:
            raise BatchJobError("no managed job: call apply(client_script=...) first")
        return self._sky.jobs_logs(self._batch_job_id, follow)

    def wait_batch(self, timeout: float = 3600.0) -> ManagedJob:
        """Block until the managed job finishes; raise BatchJobError unless it succeeded."""
        deadline = time.monotonic() + timeout
        while True:
            record = self.batch_status()
            if record.finished and record.status == "SUCCEEDED":
                return record
            if record.finished or time.monotonic() > deadline:
                ended = "ended" if record.finished else f"still after {timeout:g}s:"
                reason = f": {record.failure_reason}" if record.failure_reason else ""
                last = "\n".join(self.batch_logs().splitlines()[-LOG_LINES:])
                raise BatchJobError(
                    f"managed job {record.job_id} {ended} {record.status}{reason}; "
                    f"`sky jobs logs {record.job_id}` has its log; its last lines:\n{last}",
                    record.status,
                )
            time.sleep(POLL_S)

    # -- cleanup ------------------------------------------------------------------------------

    def _close(self) -> None:
        self._stopped.set()
        proxy, self._proxy = self._proxy, None
        if proxy is not None:
            try:
                proxy.close()
            except Exception as exc:  # closing a dead connection says nothing new
                self._log(f"{self.cluster_name}: closing the gateway connection: {exc}")
        self._host_meshes = None

    def __repr__(self) -> str:
        return f"SkyPilotJob({self.cluster_name}, {self.spec.meshes}, {self.mode})"
