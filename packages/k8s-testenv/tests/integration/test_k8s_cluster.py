"""The real control plane with the process kubelet: API behaviour and pod processes.

Everything here talks to kube-apiserver built from k8s.io/kubernetes, with the real
controller-manager and scheduler; pods are local processes.
"""

from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from k8s_testenv import KUBE_VERSION, Cluster
from k8s_testenv.kubelet.network import sandbox_support
from k8s_testenv.testing import container_pid, pid_alive, statefulset_manifest, wait_until
from kubernetes import client
from kubernetes.client.exceptions import ApiException

pytestmark = pytest.mark.timeout(180)

PODSERVER = str(Path(__file__).with_name("podserver.py"))
FIELD_ENV = [
    {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
    {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
    {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
]


def sh(script: str) -> list[str]:
    return ["/bin/sh", "-c", script]


def server_container() -> dict[str, Any]:
    return {
        "name": "server",
        "image": "python",
        "command": [sys.executable, PODSERVER],
        "env": FIELD_ENV,
        "ports": [{"name": "http", "containerPort": 8080}],
        "readinessProbe": {"tcpSocket": {"port": "http"}, "periodSeconds": 1},
    }


def create_statefulset(api: client.ApiClient, ns: str, name: str, replicas: int) -> None:
    labels = {"app": name}
    client.CoreV1Api(api).create_namespaced_service(
        ns,
        {
            "metadata": {"name": name},
            "spec": {"clusterIP": "None", "selector": labels, "ports": [{"port": 8080}]},
        },
    )
    client.AppsV1Api(api).create_namespaced_stateful_set(
        ns, statefulset_manifest(name, replicas, [server_container()])
    )


def ready_pods(api: client.ApiClient, ns: str, selector: str, count: int) -> list[Any] | None:
    pods = client.CoreV1Api(api).list_namespaced_pod(ns, label_selector=selector).items
    ready = [
        p
        for p in pods
        if p.status.phase == "Running"
        and p.metadata.deletion_timestamp is None
        and any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])
    ]
    return sorted(ready, key=lambda p: p.metadata.name) if len(ready) == count else None


def fetch(ip: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://{ip}:8080/", timeout=5) as resp:
        return dict(json.loads(resp.read()))


def pod(name: str, containers: list[dict[str, Any]], **spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": name}, "spec": {"containers": containers, **spec}}


def test_cluster_serves_the_built_release_with_gpu_nodes(
    k8s_cluster: Cluster, k8s_api: client.ApiClient
) -> None:
    assert client.VersionApi(k8s_api).get_code().git_version == KUBE_VERSION
    nodes = client.CoreV1Api(k8s_api).list_node().items
    assert sorted(n.metadata.name for n in nodes) == [n.name for n in k8s_cluster.nodes]
    for node in nodes:
        assert node.status.capacity["nvidia.com/gpu"] == "8"
        assert {c.type: c.status for c in node.status.conditions}["Ready"] == "True"


def test_crd_schema_rejects_an_invalid_object_with_the_api_servers_error(
    k8s_api: client.ApiClient, k8s_namespace: str
) -> None:
    ext = client.ApiextensionsV1Api(k8s_api)
    group, plural = f"{k8s_namespace}.example.com", "widgets"
    schema = {
        "type": "object",
        "properties": {
            "spec": {
                "type": "object",
                "required": ["replicas"],
                "properties": {"replicas": {"type": "integer", "minimum": 1}},
            },
            "status": {"type": "object", "properties": {"ready": {"type": "integer"}}},
        },
    }
    ext.create_custom_resource_definition(
        {
            "metadata": {"name": f"{plural}.{group}"},
            "spec": {
                "group": group,
                "scope": "Namespaced",
                "names": {"plural": plural, "singular": "widget", "kind": "Widget"},
                "versions": [
                    {
                        "name": "v1",
                        "served": True,
                        "storage": True,
                        "schema": {"openAPIV3Schema": schema},
                        "subresources": {"status": {}},
                    }
                ],
            },
        }
    )
    try:

        def established() -> bool:
            crd = ext.read_custom_resource_definition(f"{plural}.{group}")
            return any(
                c.type == "Established" and c.status == "True" for c in crd.status.conditions or []
            )

        wait_until(established, timeout=30, what="CRD Established")
        objects = client.CustomObjectsApi(k8s_api)

        def widget(name: str, replicas: object) -> dict[str, Any]:
            return {
                "apiVersion": f"{group}/v1",
                "kind": "Widget",
                "metadata": {"name": name},
                "spec": {"replicas": replicas},
            }

        wait_until(
            lambda: _created(objects, group, k8s_namespace, plural, widget("good", 2)),
            timeout=30,
            what="CRD served",
        )
        with pytest.raises(ApiException) as bad_type:
            objects.create_namespaced_custom_object(
                group, "v1", k8s_namespace, plural, widget("bad", "three")
            )
        assert bad_type.value.status == 422
        message = json.loads(bad_type.value.body)["message"]
        assert (
            'spec.replicas: Invalid value: "string": spec.replicas in body must be of type integer'
            in message
        )
        with pytest.raises(ApiException) as too_small:
            objects.create_namespaced_custom_object(
                group, "v1", k8s_namespace, plural, widget("small", 0)
            )
        assert (
            "spec.replicas in body should be greater than or equal to 1"
            in json.loads(too_small.value.body)["message"]
        )
        # the status subresource ignores spec changes and accepts status
        objects.patch_namespaced_custom_object_status(
            group,
            "v1",
            k8s_namespace,
            plural,
            "good",
            {"status": {"ready": 2}, "spec": {"replicas": 9}},
        )
        good = objects.get_namespaced_custom_object(group, "v1", k8s_namespace, plural, "good")
        assert (good["status"]["ready"], good["spec"]["replicas"]) == (2, 2)
    finally:
        ext.delete_custom_resource_definition(f"{plural}.{group}")


def _created(
    objects: client.CustomObjectsApi, group: str, ns: str, plural: str, body: dict[str, Any]
) -> bool:
    try:
        objects.create_namespaced_custom_object(group, "v1", ns, plural, body)
    except ApiException as exc:
        if exc.status == 404:  # discovery not caught up yet
            return False
        raise
    return True


def test_statefulset_of_three_runs_three_processes_with_distinct_pod_ips(
    k8s_api: client.ApiClient, k8s_namespace: str
) -> None:
    create_statefulset(k8s_api, k8s_namespace, "web", 3)
    pods = wait_until(
        lambda: ready_pods(k8s_api, k8s_namespace, "app=web", 3), timeout=60, what="3 ready pods"
    )
    ips = [p.status.pod_ip for p in pods]
    pids = [container_pid(p) for p in pods]
    assert len(set(ips)) == 3 and all(ip.startswith("127.") for ip in ips)
    assert len(set(pids)) == 3 and all(pid_alive(pid) for pid in pids)
    for p in pods:
        seen = fetch(p.status.pod_ip)
        assert seen["env"] == {
            "POD_NAME": p.metadata.name,
            "POD_NAMESPACE": k8s_namespace,
            "POD_IP": p.status.pod_ip,
        }
        if sandbox_support() is not None:
            assert (seen["hostname"], seen["resolved"]) == (p.metadata.name, p.status.pod_ip)
    sts = client.AppsV1Api(k8s_api).read_namespaced_stateful_set("web", k8s_namespace)
    wait_until(
        lambda: (
            client.AppsV1Api(k8s_api)
            .read_namespaced_stateful_set("web", k8s_namespace)
            .status.ready_replicas
            == 3
        ),
        timeout=30,
        what="StatefulSet readyReplicas=3",
    )
    assert sts.metadata.name == "web"
    log = client.CoreV1Api(k8s_api).read_namespaced_pod_log("web-0", k8s_namespace)
    assert f"serving on {pods[0].status.pod_ip}:8080" in log


def test_deleting_a_pod_restarts_it_as_a_new_process(
    k8s_api: client.ApiClient, k8s_namespace: str
) -> None:
    create_statefulset(k8s_api, k8s_namespace, "db", 1)
    (old,) = wait_until(
        lambda: ready_pods(k8s_api, k8s_namespace, "app=db", 1), timeout=60, what="db-0 ready"
    )
    old_pid = container_pid(old)
    client.CoreV1Api(k8s_api).delete_namespaced_pod("db-0", k8s_namespace)
    wait_until(lambda: not pid_alive(old_pid), timeout=30, what="old process killed")

    def replaced() -> list[Any] | None:
        pods = ready_pods(k8s_api, k8s_namespace, "app=db", 1)
        return pods if pods and pods[0].metadata.uid != old.metadata.uid else None

    (new,) = wait_until(replaced, timeout=60, what="db-0 recreated and ready")
    assert new.metadata.name == "db-0"
    assert pid_alive(container_pid(new)) and container_pid(new) != old_pid
    assert fetch(new.status.pod_ip)["env"]["POD_NAME"] == "db-0"


def test_deleting_the_statefulset_garbage_collects_pods_and_kills_processes(
    k8s_api: client.ApiClient, k8s_namespace: str
) -> None:
    create_statefulset(k8s_api, k8s_namespace, "gc", 2)
    pods = wait_until(
        lambda: ready_pods(k8s_api, k8s_namespace, "app=gc", 2), timeout=60, what="2 ready pods"
    )
    pids = [container_pid(p) for p in pods]
    assert all(p.metadata.owner_references[0].kind == "StatefulSet" for p in pods)
    client.AppsV1Api(k8s_api).delete_namespaced_stateful_set(
        "gc", k8s_namespace, propagation_policy="Background"
    )
    core = client.CoreV1Api(k8s_api)
    wait_until(
        lambda: not core.list_namespaced_pod(k8s_namespace, label_selector="app=gc").items,
        timeout=60,
        what="pods garbage-collected",
    )
    wait_until(lambda: not any(pid_alive(pid) for pid in pids), timeout=10, what="processes killed")


def job(name: str, script: str, *, completions: int, backoff_limit: int) -> dict[str, Any]:
    return {
        "metadata": {"name": name},
        "spec": {
            "completions": completions,
            "parallelism": completions,
            "completionMode": "Indexed",
            "backoffLimit": backoff_limit,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{"name": "work", "image": "busybox", "command": sh(script)}],
                }
            },
        },
    }


