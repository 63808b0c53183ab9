"""KubernetesJob end to end: the operator runs as a pod from the install manifests, real
torchmonarch workers run as pods, and this process, like a laptop, reaches nothing but the API
server: the gateway through a port-forward made with the Python client, the code through it."""

from __future__ import annotations

import textwrap
import time
from pathlib import Path
from typing import Any

import kubernetes.client as k8s
import kubetorch as kt
import pytest
from k8s_testenv.testing import statefulset_manifest, wait_until
from monarch.actor import Actor, current_rank, endpoint

import monarch_k8s.cluster
from monarch_k8s import KubernetesJob, MeshNotReadyError, MeshSpec, OperatorNotInstalledError
from monarch_k8s.names import ACTIVITY_ANNOTATION, GROUP, PLURAL, VERSION
from monarch_proxy import AuthenticationError, WorkerLostError

MODEL = """
import os, socket, time
from monarch.actor import Actor, current_rank, endpoint

class Model(Actor):
    @endpoint
    def version(self):
        return {v}

    @endpoint
    def where(self):
        return os.environ.get("HOSTNAME") or socket.gethostname()

    @endpoint
    def sleep(self, seconds):
        time.sleep(seconds)
        return current_rank().rank
"""


def write_model(src: Path, version: int) -> None:
    (src / "laptoppkg").mkdir(parents=True, exist_ok=True)
    (src / "laptoppkg" / "__init__.py").write_text("")
    (src / "laptoppkg" / "model.py").write_text(textwrap.dedent(MODEL.format(v=version)))


def left_in(api: Any, namespace: str) -> dict[str, list[str]]:
    """What a job could have left behind in ``namespace`` (the root CA ConfigMap is the
    namespace's own)."""
    core, apps = k8s.CoreV1Api(api), k8s.AppsV1Api(api)
    meshes = k8s.CustomObjectsApi(api).list_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL
    )["items"]
    found = {
        "monarchmeshes": [m["metadata"]["name"] for m in meshes],
        "pods": [p.metadata.name for p in core.list_namespaced_pod(namespace).items],
        "statefulsets": [
            s.metadata.name for s in apps.list_namespaced_stateful_set(namespace).items
        ],
        "deployments": [d.metadata.name for d in apps.list_namespaced_deployment(namespace).items],
        "services": [s.metadata.name for s in core.list_namespaced_service(namespace).items],
        "secrets": [s.metadata.name for s in core.list_namespaced_secret(namespace).items],
        "configmaps": [
            c.metadata.name
            for c in core.list_namespaced_config_map(namespace).items
            if c.metadata.name != "kube-root-ca.crt"
        ],
    }
    return {kind: names for kind, names in found.items() if names}


def test_laptop_spawns_syncs_reloads_survives_a_lost_pod_and_leaves_nothing(
    monarch_operator: Any, k8s_api: Any, k8s_namespace: str, outside_cluster: None,
    tmp_path: Path,
) -> None:  # fmt: skip
    src = tmp_path / "src"
    write_model(src, 1)
    job = KubernetesJob(
        compute=kt.Compute(cpus="0.1", replicas=2, labels={"team": "tests"}),
        namespace=k8s_namespace, api_client=k8s_api, sync_dirs=[str(src)], timeout=240,
    )  # fmt: skip
    state = job.state()
    assert state.workers.size() == 2 and state[job.name] is state.workers
    procs = state.workers.spawn_procs(per_host={"procs": 1})
    model = procs.spawn("model", "laptoppkg.model:Model")
    assert sorted(model.version.call().get(timeout=120).values()) == [1, 1]
    hosts = set(model.where.call().get(timeout=60).values())
    assert hosts == {f"{job.name}-0", f"{job.name}-1"}  # one actor on each pod

    # edit -> sync (through the port-forward) -> reload -> call the edited code, same actors
    write_model(src, 2)
    result = job.sync()
    assert "laptoppkg/model.py" in result.changed and result.reloaded
    assert sorted(model.version.call().get(timeout=60).values()) == [2, 2]

    # a wrong token is refused, and the error says where the token came from
    with pytest.raises(AuthenticationError, match="refused the token from token="):
        KubernetesJob(
            name=job.name, namespace=k8s_namespace, api_client=k8s_api, token="wrong",
            sync_dirs=[], timeout=60,
        ).state()  # fmt: skip

    # a worker pod deleted mid-call: the call fails naming the pod, the job says why, and
    # the replacement pod is attached
    victim = f"{job.name}-1"
    running = model.sleep.call(60)
    k8s.CoreV1Api(k8s_api).delete_namespaced_pod(victim, k8s_namespace, grace_period_seconds=0)
    with pytest.raises(WorkerLostError, match=f"pod {k8s_namespace}/{victim}"):
        running.get(timeout=120)
    lost = wait_until(lambda: job.lost_workers, timeout=60, what="the job to report the loss")
    assert lost[0].pod == victim and lost[0].reason == "Deleted", lost
    state.wait_for_workers(timeout=180)
    again = state.workers.spawn_procs(per_host={"procs": 1}).spawn("m2", "laptoppkg.model:Model")
    assert sorted(again.version.call().get(timeout=120).values()) == [2, 2]

    job.kill()
    wait_until(lambda: not left_in(k8s_api, k8s_namespace), timeout=90, what="nothing left")


class Ranked(Actor):
    """Sent by value: this module is not importable on the workers."""

    @endpoint
    def rank(self) -> int:
        return current_rank().rank


