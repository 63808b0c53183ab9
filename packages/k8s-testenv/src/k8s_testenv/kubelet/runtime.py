"""One pod's processes: start, reap, probe, restart and kill them.

A :class:`PodWorker` is driven by the kubelet loop: :meth:`PodWorker.sync` is called often and
never blocks. It records what happened in :class:`~k8s_testenv.kubelet.status.ContainerRecord`
objects and leaves every decision (restart or not, after what back-off, which phase) to the
pure functions in :mod:`k8s_testenv.kubelet.status` and :mod:`k8s_testenv.kubelet.podspec`.

Each container process is started in its own session, so ``killpg`` reaches everything it
spawned. Its process-group id is also written to ``pgid_dir`` until it is reaped, which lets a
supervisor kill leftovers even if the kubelet itself was killed with SIGKILL.
"""

from __future__ import annotations

import ctypes
import os
import shlex
import signal
import socket
import subprocess
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from k8s_testenv.kubelet import podspec
from k8s_testenv.kubelet.mounts import PodVolumes
from k8s_testenv.kubelet.network import sandbox_prefix
from k8s_testenv.kubelet.status import (
    ContainerRecord,
    Phase,
    RestartPolicy,
    State,
    backoff_delay,
    container_status,
    init_outcome,
    pod_conditions,
    pod_phase,
    rfc3339,
    should_restart,
)
from k8s_testenv.kubelet.streaming import container_stdin
from k8s_testenv.kubelet.volumes import mount_script

__all__ = ["KubeletSettings", "PodWorker", "kill_on_parent_death"]

_PR_SET_PDEATHSIG = 1
PROBE_KINDS = ("readinessProbe", "livenessProbe")