def job_condition(api: client.ApiClient, ns: str, name: str) -> Any:
    conditions = client.BatchV1Api(api).read_namespaced_job(name, ns).status.conditions or []
    return next(
        (c for c in conditions if c.type in ("Complete", "Failed") and c.status == "True"), None
    )


def test_indexed_job_succeeds_when_its_processes_exit_zero(
    k8s_api: client.ApiClient, k8s_namespace: str
) -> None:
    client.BatchV1Api(k8s_api).create_namespaced_job(
        k8s_namespace,
        job("ok", 'echo "index=$JOB_COMPLETION_INDEX"', completions=3, backoff_limit=0),
    )
    done = wait_until(
        lambda: job_condition(k8s_api, k8s_namespace, "ok"), timeout=60, what="Job finished"
    )
    assert done.type == "Complete"
    status = client.BatchV1Api(k8s_api).read_namespaced_job("ok", k8s_namespace).status
    assert (status.succeeded, status.failed or 0) == (3, 0)
    core = client.CoreV1Api(k8s_api)
    pods = core.list_namespaced_pod(k8s_namespace, label_selector="job-name=ok").items
    assert {p.status.phase for p in pods} == {"Succeeded"}
    logs = sorted(
        core.read_namespaced_pod_log(p.metadata.name, k8s_namespace).strip() for p in pods
    )
    assert logs == ["index=0", "index=1", "index=2"]


