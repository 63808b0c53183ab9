"""The workspace through monarch-sync (``torchrun/workspace.py``, ``torchrun/cache.py``), with
the operator running as a pod from the install manifests: a job whose version was not uploaded
yet is ``Syncing`` and its worker waits in its init container; once the version reaches the
namespace's cache (here: ``kubectl torchrun sync``), the cache feeds the worker, which runs the
workspace's script. The token stays in its Secret.
"""

from __future__ import annotations

import base64
import time
from pathlib import Path
from typing import Any

import kubernetes.client as k8s
from k8s_testenv.testing import wait_until

from monarch_k8s.testing import cpu_queue, kubectl, kubectl_apply, torchrun_status
from monarch_k8s.torchrun import names
from monarch_k8s.torchrun.cache import (
    CACHE_NAME,
    CONTAINER_INIT,
    LIVE_ANNOTATION,
    TOKEN_KEY,
    TOKEN_SECRET,
)
from monarch_sync import scan_tree

JOB = """\
apiVersion: torchrun.ai/v1alpha1
kind: TorchrunJob
metadata: {{name: waits}}
spec:
  jobQueue: cpu
  numNodes: 1
  procsPerNode: 1
  command: "python hello.py"
  workspace: {{version: "{version}"}}
"""


def test_workers_wait_in_syncing_until_the_cache_feeds_them_the_submitted_version(
    k8s_cluster: Any, k8s_api: Any, monarch_operator: Any, k8s_namespace: str, tmp_path: Path
) -> None:
    ns, core = k8s_namespace, k8s.CoreV1Api(k8s_api)
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "hello.py").write_text("print('hello from the workspace', flush=True)\n")
    version = scan_tree(ws).root_hash
    kubectl_apply(k8s_cluster, ns, cpu_queue())
    kubectl_apply(k8s_cluster, ns, JOB.format(version=version))  # as YAML, nothing uploaded yet

    selector = f"{names.JOB_LABEL}=waits"

    def waiting_in_init() -> bool:
        pods = core.list_namespaced_pod(ns, label_selector=selector).items
        statuses = [s for p in pods for s in p.status.init_container_statuses or []]
        return any(s.name == CONTAINER_INIT and s.state.running for s in statuses)

    wait_until(waiting_in_init, timeout=120, what="the worker waiting in workspace-sync")
    time.sleep(2)  # a few feeder and operator passes: still nothing to feed
    status = torchrun_status(k8s_api, ns, "waits")
    assert status["phase"] == "Syncing", status
    ready = next(c for c in status["conditions"] if c["type"] == "WorkspaceReady")
    assert (
        ready["status"] == "False"
        and f"0/1 workers hold workspace {version[:12]}" in ready["message"]
    )
    assert waiting_in_init()  # the trainer has not started

    # the cache scaled away by hand comes back: the operator scales it up again and the job
    # keeps waiting (a pass once sent the scale as a whole-object replace: refused, job Failed)
    apps = k8s.AppsV1Api(k8s_api)
    apps.patch_namespaced_deployment_scale(CACHE_NAME, ns, {"spec": {"replicas": 0}})
    wait_until(
        lambda: apps.read_namespaced_deployment(CACHE_NAME, ns).spec.replicas == 1,
        timeout=60, what="the operator scaling the cache back to 1",
    )  # fmt: skip
    assert torchrun_status(k8s_api, ns, "waits")["phase"] == "Syncing"

    sync = kubectl(k8s_cluster, "torchrun", "-n", ns, "sync", "waits", cwd=ws, timeout=300)
    assert sync.returncode == 0, sync.stderr
    wait_until(
        lambda: torchrun_status(k8s_api, ns, "waits").get("phase") == "Succeeded",
        timeout=240, what="the job Succeeded", interval=0.5,
    )  # fmt: skip
    assert torchrun_status(k8s_api, ns, "waits")["workspaceVersion"] == version
    (pod,) = core.list_namespaced_pod(ns, label_selector=selector).items
    assert pod.metadata.annotations[LIVE_ANNOTATION] == version
    log = core.read_namespaced_pod_log(pod.metadata.name, ns, container="trainer")
    assert "hello from the workspace" in log

    secret = core.read_namespaced_secret(TOKEN_SECRET, ns)
    token = base64.b64decode(secret.data[TOKEN_KEY]).decode()
    for p in core.list_namespaced_pod(ns).items:  # workers and the cache
        for c in [*(p.spec.init_containers or []), *p.spec.containers]:
            assert token not in " ".join([*(c.command or []), *(c.args or [])])
