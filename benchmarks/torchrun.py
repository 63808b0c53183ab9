"""``kubectl torchrun submit`` to all workers running the script, for a 200 MB workspace, beside
the design's zip-through-a-pod flow, on one k8s-testenv cluster (the operator runs as a pod from
the install manifests).

    python benchmarks/torchrun.py [--size-mb 200] [--nodes 2] [--json FILE]

Ours: the built kubectl runs the plugin from a folder holding the workspace; it creates the
TorchrunJob and pushes the folder with monarch-sync through a port-forward to the namespace's
workspace cache, which feeds each worker's init agent through a monarch-sync tree; torchrun
starts once a worker holds the version. Timed from the submit command's start until every
worker's log shows the script running. ``resubmit``: a new job after a one-file edit (the
cache and the laptop's stat cache are warm, as in a real edit loop). The first submit also
creates the namespace's cache (a pod and its PVC), which later jobs reuse; ``warm_submit`` is a
full first upload of a different tree to the warm cache.

Baseline, same cluster (the design: its plugin was never published, the controller's sync pod
waits for ``workspace.zip``): zip the folder (deflate, as ``zip``), create the workspace PVC
and a sync pod, ``kubectl cp`` the zip into it, the pod checks and extracts it, then the worker
pods' init containers copy the PVC into their own ``emptyDir`` and the same torchrun command
starts. Timed from the zip's start to every worker running the script; a resubmit repeats all
of it (the flow has no delta), so it is measured once.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

from results import save_json

# benchmarks/k8s_testenv.py shares its name with the package: drop this folder from sys.path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import kubernetes.client as k8s  # noqa: E402
from k8s_testenv import start_cluster  # noqa: E402
from k8s_testenv.testing import wait_until  # noqa: E402

from monarch_k8s.testing import (  # noqa: E402
    cpu_queue,
    install_with_kubectl,
    kubectl,
    kubectl_apply,
)
from monarch_k8s.torchrun.names import JOB_LABEL  # noqa: E402

MARK = "SCRIPT-RUNNING"
START = f"import os\nprint('{MARK}', os.environ.get('RANK'), flush=True)\n"
TORCHRUN = ["torchrun", "--standalone", "--nproc-per-node=1", "--no-python", "python", "start.py"]


def make_workspace(root: Path, size_mb: int, seed: int) -> None:
    """A fifth source-like text (1,000 files), the rest a few large binary files."""
    rng = random.Random(seed)
    words = [f"tok{i}" for i in range(5000)]
    (root / "src").mkdir(parents=True)
    text_bytes = size_mb * 10**6 // 5
    for i in range(1000):
        body = " ".join(rng.choices(words, k=text_bytes // 1000 // 7))
        (root / "src" / f"mod_{i:04d}.py").write_text(f"# module {i}\nDOC = '''{body}'''\n")
    (root / "assets").mkdir()
    rest = size_mb * 10**6 - text_bytes
    for i in range(4):
        (root / "assets" / f"blob{i}.bin").write_bytes(rng.randbytes(rest // 4))
    (root / "start.py").write_text(START)


def all_running(core: k8s.CoreV1Api, ns: str, selector: str, n: int, container: str) -> bool:
    pods = core.list_namespaced_pod(ns, label_selector=selector).items
    seen = 0
    for pod in pods:
        try:
            log = core.read_namespaced_pod_log(pod.metadata.name, ns, container=container)
        except k8s.ApiException:
            continue
        seen += MARK in log
    return seen >= n


def init_done(pod: Any) -> bool:
    statuses = pod.status.init_container_statuses or []
    return bool(statuses) and all(s.state.terminated is not None for s in statuses)


def ours(cluster: Any, api: Any, ns: str, src: Path, nodes: int, name: str) -> dict[str, Any]:
    core = k8s.CoreV1Api(api)
    selector = f"{JOB_LABEL}={name}"
    t0 = time.perf_counter()
    plugin = subprocess.Popen(
        [str(cluster.kubectl_path), "torchrun", "-n", ns, "submit", "--queue", "cpu", "--nodes",
         str(nodes), "--procs-per-node", "1", "--name", name, "python start.py"],
        cwd=src, env=cluster.kubectl_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    marks: dict[str, float] = {}
    deadline = t0 + 900
    while time.perf_counter() < deadline:
        now = time.perf_counter() - t0
        if "submit_command" not in marks and plugin.poll() is not None:
            marks["submit_command"] = now
        pods = core.list_namespaced_pod(ns, label_selector=selector).items
        if len(pods) >= nodes:
            marks.setdefault("pods_created", now)
            if all(init_done(p) for p in pods):
                marks.setdefault("workspace_in_workers", now)
                if all_running(core, ns, selector, nodes, "trainer"):
                    marks["to_running"] = now
                    break
        time.sleep(0.1)
    else:
        raise TimeoutError(f"{name}'s workers did not run the script")
    _, stderr = plugin.communicate(timeout=900)
    if plugin.returncode != 0:
        raise RuntimeError(f"submit failed: {stderr}")
    found = re.search(r"sent (\d+) bytes", stderr)
    return {
        **{f"{k}_s": round(v, 3) for k, v in marks.items()},
        "bytes_sent": int(found.group(1)) if found else None,
    }


SYNC_POD_SCRIPT = """
import os, time, zipfile
z = '/workspace/workspace.zip'
while True:
    try:
        with zipfile.ZipFile(z) as f:
            if f.testzip() is None:
                f.extractall('/workspace')
                break
    except (OSError, zipfile.BadZipFile, EOFError):
        pass
    time.sleep(0.1)