def test_job_fails_with_backoff_when_its_processes_exit_one(
    k8s_api: client.ApiClient, k8s_namespace: str
) -> None:
    client.BatchV1Api(k8s_api).create_namespaced_job(
        k8s_namespace, job("bad", "exit 1", completions=1, backoff_limit=1)
    )
    failed = wait_until(
        lambda: job_condition(k8s_api, k8s_namespace, "bad"), timeout=90, what="Job finished"
    )
    assert (failed.type, failed.reason) == ("Failed", "BackoffLimitExceeded")
    pods = (
        client.CoreV1Api(k8s_api)
        .list_namespaced_pod(k8s_namespace, label_selector="job-name=bad")
        .items
    )
    pods.sort(key=lambda p: p.metadata.creation_timestamp)
    assert [p.status.phase for p in pods] == ["Failed", "Failed"]
    assert [p.status.container_statuses[0].state.terminated.exit_code for p in pods] == [1, 1]
    # the Job controller waited (10 s base back-off) before replacing the failed pod
    first_end = pods[0].status.container_statuses[0].state.terminated.finished_at
    assert (pods[1].metadata.creation_timestamp - first_end).total_seconds() >= 5


def test_init_containers_run_first_and_readiness_probe_gates_ready(
    k8s_api: client.ApiClient, k8s_namespace: str, tmp_path: Path
) -> None:
    marker, ready = tmp_path / "init-done", tmp_path / "ready"
    core = client.CoreV1Api(k8s_api)
    core.create_namespaced_pod(
        k8s_namespace,
        pod(
            "probe",
            [
                {
                    "name": "app",
                    "image": "busybox",
                    "command": sh(
                        f"test -f {marker} || exit 7; sleep 2; touch {ready}; exec sleep 300"
                    ),
                    "readinessProbe": {
                        "exec": {"command": ["test", "-f", str(ready)]},
                        "periodSeconds": 1,
                    },
                }
            ],
            initContainers=[
                {"name": "setup", "image": "busybox", "command": sh(f"sleep 1; touch {marker}")}
            ],
            terminationGracePeriodSeconds=1,
        ),
    )

    def state() -> Any:
        return core.read_namespaced_pod("probe", k8s_namespace)

    running = wait_until(
        lambda: (p := state()).status.phase == "Running" and p, timeout=30, what="Running"
    )
    assert running.status.init_container_statuses[0].state.terminated.exit_code == 0
    conditions = {c.type: c.status for c in running.status.conditions}
    assert (
        conditions["Initialized"] == "True"
        and not ready.exists()
        and conditions["Ready"] == "False"
    )
    wait_until(
        lambda: any(c.type == "Ready" and c.status == "True" for c in state().status.conditions),
        timeout=30,
        what="Ready after the probe passes",
    )
    assert ready.exists() and state().status.container_statuses[0].restart_count == 0


