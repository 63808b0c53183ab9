"""Helpers for tests and benchmarks on a k8s-testenv cluster (or any cluster); they need
k8s-testenv installed (a dev dependency: nothing else in this package imports this module).

- :func:`install_with_kubectl`: ``kubectl apply -k`` an overlay of the shipped base (the
  operator as a pod under its own ServiceAccount), tuned for the process kubelet, and wait
  until the operator runs.
- :func:`reconcile_latency`: time from a MonarchMesh spec change to the child updated.
- :func:`kubectl`, :func:`kubectl_apply`: the cluster's kubectl, which finds
  ``kubectl-torchrun`` on PATH; :func:`cpu_queue`, :func:`torchrun_status`: a TorchrunQueue
  for CPU workers and a TorchrunJob's status, for the torchrun tests and benchmark.
"""

from __future__ import annotations

import functools
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from k8s_testenv.testing import wait_until
from kubernetes import client

from monarch_k8s import names
from monarch_k8s.install import manifests_dir
from monarch_k8s.torchrun import names as torchrun_names

__all__ = [
    "cpu_queue",
    "install_with_kubectl",
    "kubectl",
    "kubectl_apply",
    "kustomize_overlay",
    "reconcile_latency",
    "torchrun_status",
]


def kustomize_overlay(
    folder: Path, *, namespace: str = names.OPERATOR_NAMESPACE, env: dict[str, str] | None = None
) -> Path:
    """Write an overlay of the shipped base into ``folder``: its namespace, the operator's env."""
    folder.mkdir(parents=True, exist_ok=True)
    base = os.path.relpath(str(manifests_dir()), folder.resolve())
    overlay: dict[str, Any] = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": namespace,
        "resources": [base],
    }
    if env:
        patch = {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "monarch-operator", "namespace": names.OPERATOR_NAMESPACE},
            "spec": {"template": {"spec": {"containers": [{
                "name": "operator", "env": [{"name": k, "value": v} for k, v in env.items()],
            }]}}},
        }  # fmt: skip
        overlay["patches"] = [{"patch": yaml.safe_dump(patch)}]
    (folder / "kustomization.yaml").write_text(yaml.safe_dump(overlay))
    return folder


def operator_pod(api_client: client.ApiClient, namespace: str) -> Any:
    pods = (
        client.CoreV1Api(api_client)
        .list_namespaced_pod(namespace, label_selector=f"{names.APP_LABEL}=monarch-operator")
        .items
    )
    for pod in pods:
        if pod_ready(pod):
            return pod
    return None


def pod_ready(pod: Any) -> bool:
    if pod.metadata is None or pod.metadata.deletion_timestamp is not None or pod.status is None:
        return False
    return any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])


def install_with_kubectl(
    cluster: Any,
    namespace: str = names.OPERATOR_NAMESPACE,
    *,
    env: dict[str, str] | None = None,
    timeout: float = 120,
) -> Any:
    """``kubectl apply -k`` the base for a k8s-testenv ``cluster`` (pods bind their pod IP;
    resync every 2 s); wait for the CRD and a Ready operator pod, and return that pod."""
    settings = {"MONARCH_LISTEN_HOST": "podIP", "MONARCH_RESYNC_SECONDS": "2", **(env or {})}
    with tempfile.TemporaryDirectory() as tmp:
        folder = kustomize_overlay(Path(tmp) / "overlay", namespace=namespace, env=settings)
        result = cluster.kubectl("apply", "--server-side", "--force-conflicts", "-k", str(folder))
    if result.returncode != 0:
        raise RuntimeError(f"kubectl apply -k failed: {result.stderr.decode()}")
    api = cluster.api_client()
    return wait_until(
        lambda: operator_pod(api, namespace), timeout=timeout, what="a Ready operator pod"
    )


