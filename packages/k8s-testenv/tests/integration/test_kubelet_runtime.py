"""PodWorker against real processes, without a cluster: restarts, back-off, kill, probes."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from k8s_testenv.kubelet.podspec import PodNetwork
from k8s_testenv.kubelet.runtime import KubeletSettings, PodWorker
from k8s_testenv.kubelet.status import Phase, State, pod_phase
from k8s_testenv.testing import pid_alive

pytestmark = pytest.mark.timeout(60)


def worker(tmp_path: Path, containers: list[dict[str, Any]], **spec: Any) -> PodWorker:
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n")
    pod = {
        "metadata": {"name": "p", "namespace": "ns", "uid": "u-1"},
        "spec": {"nodeName": "node-0", "containers": containers, **spec},
    }
    return PodWorker(
        pod,
        net=PodNetwork(pod_ip="127.10.200.1", host_ip="127.0.0.1", node_name="node-0"),
        root=tmp_path / "pod",
        hosts_file=hosts,
        base_env=dict(os.environ),
        lookup=lambda kind, ns, name: None,
        settings=KubeletSettings(backoff_base=0.3, backoff_cap=1.0, max_grace=30),
        pgid_dir=tmp_path,
        now=time.time(),
    )


def drive(w: PodWorker, until: Callable[[], bool], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, "timed out driving the pod worker"
        w.sync(time.time())
        time.sleep(0.02)


def test_on_failure_restarts_with_doubling_backoff_and_keeps_previous_log(tmp_path: Path) -> None:
    w = worker(
        tmp_path,
        [{"name": "c", "command": ["/bin/sh", "-c", "echo run; exit 4"]}],
        restartPolicy="OnFailure",
    )
    record = w.records[0]
    starts: dict[int, float] = {}

    def two_restarts() -> bool:
        if record.state is State.RUNNING and record.started_at is not None:
            starts[record.restart_count] = record.started_at
        return len(starts) == 3

    drive(w, two_restarts)
    # back-off before restart n is 0.3 s * 2^(n-1): 0.3 s, then 0.6 s (plus the run time)
    assert starts[1] - starts[0] >= 0.3
    assert starts[2] - starts[1] >= 0.6
    assert record.last_termination is not None and record.last_termination[0] == 4
    assert pod_phase(w.policy, w.init_records, w.records) is Phase.RUNNING
    assert w.log_path("c", previous=True).read_text().strip() == "run"
    w.kill_now()


def test_termination_escalates_to_sigkill_after_the_grace_period(tmp_path: Path) -> None:
    script = "trap '' TERM; sleep 30 & wait; sleep 30"
    w = worker(tmp_path, [{"name": "c", "command": ["/bin/sh", "-c", script]}])
    drive(w, lambda: w.records[0].state is State.RUNNING)
    pid = int(w.records[0].extra["pid"])
    time.sleep(0.2)  # let the shell install its trap
    started = time.monotonic()
    w.begin_termination(time.time(), grace=0.5)
    drive(w, lambda: w.terminated)
    assert time.monotonic() - started >= 0.4
    assert not pid_alive(pid)
    assert not list(tmp_path.glob("[0-9]*")), "process-group files are removed once reaped"


def test_exec_readiness_probe_marks_the_container_ready(tmp_path: Path) -> None:
    flag = tmp_path / "ready"
    container = {
        "name": "c",
        "command": ["/bin/sh", "-c", f"sleep 0.5; touch {flag}; exec sleep 30"],
        "readinessProbe": {"exec": {"command": ["test", "-f", str(flag)]}, "periodSeconds": 0.2},
    }
    w = worker(tmp_path, [container])
    drive(w, lambda: w.records[0].state is State.RUNNING)
    assert not w.records[0].ready
    drive(w, lambda: w.records[0].ready)
    assert flag.exists()
    status = w.status(time.time())
    assert {c["type"]: c["status"] for c in status["conditions"]}["Ready"] == "True"
    assert status["podIP"] == "127.10.200.1"
    w.kill_now()


def test_failing_liveness_probe_kills_and_restarts_the_container(tmp_path: Path) -> None:
    container = {
        "name": "c",
        "command": ["sleep", "30"],
        "livenessProbe": {
            "exec": {"command": ["false"]},
            "periodSeconds": 0.1,
            "failureThreshold": 2,
        },
    }
    w = worker(tmp_path, [container])
    record = w.records[0]
    drive(w, lambda: record.state is State.RUNNING)
    first_pid = record.extra["pid"]
    drive(w, lambda: record.restart_count == 1 and record.state is State.RUNNING)
    assert record.last_termination is not None and record.last_termination[0] == 137
    assert not pid_alive(first_pid) and record.extra["pid"] != first_pid
    w.kill_now()


def test_container_without_command_reports_create_container_config_error(tmp_path: Path) -> None:
    w = worker(tmp_path, [{"name": "c", "image": "nginx"}])
    w.sync(time.time())
    status = w.status(time.time())["containerStatuses"][0]
    assert status["state"] == {"waiting": {"reason": "CreateContainerConfigError"}}