def test_selector_attaches_to_existing_pods_and_kill_leaves_them(
    monarch_operator: Any, k8s_api: Any, k8s_namespace: str, outside_cluster: None
) -> None:
    worker = {
        "name": "worker",
        "image": "byo",
        "command": ["python", "-m", "monarch_gateway.worker", "tcp://$(POD_IP):26600"],
        "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
        "readinessProbe": {"tcpSocket": {"port": 26600}, "periodSeconds": 1},
    }
    k8s.AppsV1Api(k8s_api).create_namespaced_stateful_set(
        k8s_namespace, statefulset_manifest("byo", 2, [worker])
    )
    said: list[str] = []
    job = KubernetesJob(
        selector={"app": "byo"}, namespace=k8s_namespace, api_client=k8s_api, sync_dirs=[],
        timeout=240, log=said.append,
    )  # fmt: skip
    state = job.state()
    ranks = state.workers.spawn_procs(per_host={"procs": 1}).spawn("r", Ranked)
    assert sorted(ranks.rank.call().get(timeout=120).values()) == [0, 1]
    core = k8s.CoreV1Api(k8s_api)
    before = {
        p.metadata.uid
        for p in core.list_namespaced_pod(k8s_namespace, label_selector="app=byo").items
    }
    job.kill()
    left = left_in(k8s_api, k8s_namespace)
    assert "monarchmeshes" not in left and "deployments" not in left  # the gateway went
    after = {
        p.metadata.uid
        for p in core.list_namespaced_pod(k8s_namespace, label_selector="app=byo").items
    }
    assert after == before and len(after) == 2  # the pods were left alone, and we say so
    assert "left the 2 pods matching {'app': 'byo'} running (not created by this job)" in said[-1]


def test_a_mesh_that_cannot_schedule_names_its_pods_and_why(
    monarch_operator: Any, k8s_api: Any, k8s_namespace: str
) -> None:
    job = KubernetesJob(
        compute=MeshSpec(replicas=1, node_selector={"pool": "nowhere"}),
        namespace=k8s_namespace, api_client=k8s_api, sync_dirs=[], timeout=10, log=None,
    )  # fmt: skip
    with pytest.raises(MeshNotReadyError) as info:
        job.state()
    assert "node affinity/selector" in info.value.pods[f"{job.name}-0"], info.value.pods
    assert f"{job.name}-0" in str(info.value) and "Unschedulable" in str(info.value)
    job.kill()


def test_a_cluster_without_the_crd_says_how_to_install_it(
    k8s_api: Any, k8s_namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(monarch_k8s.cluster, "GROUP", "absent.example.com")
    job = KubernetesJob(compute=MeshSpec(), namespace=k8s_namespace, api_client=k8s_api, log=None)
    with pytest.raises(OperatorNotInstalledError, match="kubectl apply --server-side -k"):
        job.state()


def test_state_wakes_a_mesh_scaled_to_zero_for_idleness(
    monarch_operator: Any, k8s_api: Any, k8s_namespace: str, outside_cluster: None
) -> None:
    job = KubernetesJob(
        compute=MeshSpec(replicas=1), namespace=k8s_namespace, api_client=k8s_api, sync_dirs=[],
        timeout=240,
    )  # fmt: skip
    job.apply()
    custom = k8s.CustomObjectsApi(k8s_api)
    custom.patch_namespaced_custom_object(
        GROUP, VERSION, k8s_namespace, PLURAL, job.name, {"spec": {"idleTimeoutSeconds": 3}}
    )
    apps = k8s.AppsV1Api(k8s_api)

    def scaled_to_zero() -> bool:
        found = apps.list_namespaced_stateful_set(k8s_namespace).items
        return any(s.metadata.name == job.name and s.spec.replicas == 0 for s in found)

    wait_until(scaled_to_zero, timeout=60, what="the idle mesh to be scaled to zero")
    # state() marks activity, the operator scales the mesh back, and the actors answer
    ranks = job.state(timeout=120).workers.spawn_procs(per_host={"procs": 1}).spawn("r", Ranked)
    assert list(ranks.rank.call().get(timeout=120).values()) == [0]
    job.kill()


def test_a_mesh_with_a_connected_client_is_not_idle(
    monarch_operator: Any, k8s_api: Any, k8s_namespace: str, outside_cluster: None
) -> None:
    """The operator counts the gateway's sessions on its authenticated ``/healthz`` (without the
    token the gateway answers liveness only, which once made every mesh look idle)."""
    job = KubernetesJob(
        compute=MeshSpec(replicas=1), namespace=k8s_namespace, api_client=k8s_api, sync_dirs=[],
        timeout=240,
    )  # fmt: skip
    ranks = job.state().workers.spawn_procs(per_host={"procs": 1}).spawn("r", Ranked)
    custom = k8s.CustomObjectsApi(k8s_api)
    custom.patch_namespaced_custom_object(
        GROUP, VERSION, k8s_namespace, PLURAL, job.name, {"spec": {"idleTimeoutSeconds": 2}}
    )
    mesh_before = custom.get_namespaced_custom_object(
        GROUP, VERSION, k8s_namespace, PLURAL, job.name
    )
    stamp = mesh_before["metadata"].get("annotations", {}).get(ACTIVITY_ANNOTATION)

    def activity_marked() -> bool:  # the operator saw the session and marked the mesh in use
        mesh = custom.get_namespaced_custom_object(GROUP, VERSION, k8s_namespace, PLURAL, job.name)
        return mesh["metadata"].get("annotations", {}).get(ACTIVITY_ANNOTATION) != stamp

    wait_until(activity_marked, timeout=60, what="the operator to mark the mesh in use")
    time.sleep(6)  # three idle timeouts with the session open
    sets = k8s.AppsV1Api(k8s_api).list_namespaced_stateful_set(k8s_namespace).items
    assert [s.spec.replicas for s in sets if s.metadata.name == job.name] == [1]
    assert list(ranks.rank.call().get(timeout=60).values()) == [0]
    job.kill()