def test_restart_policy_and_exit_codes_drive_container_state(
    k8s_api: client.ApiClient, k8s_namespace: str
) -> None:
    core = client.CoreV1Api(k8s_api)
    crash = {"name": "c", "image": "busybox", "command": sh("exit 3")}
    core.create_namespaced_pod(k8s_namespace, pod("never", [crash], restartPolicy="Never"))
    core.create_namespaced_pod(k8s_namespace, pod("onfailure", [crash], restartPolicy="OnFailure"))
    done = wait_until(
        lambda: (
            (p := core.read_namespaced_pod("never", k8s_namespace)).status.phase == "Failed" and p
        ),
        timeout=30,
        what="never pod Failed",
    )
    assert done.status.container_statuses[0].state.terminated.exit_code == 3
    looping = wait_until(
        lambda: (
            (p := core.read_namespaced_pod("onfailure", k8s_namespace)).status.container_statuses
            and p.status.container_statuses[0].restart_count >= 2
            and p
        ),
        timeout=30,
        what="two restarts",
    )
    status = looping.status.container_statuses[0]
    assert looping.status.phase == "Running"
    assert status.last_state.terminated.exit_code == 3


def test_scheduler_places_gpu_pods_by_node_capacity(
    k8s_api: client.ApiClient, k8s_namespace: str
) -> None:
    core = client.CoreV1Api(k8s_api)
    gpu = {"limits": {"nvidia.com/gpu": "8"}}
    for name in ("gpu-a", "gpu-b", "gpu-c"):
        container = {"name": "c", "image": "none", "command": ["sleep", "300"], "resources": gpu}
        core.create_namespaced_pod(
            k8s_namespace, pod(name, [container], terminationGracePeriodSeconds=1)
        )

    def placed() -> dict[str, Any] | None:
        pods = core.list_namespaced_pod(k8s_namespace).items
        running = {p.spec.node_name for p in pods if p.status.phase == "Running"}
        unschedulable = [
            p
            for p in pods
            if any(
                c.type == "PodScheduled" and c.reason == "Unschedulable"
                for c in p.status.conditions or []
            )
        ]
        return (
            {"nodes": running, "pending": unschedulable}
            if len(running) == 2 and unschedulable
            else None
        )

    result = wait_until(placed, timeout=30, what="two GPU pods running, one unschedulable")
    assert result["nodes"] == {"node-0", "node-1"}
    assert "Insufficient nvidia.com/gpu" in result["pending"][0].status.conditions[0].message
