"""Workers from a Kubernetes label selector (``--mesh-selector``), on a real control plane
(k8s-testenv) whose process kubelet runs real torchmonarch workers as pods: the gateway lists
and watches the Ready pods, and takes in the pod a StatefulSet recreates."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import kubernetes.client as k8s

from monarch_gateway.local import READY_TIMEOUT_S, child_env
from monarch_proxy import connect

PORT = 26600


def workers_statefulset(replicas: int) -> dict[str, Any]:
    container = {
        "name": "worker",
        "image": "python:3.11",  # required by the API; the process kubelet runs `command`
        "command": [sys.executable, "-m", "monarch_gateway.worker", f"tcp://$(POD_IP):{PORT}"],
        "env": [
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "PYTHONPATH", "value": child_env()["PYTHONPATH"]},  # tests/actors.py
        ],
        "readinessProbe": {"tcpSocket": {"port": PORT}, "periodSeconds": 1},
    }
    return {
        "metadata": {"name": "workers"},
        "spec": {
            "replicas": replicas,
            "serviceName": "workers",
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": {"app": "workers"}},
            "template": {
                "metadata": {"labels": {"app": "workers"}},
                "spec": {"containers": [container], "terminationGracePeriodSeconds": 1},
            },
        },
    }


def start_gateway(
    namespace: str, kubeconfig: Path, tmp: Path
) -> tuple[subprocess.Popen[bytes], str]:
    ready = tmp / "gateway.ready"
    argv = [sys.executable, "-m", "monarch_gateway", "serve", "--port", "0"]
    argv += ["--mesh-selector", f"hosts={namespace}/app=workers:{PORT}"]
    argv += ["--ready-file", str(ready), "--insecure-no-token", "--no-stream-output"]
    env = child_env({"KUBECONFIG": str(kubeconfig)})
    with open(tmp / "gateway.log", "wb") as log:
        gateway = subprocess.Popen(argv, env=env, stdout=log, stderr=log, start_new_session=True)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not ready.exists():
        assert gateway.poll() is None, (tmp / "gateway.log").read_text()[-3000:]
        assert time.monotonic() < deadline, (tmp / "gateway.log").read_text()[-3000:]
        time.sleep(0.1)
    return gateway, json.loads(ready.read_text())["url"]


def pids(job: Any) -> set[int]:
    mesh = job.hosts.spawn_procs(per_host={"procs": 1}).spawn("w", "actors:Worker")
    return {v["pid"] for v in mesh.whoami.call().get(timeout=120).values()}


def test_selector_source_attaches_ready_pods_and_a_recreated_one(
    k8s_cluster: Any, k8s_api: Any, k8s_namespace: str, tmp_path: Path
) -> None:
    apps, core = k8s.AppsV1Api(k8s_api), k8s.CoreV1Api(k8s_api)
    apps.create_namespaced_stateful_set(k8s_namespace, workers_statefulset(2))
    gateway, url = start_gateway(k8s_namespace, k8s_cluster.kubeconfig, tmp_path)
    try:
        with connect(url, None) as job:
            assert job.hosts.extent.as_dict() == {"hosts": 2}
            assert len(pids(job)) == 2
            replaced = threading.Event()
            job.on_membership(lambda state: "replaced" in state and replaced.set())
            core.delete_namespaced_pod("workers-1", k8s_namespace, grace_period_seconds=0)
            # The gateway notices the pod go (probes or the watch), then takes in the new one
            # (at a new pod IP, or the same one: either way a new worker).
            assert replaced.wait(120), (tmp_path / "gateway.log").read_text()[-3000:]
            assert job.wait_for_workers(timeout=60)["whole"]
            assert len(pids(job)) == 2  # a mesh spawned now reaches both pods
    finally:
        gateway.terminate()
        gateway.wait(30)