os.remove(z)
open('/workspace/.sync_success', 'w').close()
"""


def zip_flow(cluster: Any, api: Any, ns: str, src: Path, nodes: int) -> dict[str, Any]:
    core = k8s.CoreV1Api(api)
    marks: dict[str, float] = {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "workspace.zip"
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
            for path in sorted(src.rglob("*")):
                zf.write(path, path.relative_to(src))
        marks["zipped"] = time.perf_counter() - t0
        claim = {"metadata": {"name": "zipflow-workspace"}, "spec": {
            "accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}}}  # fmt: skip
        core.create_namespaced_persistent_volume_claim(ns, claim)
        volume = {"name": "ws", "persistentVolumeClaim": {"claimName": "zipflow-workspace"}}
        sync_pod = {"metadata": {"name": "zipflow-sync"}, "spec": {
            "restartPolicy": "Never", "volumes": [volume],
            "containers": [{"name": "sync", "image": "alpine", "command": [
                sys.executable, "-c", SYNC_POD_SCRIPT],
                "volumeMounts": [{"name": "ws", "mountPath": "/workspace"}]}]}}  # fmt: skip
        core.create_namespaced_pod(ns, sync_pod)
        wait_until(
            lambda: core.read_namespaced_pod("zipflow-sync", ns).status.phase == "Running",
            timeout=300, what="the sync pod running", interval=0.1,
        )  # fmt: skip
        kubectl(cluster, "cp", "-n", ns, str(archive), "zipflow-sync:/workspace/workspace.zip",
                timeout=900, check=True)  # fmt: skip
        marks["copied"] = time.perf_counter() - t0
    wait_until(
        lambda: core.read_namespaced_pod("zipflow-sync", ns).status.phase == "Succeeded",
        timeout=600, what="the sync pod to extract the zip", interval=0.1,
    )  # fmt: skip
    marks["extracted"] = time.perf_counter() - t0
    for rank in range(nodes):
        worker = {"metadata": {"name": f"zipflow-{rank}", "labels": {"zipflow": "w"}}, "spec": {
            "restartPolicy": "Never",
            "volumes": [volume, {"name": "app", "emptyDir": {}}],
            "initContainers": [{"name": "workspace-sync", "image": "alpine", "command": [
                "sh", "-c", "test -f /workspace/.sync_success && cp -r /workspace/. /app/"],
                "volumeMounts": [{"name": "ws", "mountPath": "/workspace", "readOnly": True},
                                 {"name": "app", "mountPath": "/app"}]}],
            "containers": [{"name": "trainer", "image": "alpine", "command": TORCHRUN,
                            "workingDir": "/app",
                            "volumeMounts": [{"name": "app", "mountPath": "/app"}]}]}}  # fmt: skip
        core.create_namespaced_pod(ns, worker)
    wait_until(
        lambda: all_running(core, ns, "zipflow=w", nodes, "trainer"),
        timeout=900, what="the zip flow's workers running the script", interval=0.1,
    )  # fmt: skip
    total = time.perf_counter() - t0
    return {"to_running_s": round(total, 3), **{f"{k}_s": round(v, 3) for k, v in marks.items()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    # pods run from this environment (k8s-testenv's process kubelet): let them, and the
    # plugin, keep compiled bytecode as an image and a laptop would
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    subprocess.run(  # compile once what every flow imports, so no flow pays for it alone
        [sys.executable, "-c", "import torch, kubernetes.client, monarch_k8s.torchrun.plugin, "
         "monarch_k8s.torchrun.agent, monarch_k8s.operator.__main__"], check=True,
    )  # fmt: skip
    cluster = start_cluster()
    try:
        install_with_kubectl(cluster, "monarch-system")
        api = cluster.api_client()
        ns = "bench"
        k8s.CoreV1Api(api).create_namespace({"metadata": {"name": ns}})
        kubectl_apply(cluster, ns, cpu_queue(workspace_per_gpu="1Gi"))
        with tempfile.TemporaryDirectory() as tmp:
            os.environ["XDG_CACHE_HOME"] = str(Path(tmp) / "cache")  # a fresh laptop
            src, other = Path(tmp) / "project", Path(tmp) / "other"
            make_workspace(src, args.size_mb, seed=1)
            make_workspace(other, args.size_mb, seed=2)
            first = ours(cluster, api, ns, src, args.nodes, "first")
            (src / "src" / "mod_0007.py").write_text("# edited\nDOC = 'one-file edit'\n")
            again = ours(cluster, api, ns, src, args.nodes, "resubmit")
            warm = ours(cluster, api, ns, other, args.nodes, "warm")
            baseline = zip_flow(cluster, api, ns, src, args.nodes)
    finally:
        cluster.stop()
    figures = {
        "zip_flow_over_submit": round(baseline["to_running_s"] / first["to_running_s"], 2),
        "zip_flow_over_resubmit": round(baseline["to_running_s"] / again["to_running_s"], 2),
        "zip_flow_over_warm_submit": round(baseline["to_running_s"] / warm["to_running_s"], 2),
        "submit_to_running_s": first["to_running_s"],
        "resubmit_to_running_s": again["to_running_s"],
        "warm_submit_to_running_s": warm["to_running_s"],
        "zip_flow_s": baseline["to_running_s"],
        "size_mb": args.size_mb,
        "nodes": args.nodes,
        "ours": {"submit": first, "resubmit": again, "warm_submit": warm},
        "zip_flow": baseline,
    }
    for key, value in figures.items():
        print(f"{key:28s} {value}")
    if args.json:
        save_json(args.json, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
