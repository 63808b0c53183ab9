"""The DDP example to completion on CPU (gloo), both ways: upstream's (a controller pod in the
cluster, ``kubectl cp`` and ``kubectl exec``) and from the laptop through KubernetesJob."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import kubernetes.client as k8s
import yaml
from k8s_testenv.testing import wait_until

from monarch_k8s import KubernetesJob

EXAMPLE = Path(__file__).resolve().parents[4] / "examples" / "kubernetes_ddp"


def cpu_manifests(namespace: str) -> str:
    """ddp_mesh.yaml in ``namespace``, without the GPU requests (the test nodes are CPU-only:
    gloo instead of NCCL, one process per host)."""
    docs = [
        d for d in yaml.safe_load_all((EXAMPLE / "manifests" / "ddp_mesh.yaml").read_text()) if d
    ]
    for doc in docs:
        doc["metadata"]["namespace"] = namespace
        for subject in doc.get("subjects") or []:
            subject["namespace"] = namespace
        if doc["kind"] == "MonarchMesh":
            for container in doc["spec"]["podTemplate"]["containers"]:
                container.pop("resources", None)
    return yaml.safe_dump_all(docs)


def load_example() -> Any:
    spec = importlib.util.spec_from_file_location("kubernetes_ddp", EXAMPLE / "kubernetes_ddp.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["kubernetes_ddp"] = module
    spec.loader.exec_module(module)
    return module


def test_ddp_example_runs_from_a_controller_pod_and_from_the_laptop(
    monarch_operator: Any, k8s_cluster: Any, k8s_api: Any, k8s_namespace: str
) -> None:
    ns = k8s_namespace
    applied = k8s_cluster.kubectl("apply", "-f", "-", input=cpu_manifests(ns).encode())
    assert applied.returncode == 0, applied.stderr.decode()
    core = k8s.CoreV1Api(k8s_api)

    def running(name: str) -> bool:
        return core.read_namespaced_pod(name, ns).status.phase == "Running"

    wait_until(lambda: running("ddp-controller"), timeout=120, what="the controller pod")
    wait_until(
        lambda: all(running(f"ddpmesh-{i}") for i in range(2)) if len(
            core.list_namespaced_pod(ns, label_selector="monarch.pytorch.org/mesh-name=ddpmesh").items
        ) == 2 else False,
        timeout=180, what="the mesh's pods",
    )  # fmt: skip

    # upstream's way: copy the script into the controller pod and run it there
    copied = k8s_cluster.kubectl(
        "cp", str(EXAMPLE / "kubernetes_ddp.py"), f"{ns}/ddp-controller:/tmp/kubernetes_ddp.py"
    )
    assert copied.returncode == 0, copied.stderr.decode()
    ran = k8s_cluster.kubectl(
        "exec", "ddp-controller", "-n", ns, "--", "python", "/tmp/kubernetes_ddp.py",
        "--num_hosts", "2", "--gpus_per_host", "1", "--namespace", ns, "--steps", "5",
        timeout=300,
    )  # fmt: skip
    out = ran.stdout.decode()
    assert ran.returncode == 0, out + ran.stderr.decode()
    assert "DDP finished on 2 ranks" in out, out

    # from the laptop: the same actors through KubernetesJob (which fronts the mesh with a
    # gateway, and takes it away again on kill())
    example = load_example()
    job = KubernetesJob(name="ddpmesh", namespace=ns, api_client=k8s_api, timeout=240)
    try:
        reports = example.run_ddp(job.state().workers, 1, 5)
    finally:
        job.kill()
    assert [r["rank"] for r in reports] == [0, 1]
    assert len({round(r["checksum"], 6) for r in reports}) == 1  # DDP kept the replicas equal
    mesh = k8s.CustomObjectsApi(k8s_api).get_namespaced_custom_object(
        "monarch.pytorch.org", "v1alpha1", ns, "monarchmeshes", "ddpmesh"
    )
    assert "gateway" not in mesh["spec"]  # the user's mesh is as it was
