"""Benchmark the k8s-testenv control plane and process kubelet.

Measures (binaries already built; run ``k8s-testenv build`` first or let this build them):

* ``cold_start_s``: from nothing to a usable cluster (etcd, kube-apiserver,
  kube-controller-manager, kube-scheduler and the kubelet up, nodes Ready, the default
  ServiceAccount present);
* ``statefulset_running_s``: for StatefulSets of 1, 16 and 64 replicas
  (``podManagementPolicy: Parallel``, each pod a ``sleep`` process), the time from the create
  call until every pod reports phase Running. Each StatefulSet is deleted (and its pods
  gone) before the next one;
* ``portforward_mb_s`` / ``direct_mb_s``: download rate of a 64 MiB HTTP response from a pod,
  through ``kubectl port-forward`` (kubectl -> API server -> kubelet streaming helper -> pod)
  and straight to the pod IP; ``portforward_rtt_ms`` / ``direct_rtt_ms``: one small HTTP
  request's round trip on a kept-alive connection, the same two ways. Medians of ``--runs``.
  ``portforward_python_mb_s`` / ``portforward_python_rtt_ms``: the same through the official
  Python client's ``kubernetes.stream.portforward`` (what ``KubernetesJob`` uses);
* ``pvc_pod_running_s``: the time from creating a PersistentVolumeClaim (default StorageClass,
  host-path provisioner) and a pod that mounts it to the pod Running, median of ``--runs``,
  beside ``plain_pod_running_s``, the same for a pod without any volume (not even the
  service-account token), measured in the same run.

Usage: ``uv run python benchmarks/k8s_testenv.py [--replicas 1,16,64] [--runs 5] [--json FILE]``
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# This file shares its name with the package: drop its folder from sys.path before importing.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import kubernetes.client  # noqa: E402
from k8s_testenv import KUBE_VERSION, Cluster, ensure_binaries, start_cluster  # noqa: E402
from k8s_testenv.kubelet.api import RestClient  # noqa: E402
from k8s_testenv.testing import statefulset_manifest, wait_until  # noqa: E402
from kubernetes.stream import portforward  # noqa: E402


def statefulset(name: str, replicas: int) -> dict[str, Any]:
    sleeper = {"name": "main", "image": "none", "command": ["sleep", "3600"]}
    return statefulset_manifest(name, replicas, [sleeper], grace_s=1)


def phases(rest: RestClient, name: str) -> list[str]:
    pods = rest.get("/api/v1/namespaces/default/pods", labelSelector=f"app={name}")["items"]
    return [p.get("status", {}).get("phase", "") for p in pods]


def time_statefulset(rest: RestClient, replicas: int, timeout: float) -> float:
    name = f"bench-{replicas}"
    started = time.perf_counter()
    rest.request(
        "POST", "/apis/apps/v1/namespaces/default/statefulsets", statefulset(name, replicas)
    )

    def all_running() -> bool:
        seen = phases(rest, name)
        return len(seen) == replicas and all(p == "Running" for p in seen)

    wait_until(all_running, timeout=timeout, what=f"{replicas} pods Running")
    elapsed = time.perf_counter() - started
    rest.request(
        "DELETE",
        f"/apis/apps/v1/namespaces/default/statefulsets/{name}",
        {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"},
    )
    wait_until(lambda: not phases(rest, name), timeout=timeout, what="pods deleted")
    return elapsed


PODSERVER = (
    Path(__file__).resolve().parents[1] / "packages/k8s-testenv/tests/integration/podserver.py"
)


Connect = Callable[[], http.client.HTTPConnection]


def _download_mb_s(connect: Connect, size: int) -> float:
    conn = connect()
    started = time.perf_counter()
    conn.request("GET", f"/bytes/{size}")
    resp = conn.getresponse()
    got = 0
    while chunk := resp.read(1 << 20):
        got += len(chunk)
    elapsed = time.perf_counter() - started
    conn.close()
    assert got == size, f"read {got} of {size} bytes"
    return size / elapsed / 1e6


def _rtt_ms(connect: Connect, rounds: int = 200) -> float:
    conn = connect()
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        conn.request("GET", "/bytes/1")
        conn.getresponse().read()
        times.append(time.perf_counter() - started)
    conn.close()
    return statistics.median(times) * 1e3


def time_pod(rest: RestClient, name: str, *, with_claim: bool, timeout: float) -> float:
    """Seconds from creating (a claim and) a pod to the pod Running; both deleted after."""
    ns = "/api/v1/namespaces/default"
    spec: dict[str, Any] = {
        "terminationGracePeriodSeconds": 0,
        "automountServiceAccountToken": False,
        "containers": [{"name": "main", "image": "none", "command": ["sleep", "3600"]}],
    }
    claim = {
        "metadata": {"name": name},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
    }
    if with_claim:
        spec["volumes"] = [{"name": "data", "persistentVolumeClaim": {"claimName": name}}]
        spec["containers"][0]["volumeMounts"] = [{"name": "data", "mountPath": "/tmp/bench-pvc"}]
    started = time.perf_counter()
    if with_claim:
        rest.request("POST", f"{ns}/persistentvolumeclaims", claim)
    rest.request("POST", f"{ns}/pods", {"metadata": {"name": name}, "spec": spec})
    # poll every 10 ms (wait_until's 0.2 s would be the whole measurement)
    while rest.get(f"{ns}/pods/{name}").get("status", {}).get("phase") != "Running":
        if time.perf_counter() - started > timeout:
            raise TimeoutError(f"{name} not Running after {timeout:.0f}s")
        time.sleep(0.01)
    elapsed = time.perf_counter() - started
    rest.request("DELETE", f"{ns}/pods/{name}")
    if with_claim:
        rest.request("DELETE", f"{ns}/persistentvolumeclaims/{name}")
    gone = [f"{ns}/pods"] + (
        [f"{ns}/persistentvolumeclaims", "/api/v1/persistentvolumes"] if with_claim else []
    )
    wait_until(
        lambda: not any(rest.get(path)["items"] for path in gone),
        timeout=timeout,
        what=f"{name} deleted",
    )
    return elapsed


def portforward_figures(cluster: Cluster, runs: int, size: int = 64 << 20) -> dict[str, float]:
    """Throughput and round trip to a pod's HTTP server: directly to the pod IP, through
    ``kubectl port-forward``, and through the Python client's ``portforward``."""
    rest = cluster.rest()
    env = [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]
    container = {"name": "web", "image": "python", "command": [sys.executable, str(PODSERVER)]}
    pod = {"metadata": {"name": "bench-web"}, "spec": {"containers": [{**container, "env": env}]}}
    rest.request("POST", "/api/v1/namespaces/default/pods", pod)
    forward: subprocess.Popen[bytes] | None = None
    api = cluster.api_client()
    tunnels: list[Any] = []
    try:

        def serving() -> str | None:
            ip = (
                rest.get("/api/v1/namespaces/default/pods/bench-web").get("status", {}).get("podIP")
            )
            try:
                return (
                    ip if ip and _rtt_ms(lambda: http.client.HTTPConnection(ip, 8080), 1) else None
                )
            except OSError:
                return None

        pod_ip = wait_until(serving, timeout=60, what="bench-web serving")
        forward = subprocess.Popen(
            [str(cluster.kubectl_path), "port-forward", "pod/bench-web", ":8080"],
            env=cluster.kubectl_env(), stdout=subprocess.PIPE,
        )  # fmt: skip
        assert forward.stdout is not None
        local = int(re.findall(rb"127\.0\.0\.1:(\d+)", forward.stdout.readline())[0])

        def python_client() -> http.client.HTTPConnection:
            core = kubernetes.client.CoreV1Api(api)
            pf = portforward(core.connect_get_namespaced_pod_portforward, "bench-web", "default",
                             ports="8080")  # fmt: skip
            tunnels.append(pf)
            conn = http.client.HTTPConnection("bench-web", 8080, timeout=120)
            conn.sock = pf.socket(8080)
            return conn

        paths: dict[str, Connect] = {
            "direct": lambda: http.client.HTTPConnection(pod_ip, 8080, timeout=120),
            "portforward": lambda: http.client.HTTPConnection("127.0.0.1", local, timeout=120),
            "portforward_python": python_client,
        }
        rates: dict[str, list[float]] = {name: [] for name in paths}
        rtts: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(runs):  # interleaved, so every way sees the same machine load
            for name, connect in paths.items():
                rates[name].append(_download_mb_s(connect, size))
                rtts[name].append(_rtt_ms(connect))
    finally:
        for pf in tunnels:
            pf.close()
        api.close()
        if forward is not None:
            forward.terminate()
            forward.wait(10)
        rest.request("DELETE", "/api/v1/namespaces/default/pods/bench-web")
    figures = {}
    for name in paths:
        figures[f"{name}_mb_s"] = round(statistics.median(rates[name]), 1)
        figures[f"{name}_rtt_ms"] = round(statistics.median(rtts[name]), 3)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--replicas", default="1,16,64", help="comma-separated StatefulSet sizes")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--runs", type=int, default=5, help="runs per figure (medians)")
    args = parser.parse_args()
    sizes = [int(n) for n in args.replicas.split(",")]

    build_started = time.perf_counter()
    ensure_binaries()
    build_s = time.perf_counter() - build_started

    started = time.perf_counter()
    cluster: Cluster = start_cluster()
    cold_start_s = time.perf_counter() - started
    print(f"cold start: {cold_start_s:.2f}s (binaries ready in {build_s:.1f}s)")
    try:
        rest = cluster.rest()
        running: dict[str, float] = {}
        for replicas in sizes:
            running[str(replicas)] = round(time_statefulset(rest, replicas, args.timeout), 3)
            print(f"StatefulSet of {replicas}: all Running after {running[str(replicas)]:.2f}s")
        pods: dict[str, list[float]] = {"plain": [], "pvc": []}
        for i in range(args.runs):  # interleaved, so both cases see the same conditions
            for case in pods:
                seconds = time_pod(
                    rest, f"{case}-{i}", with_claim=case == "pvc", timeout=args.timeout
                )
                pods[case].append(seconds)
        plain_s, pvc_s = (round(statistics.median(pods[c]), 3) for c in ("plain", "pvc"))
        print(
            f"pod with a PVC Running: x{pvc_s / plain_s:.1f} the time of a pod without volumes "
            f"({pvc_s:.3f}s vs {plain_s:.3f}s; medians of {args.runs})"
        )
        forwarding = portforward_figures(cluster, args.runs)
        print(
            f"port-forward / direct: {forwarding['portforward_mb_s'] / forwarding['direct_mb_s']:.2f}x"
            f" throughput ({forwarding['portforward_mb_s']} vs {forwarding['direct_mb_s']} MB/s),"
            f" {forwarding['portforward_rtt_ms'] / forwarding['direct_rtt_ms']:.1f}x round trip"
            f" ({forwarding['portforward_rtt_ms']} vs {forwarding['direct_rtt_ms']} ms);"
            f" Python client: {forwarding['portforward_python_mb_s'] / forwarding['direct_mb_s']:.2f}x"
            f" ({forwarding['portforward_python_mb_s']} MB/s),"
            f" {forwarding['portforward_python_rtt_ms'] / forwarding['direct_rtt_ms']:.1f}x round trip"
            f" ({forwarding['portforward_python_rtt_ms']} ms)"
        )
    finally:
        cluster.stop()
    result = {
        "kubernetes": KUBE_VERSION,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "binaries_ready_s": round(build_s, 3),
        "cold_start_s": round(cold_start_s, 3),
        "statefulset_running_s": running,
        "pvc_vs_plain_ratio": round(pvc_s / plain_s, 2),
        "pvc_pod_running_s": pvc_s,
        "plain_pod_running_s": plain_s,
        **forwarding,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
