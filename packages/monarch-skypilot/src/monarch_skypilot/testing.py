"""A fake "cloud" behind the SkyPilot adapter, for tests: nodes are local process groups.

Only the cloud is fake. Each node gets its own loopback address (127.0.N.x, as each VM gets its
own IP) and its own home folder; the task's real ``setup`` and ``run`` strings run under bash
with the variables SkyPilot sets (``SKYPILOT_NODE_RANK``, ``SKYPILOT_NODE_IPS`` newline-separated
and head first, ``SKYPILOT_NUM_NODES``, ``SKYPILOT_NUM_GPUS_PER_NODE``, ``SKYPILOT_SETUP_*``
during setup), the task's ``envs`` and ``secrets``, in a copy of its ``workdir``. What runs
there (workers, gateway, sync agents, a batch client) is the real thing.

Like SkyPilot, ``launch`` on an existing cluster brings back missing nodes (a preempted node is
replaced by a new one with a new address) and runs the task again on every node, while
processes of the earlier run keep running; :meth:`preempt` kills one node's processes.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monarch_skypilot.sdk import Cluster, ManagedJob

__all__ = ["FakeCloud"]

_CLUSTERS = itertools.count(100)


@dataclass
class FakeNode:
    ip: str
    home: Path
    runs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    lost: bool = False  # preempted or torn down; a node whose task failed is still up

    @property
    def alive(self) -> bool:
        return not self.lost

    def kill(self) -> None:
        self.lost = True
        for proc in self.runs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@dataclass
class FakeCluster:
    name: str
    task: dict[str, Any]
    nodes: list[FakeNode]
    subnet: int
    launches: int = 0
    infra: str | None = None

    def kill(self) -> None:
        for node in self.nodes:
            node.kill()


def _infra(resources: dict[str, Any]) -> str:
    return str(resources.get("infra") or resources.get("cloud") or "any")


class FakeCloud:
    """Implements :class:`monarch_skypilot.sdk.SkyApi` with local processes."""

    def __init__(self, root: str | Path | None = None, unavailable: set[str] | None = None):
        self.root = Path(root or tempfile.mkdtemp(prefix="fake-sky-"))
        self.unavailable = set(unavailable or ())  # infra strings with no capacity
        self.clusters: dict[str, FakeCluster] = {}
        self.jobs: dict[int, FakeCluster] = {}
        self.calls: list[str] = []
        self.launch_options: dict[str, Any] = {}  # of the last launch
        self._ids = itertools.count(1)

    # -- SkyApi ----------------------------------------------------------------------------

    def launch(
        self,
        task: dict[str, Any],
        cluster_name: str,
        *,
        idle_minutes_to_autostop: int | None,
        down: bool,
        retry_until_up: bool,
    ) -> Cluster:
        self.calls.append(f"launch {cluster_name}")
        self.launch_options = {"idle_minutes_to_autostop": idle_minutes_to_autostop, "down": down}
        cluster = self.clusters.get(cluster_name)
        if cluster is None:
            infra = self._choose(task, cluster_name)
            cluster = FakeCluster(cluster_name, task, [], next(_CLUSTERS), infra=infra)
            self.clusters[cluster_name] = cluster
        cluster.task = task
        self._provision(cluster)
        self._run(cluster, task)
        return self._describe(cluster, next(self._ids))

    def status(self, cluster_name: str) -> Cluster | None:
        cluster = self.clusters.get(cluster_name)
        return self._describe(cluster) if cluster else None

    def down(self, cluster_name: str) -> None:
        self.calls.append(f"down {cluster_name}")
        cluster = self.clusters.pop(cluster_name, None)
        if cluster is None:
            return
        cluster.kill()

    def autostop(self, cluster_name: str, idle_minutes: int, down: bool) -> None:
        self.calls.append(f"autostop {cluster_name} {idle_minutes} {down}")

    def endpoints(self, cluster_name: str, port: int) -> dict[int, str]:
        cluster = self.clusters[cluster_name]
        opened = {str(p) for r in self._candidates(cluster.task) for p in r.get("ports") or []}
        return {port: f"{cluster.nodes[0].ip}:{port}"} if str(port) in opened else {}

    def job_log_tail(self, cluster_name: str, job_id: int | None, lines: int) -> str:
        cluster = self.clusters.get(cluster_name)
        if cluster is None:
            return ""
        out = []
        for rank, node in enumerate(cluster.nodes):
            for line in self._log(node).splitlines()[-lines:]:
                out.append(f"(node {rank}) {line}")
        return "\n".join(out[-lines:])

    def jobs_launch(self, task: dict[str, Any], name: str) -> int:
        job_id = next(self._ids)
        self.calls.append(f"jobs.launch {name} -> {job_id}")
        cluster = FakeCluster(f"{name}-{job_id}", task, [], next(_CLUSTERS))
        cluster.infra = self._choose(task, name)
        self._provision(cluster)
        self._run(cluster, task)
        self.jobs[job_id] = cluster
        return job_id

    def jobs_queue(self, job_id: int) -> ManagedJob | None:
        cluster = self.jobs.get(job_id)
        if cluster is None:
            return None
        head = cluster.nodes[0].runs[-1]
        code = head.poll()
        status = "RUNNING" if code is None else "SUCCEEDED" if code == 0 else "FAILED"
        if status != "RUNNING":
            cluster.kill()
        return ManagedJob(job_id, status)

    def jobs_cancel(self, job_id: int) -> None:
        cluster = self.jobs.get(job_id)
        if cluster is not None:
            cluster.kill()

    def jobs_logs(self, job_id: int, follow: bool) -> str:
        return self._log(self.jobs[job_id].nodes[0])

    # -- what a test does to the cloud -----------------------------------------------------

    def preempt(self, cluster_name: str, rank: int) -> str:
        """Kill node ``rank``'s processes, as a spot preemption would; return its address."""
        node = self.clusters[cluster_name].nodes[rank]
        node.kill()
        return node.ip

    def close(self) -> None:
        for name in list(self.clusters):
            self.down(name)
        for job in self.jobs.values():
            job.kill()

    # -- internals -------------------------------------------------------------------------

    @staticmethod
    def _candidates(task: dict[str, Any]) -> list[dict[str, Any]]:
        resources = task.get("resources") or {}
        for key in ("ordered", "any_of"):
            if key in resources:
                return list(resources[key])
        return [resources]

    def _choose(self, task: dict[str, Any], cluster_name: str) -> str:
        """The first candidate with capacity, as SkyPilot's failover would pick."""
        history = []
        for resources in self._candidates(task):
            infra = _infra(resources)
            if infra not in self.unavailable:
                return infra
            history.append(f"{infra}: no capacity (fake)")
        from sky import exceptions

        error = exceptions.ResourcesUnavailableError(
            f"Failed to provision all possible launchable resources for {cluster_name}",
            failover_history=[exceptions.ResourcesUnavailableError(h) for h in history],
        )
        from monarch_skypilot.errors import translate

        raise translate(error, cluster_name, self._candidates(task))

    def _provision(self, cluster: FakeCluster) -> None:
        wanted = int(cluster.task.get("num_nodes") or 1)
        nodes = [n for n in cluster.nodes if n.alive]  # the head stays first
        fresh = []
        while len(nodes) < wanted:
            cluster.launches += 1
            index = cluster.launches + 1
            home = self.root / cluster.name / f"node-{index}"
            home.mkdir(parents=True)
            fresh.append(FakeNode(f"127.0.{cluster.subnet}.{index}", home))
            nodes.append(fresh[-1])
        cluster.nodes = nodes
        for rank, node in enumerate(cluster.nodes):
            if node in fresh:
                self._setup(cluster, node, rank)

    def _env(self, cluster: FakeCluster, node: FakeNode) -> dict[str, str]:
        task = cluster.task
        env = {k: v for k, v in os.environ.items() if not k.startswith("SKYPILOT_")}
        env.update({k: str(v) for k, v in (task.get("envs") or {}).items()})
        env.update({k: str(v) for k, v in (task.get("secrets") or {}).items()})
        env["HOME"] = str(node.home)
        env["SKYPILOT_NUM_NODES"] = str(len(cluster.nodes))
        env["SKYPILOT_NODE_IPS"] = "\n".join(n.ip for n in cluster.nodes)
        env["SKYPILOT_TASK_ID"] = f"fake-{cluster.name}-{cluster.launches}"
        return env

    def _workdir(self, cluster: FakeCluster, node: FakeNode) -> Path:
        target = node.home / "sky_workdir"
        workdir = cluster.task.get("workdir")
        if workdir and not target.exists():
            shutil.copytree(os.path.expanduser(str(workdir)), target)
        target.mkdir(exist_ok=True)
        return target

    def _setup(self, cluster: FakeCluster, node: FakeNode, rank: int) -> None:
        setup = cluster.task.get("setup")
        cwd = self._workdir(cluster, node)
        if not setup:
            return
        env = self._env(cluster, node)
        env.update({"SKYPILOT_SETUP_NODE_RANK": str(rank), "SKYPILOT_SETUP_NUM_GPUS_PER_NODE": "0"})
        with open(node.home / "setup.log", "ab") as out:
            subprocess.run(
                ["bash", "-c", setup], cwd=cwd, env=env, stdout=out, stderr=out, check=True
            )

    def _run(self, cluster: FakeCluster, task: dict[str, Any]) -> None:
        for rank, node in enumerate(cluster.nodes):
            env = self._env(cluster, node)
            env.update({"SKYPILOT_NODE_RANK": str(rank), "SKYPILOT_NUM_GPUS_PER_NODE": "0"})
            with open(node.home / "run.log", "ab") as out:
                node.runs.append(
                    subprocess.Popen(
                        ["bash", "-c", task["run"]],
                        cwd=self._workdir(cluster, node),
                        env=env,
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=out,
                        start_new_session=True,  # the node's process group: preempt kills it
                    )
                )

    @staticmethod
    def _log(node: FakeNode) -> str:
        with contextlib.suppress(OSError):
            return (node.home / "run.log").read_text(errors="replace")
        return ""

    def _describe(self, cluster: FakeCluster, job_id: int | None = None) -> Cluster:
        live = [n for n in cluster.nodes if n.alive]
        whole = len(live) == len(cluster.nodes) and live
        ips = [n.ip for n in live]
        return Cluster(cluster.name, "UP" if whole else "INIT", ips, ips, job_id)