def kill_on_parent_death() -> None:
    """preexec_fn: have the kernel SIGKILL the child if its parent dies first (Linux)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


@dataclass(frozen=True)
class KubeletSettings:
    """Timing knobs. The real kubelet uses a 10 s back-off base and a 300 s cap."""

    backoff_base: float = 1.0
    backoff_cap: float = 20.0
    max_grace: float = 30.0


class PodWorker:
    """Runs the containers of one pod as local processes."""

    def __init__(
        self,
        pod: dict[str, Any],
        *,
        net: podspec.PodNetwork,
        root: Path,
        hosts_file: Path,
        base_env: Mapping[str, str],
        lookup: podspec.Lookup,
        settings: KubeletSettings,
        pgid_dir: Path,
        now: float,
        volumes: PodVolumes | None = None,
    ) -> None:
        self.pod = pod
        self.net = net
        self.root = root
        self.hosts_file = hosts_file
        self.base_env = base_env
        self.lookup = lookup
        self.settings = settings
        self.pgid_dir = pgid_dir
        self.started_at = now
        self.volumes = volumes
        spec = pod["spec"]
        self.policy = RestartPolicy(spec.get("restartPolicy", "Always"))
        self.init_records = [ContainerRecord(c["name"]) for c in spec.get("initContainers", [])]
        self.records = [ContainerRecord(c["name"]) for c in spec.get("containers", [])]
        self._specs = {
            c["name"]: c for c in spec.get("initContainers", []) + spec.get("containers", [])
        }
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._probes: dict[tuple[str, str], tuple[subprocess.Popen[bytes], float]] = {}
        self._probe_last: dict[tuple[str, str], float] = {}
        self._conditions: list[dict[str, Any]] = []
        #: the environment each container was last started with (exec runs with it)
        self.envs: dict[str, dict[str, str]] = {}
        #: each container's sandbox argv prefix (with its volume mounts), reused by exec probes
        self._sandbox: dict[str, list[str]] = {}
        self.kill_deadline: float | None = None
        root.mkdir(parents=True, exist_ok=True)

    # -- identity --------------------------------------------------------------------------
    @property
    def uid(self) -> str:
        return str(self.pod["metadata"]["uid"])

    def log_path(self, container: str, *, previous: bool = False) -> Path:
        return self.root / (f"{container}.previous.log" if previous else f"{container}.log")

    # -- the loop --------------------------------------------------------------------------
    def sync(self, now: float) -> None:
        """Advance the pod: reap exits, run probes, start or restart what is due."""
        self._reap(now)
        if self.kill_deadline is not None:
            self._escalate(now)
            return
        self._run_probes(now)
        phase = pod_phase(self.policy, self.init_records, self.records)
        if phase in (Phase.SUCCEEDED, Phase.FAILED):
            return
        if self.volumes is not None and not self.volumes.sync(self.pod, now):
            return  # containers stay waiting in ContainerCreating, as while a kubelet mounts
        state, record = init_outcome(self.policy, self.init_records)
        if state == "failed":
            return
        if state == "run":
            assert record is not None
            if record.state is State.WAITING and self._due(record, now):
                self._start(record, now)
            return
        for record in self.records:
            if record.state is State.WAITING and self._due(record, now):
                self._start(record, now)

    def status(self, now: float) -> dict[str, Any]:
        """The pod ``status`` this worker reports (phase, conditions, IPs, containers)."""
        phase = pod_phase(self.policy, self.init_records, self.records)
        self._conditions = pod_conditions(
            phase,
            self.init_records,
            self.records,
            now=now,
            previous=self._conditions,
            sandbox_ready=self.volumes is None or self.volumes.ready,
        )
        status: dict[str, Any] = {
            "phase": phase.value,
            "conditions": self._conditions,
            "hostIP": self.net.host_ip,
            "hostIPs": [{"ip": self.net.host_ip}],
            "podIP": self.net.pod_ip,
            "podIPs": [{"ip": self.net.pod_ip}],
            "startTime": rfc3339(self.started_at),
            "containerStatuses": [
                container_status(r, image=self._specs[r.name].get("image", ""))
                for r in self.records
            ],
        }
        if self.init_records:
            status["initContainerStatuses"] = [
                container_status(r, image=self._specs[r.name].get("image", ""))
                for r in self.init_records
            ]
        return status

    def begin_termination(self, now: float, grace: float) -> None:
        """SIGTERM every process; SIGKILL follows after ``grace`` (capped) seconds."""
        if self.kill_deadline is not None:
            return
        self.kill_deadline = now + min(grace, self.settings.max_grace)
        for proc in [*self._procs.values(), *(p for p, _ in self._probes.values())]:
            _killpg(proc.pid, signal.SIGTERM)

    @property
    def terminated(self) -> bool:
        """True once a termination was requested and no process is left."""
        return self.kill_deadline is not None and not self._procs and not self._probes

    def kill_now(self) -> None:
        """SIGKILL everything and reap it (kubelet shutdown)."""
        for proc in [*self._procs.values(), *(p for p, _ in self._probes.values())]:
            _killpg(proc.pid, signal.SIGKILL)
        for proc in [*self._procs.values(), *(p for p, _ in self._probes.values())]:
            proc.wait()
            self._forget_pgid(proc.pid)
        self._procs.clear()
        self._probes.clear()

    # -- internals -------------------------------------------------------------------------
    def _due(self, record: ContainerRecord, now: float) -> bool:
        return record.restart_at is None or now >= record.restart_at

    def _all_records(self) -> list[ContainerRecord]:
        return [*self.init_records, *self.records]

    def _start(self, record: ContainerRecord, now: float) -> None:
        container = self._specs[record.name]
        if record.last_termination is not None:
            record.restart_count += 1
            current = self.log_path(record.name)
            if current.exists():
                current.replace(self.log_path(record.name, previous=True))
        try:
            env = podspec.build_env(
                self.pod, container, self.net, base=self.base_env, lookup=self.lookup
            )
            argv = podspec.command_line(container, env)
            mounts = self.volumes.mounts_for(container, env) if self.volumes else []
        except (podspec.ConfigError, OSError) as exc:
            record.state, record.reason = State.WAITING, "CreateContainerConfigError"
            record.extra["message"] = str(exc)
            record.restart_at = now + self.settings.backoff_cap
            return
        hostname, _ = podspec.hostname_of(self.pod)
        workdir = container.get("workingDir") or str(self.root)
        self.envs[record.name] = env
        stdin = container_stdin(self.root, container)
        script = mount_script(mounts)
        if script and container.get("workingDir"):
            # as runc does: enter workingDir after the mounts (it may lie inside a volume)
            script += f" && cd {shlex.quote(workdir)}"
            workdir = str(self.root)
        prefix = sandbox_prefix(str(self.hosts_file), hostname, script)
        self._sandbox[record.name] = prefix
        with self.log_path(record.name).open("ab") as log:
            try:
                proc = subprocess.Popen(
                    [*prefix, *argv],
                    env=env,
                    cwd=workdir,
                    stdin=stdin,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    preexec_fn=kill_on_parent_death,
                )
            except OSError as exc:
                log.write(f"failed to start {argv!r}: {exc}\n".encode())
                self._exited(record, 127, now, now)
                return
            finally:
                if stdin >= 0:  # the child holds its own copy
                    os.close(stdin)
        (self.pgid_dir / str(proc.pid)).touch()
        self._procs[record.name] = proc
        record.state, record.reason = State.RUNNING, ""
        record.started_at, record.finished_at, record.exit_code = now, None, None
        record.restart_at = None
        record.ready = "readinessProbe" not in container
        record.probe_successes = record.probe_failures = record.liveness_failures = 0
        record.extra["pid"] = proc.pid

    def _reap(self, now: float) -> None:
        for name, proc in list(self._procs.items()):
            code = proc.poll()
            if code is None:
                continue
            del self._procs[name]
            self._forget_pgid(proc.pid)
            # a leftover child of the container dies with it, as with a container's cgroup
            _killpg(proc.pid, signal.SIGKILL)
            record = next(r for r in self._all_records() if r.name == name)
            self._exited(record, code if code >= 0 else 128 - code, record.started_at or now, now)

    def _exited(self, record: ContainerRecord, code: int, started: float, now: float) -> None:
        record.ready = False
        for kind in PROBE_KINDS:
            self._probe_last.pop((record.name, kind), None)
            pending = self._probes.pop((record.name, kind), None)
            if pending is not None:  # a probe of a run that is over
                _killpg(pending[0].pid, signal.SIGKILL)
                pending[0].wait()
                self._forget_pgid(pending[0].pid)
        is_init = record in self.init_records
        # init containers of an Always pod are retried on failure, never re-run on success
        policy = (
            RestartPolicy.ON_FAILURE
            if is_init and self.policy is RestartPolicy.ALWAYS
            else self.policy
        )
        if self.kill_deadline is None and should_restart(policy, code):
            record.last_termination = (code, started, now)
            delay = backoff_delay(
                record.restart_count, base=self.settings.backoff_base, cap=self.settings.backoff_cap
            )
            record.state = State.WAITING
            record.reason = "CrashLoopBackOff"
            record.restart_at = now + delay
            return
        record.state, record.exit_code = State.TERMINATED, code
        record.started_at, record.finished_at = started, now

    def _escalate(self, now: float) -> None:
        assert self.kill_deadline is not None
        if now >= self.kill_deadline:
            for proc in [*self._procs.values(), *(p for p, _ in self._probes.values())]:
                _killpg(proc.pid, signal.SIGKILL)
        for key, (proc, _) in list(self._probes.items()):
            if proc.poll() is not None:
                del self._probes[key]
                self._forget_pgid(proc.pid)

    def _run_probes(self, now: float) -> None:
        for record in self.records:
            if record.state is not State.RUNNING:
                continue
            for kind in PROBE_KINDS:
                probe = self._specs[record.name].get(kind)
                if probe is None:
                    continue
                key = (record.name, kind)
                pending = self._probes.get(key)
                if pending is not None:
                    proc, deadline = pending
                    code = proc.poll()
                    if code is None and now < deadline:
                        continue
                    if code is None:  # timed out
                        _killpg(proc.pid, signal.SIGKILL)
                        proc.wait()
                    del self._probes[key]
                    self._forget_pgid(proc.pid)
                    self._probe_result(record, kind, probe, code == 0)
                elif podspec.probe_due(probe, record, last=self._probe_last.get(key), now=now):
                    self._probe_last[key] = now
                    ok = self._probe(record, key, probe, now)
                    if ok is not None:
                        self._probe_result(record, kind, probe, ok)

    def _probe_result(
        self, record: ContainerRecord, kind: str, probe: dict[str, Any], ok: bool
    ) -> None:
        if kind == "readinessProbe":
            podspec.apply_probe_result(record, probe, ok)
        elif podspec.apply_liveness_result(record, probe, ok):
            # a failed liveness probe kills the container; the restart policy decides the rest
            proc = self._procs.get(record.name)
            if proc is not None:
                _killpg(proc.pid, signal.SIGKILL)

    def _probe(
        self, record: ContainerRecord, key: tuple[str, str], probe: dict[str, Any], now: float
    ) -> bool | None:
        """Run one probe: the result, or None for an exec probe still running."""
        container = self._specs[record.name]
        timeout = float(probe.get("timeoutSeconds", 1))
        if "exec" in probe:
            env = podspec.build_env(
                self.pod, container, self.net, base=self.base_env, lookup=self.lookup
            )
            hostname, _ = podspec.hostname_of(self.pod)
            prefix = self._sandbox.get(record.name) or sandbox_prefix(
                str(self.hosts_file), hostname
            )
            proc = subprocess.Popen(
                [*prefix, *probe["exec"]["command"]],
                env=env,
                cwd=container.get("workingDir") or str(self.root),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=kill_on_parent_death,
            )
            (self.pgid_dir / str(proc.pid)).touch()
            self._probes[key] = (proc, now + timeout)
            return None
        try:
            if "tcpSocket" in probe:
                port = podspec.resolve_port(container, probe["tcpSocket"]["port"])
                with socket.create_connection((self.net.pod_ip, port), timeout=min(timeout, 0.5)):
                    return True
            if "httpGet" in probe:
                get = probe["httpGet"]
                port = podspec.resolve_port(container, get["port"])
                url = f"http://{self.net.pod_ip}:{port}{get.get('path', '/')}"
                with urllib.request.urlopen(url, timeout=min(timeout, 0.5)) as resp:
                    return bool(200 <= resp.status < 400)
        except (OSError, podspec.ConfigError):
            return False
        return False

    def _forget_pgid(self, pid: int) -> None:
        (self.pgid_dir / str(pid)).unlink(missing_ok=True)


def _killpg(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