def reconcile_latency(
    api_client: client.ApiClient, namespace: str, *, samples: int = 20, name: str = "latency"
) -> dict[str, float]:
    """p50/p99 ms from a MonarchMesh spec change (``spec.replicas``) to its StatefulSet
    carrying it, with the operator running. The mesh is suspended, so no pod starts."""
    custom, apps = client.CustomObjectsApi(api_client), client.AppsV1Api(api_client)
    body = {
        "apiVersion": f"{names.GROUP}/{names.VERSION}",
        "kind": names.KIND,
        "metadata": {"name": name},
        "spec": {
            "replicas": 1,
            "suspend": True,
            "podTemplate": {"containers": [{"name": "w", "image": "x"}]},
        },
    }
    custom.create_namespaced_custom_object(
        names.GROUP, names.VERSION, namespace, names.PLURAL, body
    )

    def sts_annotation() -> str | None:
        try:
            sts = apps.read_namespaced_stateful_set(name, namespace)
        except client.ApiException:
            return None
        annotations = sts.metadata.annotations if sts.metadata is not None else None
        return (annotations or {}).get(names.TEMPLATE_HASH_ANNOTATION)

    def changed_from(old: str | None) -> bool:
        new = sts_annotation()
        return new is not None and new != old

    times: list[float] = []
    try:
        previous: str | None = wait_until(sts_annotation, timeout=60, what="the StatefulSet")
        for i in range(samples):
            patch = {"spec": {"podTemplate": {"containers": [{"name": "w", "image": f"x:{i}"}]}}}
            start = time.perf_counter()
            custom.patch_namespaced_custom_object(
                names.GROUP, names.VERSION, namespace, names.PLURAL, name, patch
            )
            wait_until(
                functools.partial(changed_from, previous),
                timeout=60,
                what="the StatefulSet template to change",
                interval=0.005,
            )
            times.append((time.perf_counter() - start) * 1000)
            previous = sts_annotation()
    finally:
        custom.delete_namespaced_custom_object(
            names.GROUP, names.VERSION, namespace, names.PLURAL, name
        )
    times.sort()
    return {
        "reconcile_p50_ms": statistics.median(times),
        "reconcile_p99_ms": times[min(len(times) - 1, round(0.99 * (len(times) - 1)))],
        "samples": float(len(times)),
    }


# -- torchrun ---------------------------------------------------------------------------------


def cpu_queue(workspace_per_gpu: str = "16Mi", name: str = "cpu") -> str:
    """A TorchrunQueue (YAML) whose nodes are one CPU, with the workspace (monarch-sync)
    enabled: what the torchrun tests and benchmark submit to."""
    return f"""\
apiVersion: torchrun.ai/v1alpha1
kind: TorchrunQueue
metadata: {{name: {name}}}
spec:
  image: pytorch/pytorch:latest
  nodeResources: {{gpus: 0, cpus: 1, memory: 2Gi}}
  storage:
    workspace: {{enabled: true, sizePerGPU: {workspace_per_gpu}}}
"""


def kubectl(
    cluster: Any,
    *args: str,
    cwd: Path | None = None,
    input: str | None = None,
    timeout: float = 300,
    check: bool = False,
) -> subprocess.CompletedProcess[str]:
    """The k8s-testenv ``cluster``'s kubectl (its plugin lookup finds ``kubectl-torchrun`` on
    PATH), text in and out; ``check``: a RuntimeError with its stderr when it fails."""
    sent = input.encode() if input is not None else None
    done = cluster.kubectl(*args, input=sent, timeout=timeout, cwd=cwd)
    result = subprocess.CompletedProcess(
        done.args, done.returncode, done.stdout.decode(), done.stderr.decode()
    )
    if check and result.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)} failed: {result.stderr}")
    return result


def kubectl_apply(cluster: Any, namespace: str, text: str) -> None:
    """``kubectl apply -f -`` of ``text`` (YAML) in ``namespace``."""
    kubectl(cluster, "apply", "-n", namespace, "-f", "-", input=text, check=True)


def torchrun_status(api_client: client.ApiClient, namespace: str, job: str) -> dict[str, Any]:
    """A TorchrunJob's ``status`` (empty before the operator's first pass)."""
    obj: Any = client.CustomObjectsApi(api_client).get_namespaced_custom_object(
        torchrun_names.GROUP, torchrun_names.VERSION, namespace, torchrun_names.JOB_PLURAL, job
    )
    return dict(obj.get("status") or {})
