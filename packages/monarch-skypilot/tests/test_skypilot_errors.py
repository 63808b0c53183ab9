"""Each setup problem is a typed error that names the next step.

Faked: the cloud only (``FakeCloud``; a cluster that never comes up is a one-method variant of
it), because these are the cloud's answers. The CUDA and "never listens" cases run the task's
real ``run`` string with a ``python_exe`` that behaves as a broken node's interpreter would
(a CUDA build on a CPU-only node fails importing ``libcuda.so.1``; a worker that cannot bind
hangs), so the error is built from the node's real log.
"""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import pytest
import sky

from monarch_skypilot import (
    ClusterNotUpError,
    CudaRequiredError,
    ResourcesUnavailableError,
    SkyPilotJob,
    WorkersNotListeningError,
)
from monarch_skypilot.sdk import Cluster
from monarch_skypilot.testing import FakeCloud


def interpreter(tmp_path: Path, body: str) -> str:
    path = tmp_path / "python"
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def job_on(cloud: Any, tmp_path: Path, python: str = "python", **kw: Any) -> SkyPilotJob:
    return SkyPilotJob(
        meshes={"trainers": 2},
        resources=kw.pop("resources", sky.Resources(infra="aws")),
        cluster_name=kw.pop("cluster_name", "broken"),
        python_exe=python,
        setup_commands=":",
        image_id=None,
        sky=cloud,
        ready_timeout=3,
        log=None,
        **kw,
    )


def test_a_cpu_only_node_running_a_cuda_build_says_to_request_gpus(
    cloud: FakeCloud, tmp_path: Path, ports: dict[str, int]
) -> None:
    python = interpreter(
        tmp_path,
        'echo "ImportError: libcuda.so.1: cannot open shared object file: No such file" >&2\n'
        "exit 1",
    )
    job = job_on(cloud, tmp_path, python, **ports)
    with pytest.raises(CudaRequiredError, match=r"accelerators=") as info:
        job.state(cached_path=None)
    assert "libcuda.so.1" in str(info.value)
    job.kill()


def test_workers_that_never_listen_show_the_worker_logs_last_lines(
    cloud: FakeCloud, tmp_path: Path, ports: dict[str, int]
) -> None:
    python = interpreter(tmp_path, 'echo "bind tcp://0.0.0.0: Address already in use"\nsleep 600')
    job = job_on(cloud, tmp_path, python, mode="direct", **ports)
    with pytest.raises(WorkersNotListeningError, match="sky logs broken") as info:
        job.state(cached_path=None)
    assert "Address already in use" in info.value.log_tail
    job.kill()


def test_no_capacity_anywhere_lists_the_failover_history(
    tmp_path: Path, ports: dict[str, int]
) -> None:
    cloud = FakeCloud(tmp_path / "cloud", unavailable={"aws/us-east-1", "gcp"})
    candidates = [sky.Resources(infra="aws/us-east-1"), sky.Resources(infra="gcp")]
    job = job_on(cloud, tmp_path, resources=candidates, **ports)
    with pytest.raises(ResourcesUnavailableError, match="use_spot") as info:
        job.state(cached_path=None)
    assert len(info.value.failover_history) == 2
    assert "aws/us-east-1" in info.value.failover_history[0]
    assert "gcp" in info.value.failover_history[1]


def test_failover_takes_the_next_candidate_with_capacity(
    tmp_path: Path, ports: dict[str, int]
) -> None:
    cloud = FakeCloud(tmp_path / "cloud", unavailable={"aws/us-east-1"})
    candidates = [sky.Resources(infra="aws/us-east-1"), sky.Resources(infra="gcp")]
    python = interpreter(tmp_path, "sleep 600")
    job = job_on(cloud, tmp_path, python, resources=candidates, mode="direct", **ports)
    try:
        with pytest.raises(WorkersNotListeningError):
            job.state(cached_path=None)
        assert cloud.clusters["broken"].infra == "gcp"
    finally:
        job.kill()
        cloud.close()


class NeverUp(FakeCloud):
    """A cloud whose cluster stays INIT with one node of two (provisioning never finished)."""

    def launch(self, task: dict[str, Any], cluster_name: str, **kw: Any) -> Cluster:
        self.calls.append(f"launch {cluster_name}")
        return Cluster(cluster_name, "INIT", ["10.0.0.1"], [], None)

    def status(self, cluster_name: str) -> Cluster | None:
        return Cluster(cluster_name, "INIT", ["10.0.0.1"], [], None)


def test_a_cluster_that_never_comes_up_says_where_to_look(
    tmp_path: Path, ports: dict[str, int]
) -> None:
    job = job_on(NeverUp(tmp_path / "cloud"), tmp_path, **ports)
    with pytest.raises(ClusterNotUpError, match=r"sky status broken") as info:
        job.state(cached_path=None)
    assert info.value.status == "INIT"
