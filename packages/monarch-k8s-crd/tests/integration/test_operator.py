"""The operator as a pod from the install manifests (``kubectl apply -k``, its own
ServiceAccount), on k8s-testenv's real control plane, whose process kubelet runs real
torchmonarch workers as pods. One install per session (``conftest.py``); each test has its
own namespace.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import signal
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import kubernetes.client as k8s
import pytest
import yaml
from k8s_testenv.testing import container_pid, wait_until
from kubernetes.client.exceptions import ApiException

from monarch_k8s import names
from monarch_k8s.install import install_operator
from monarch_k8s.pods import lost_reason
from monarch_k8s.testing import operator_pod, pod_ready
from monarch_proxy import connect
from monarch_proxy.errors import AuthenticationError

OPERATOR_NS = "monarch-system"

# upstream's DDP example mesh, unchanged
UPSTREAM_DDP_MESH = (Path(__file__).parent.parent / "data" / "ddp_mesh.yaml").read_text()


@pytest.fixture
def operator(k8s_cluster: Any, monarch_operator: Any) -> Any:
    """The cluster, with the operator installed once per session (``conftest.py``)."""
    return k8s_cluster


def custom(api: Any) -> k8s.CustomObjectsApi:
    return k8s.CustomObjectsApi(api)


def create_mesh(api: Any, namespace: str, name: str, spec: dict[str, Any]) -> None:
    body = {
        "apiVersion": f"{names.GROUP}/{names.VERSION}",
        "kind": names.KIND,
        "metadata": {"name": name},
        "spec": spec,
    }
    custom(api).create_namespaced_custom_object(
        names.GROUP, names.VERSION, namespace, names.PLURAL, body
    )


def get_mesh(api: Any, namespace: str, name: str) -> dict[str, Any]:
    return custom(api).get_namespaced_custom_object(  # type: ignore[no-any-return]
        names.GROUP, names.VERSION, namespace, names.PLURAL, name
    )


def ready_reason(api: Any, namespace: str, name: str) -> str | None:
    conditions = (get_mesh(api, namespace, name).get("status") or {}).get("conditions") or []
    return next((c.get("reason") for c in conditions if c["type"] == "Ready"), None)


def wait_ready(api: Any, namespace: str, name: str, timeout: float = 180) -> dict[str, Any]:
    wait_until(
        lambda: ready_reason(api, namespace, name) == "AllReady",
        timeout=timeout,
        what=f"MonarchMesh {name} Ready",
        interval=0.5,
    )
    return get_mesh(api, namespace, name)


def gateway_url_and_token(api: Any, namespace: str, mesh: dict[str, Any]) -> tuple[str, str]:
    """Where status says the gateway is: its pod (pod IPs are reachable here; the process
    kubelet has no Service ClusterIPs) and the token from the Secret status names."""
    gateway = mesh["status"]["gateway"]
    core = k8s.CoreV1Api(api)
    secret = core.read_namespaced_secret(gateway["tokenSecret"], namespace)
    token = base64.b64decode(secret.data[names.TOKEN_KEY]).decode()
    service = core.read_namespaced_service(gateway["serviceName"], namespace)
    selector = ",".join(f"{k}={v}" for k, v in service.spec.selector.items())
    pods = [p for p in core.list_namespaced_pod(namespace, label_selector=selector).items]
    pod = next(p for p in pods if pod_ready(p))
    return f"ws://{pod.status.pod_ip}:{gateway['port']}", token


def whoami_hosts(job: Any, mesh: str) -> set[str]:
    import socket

    from monarch.actor import Actor, endpoint

    class Who(Actor):  # defined in a function body: travels by value
        @endpoint
        def host(self) -> str:
            return socket.gethostname()

    hosts = getattr(job, mesh)
    actors = hosts.spawn_procs(per_host={"procs": 1}).spawn("who", Who)
    return set(actors.host.call().get(timeout=120).values())


def test_upstream_ddp_manifest_applies_unchanged_and_a_gateway_added_later_serves_it(
    operator: Any, k8s_api: Any
) -> None:
    namespace = "monarch-tests"
    k8s.CoreV1Api(k8s_api).create_namespace({"metadata": {"name": namespace}})
    wait_until(
        lambda: k8s.CoreV1Api(k8s_api).list_namespaced_service_account(namespace).items,
        timeout=30,
        what="the default ServiceAccount",
    )
    applied = operator.kubectl("apply", "-f", "-", input=UPSTREAM_DDP_MESH.encode())
    assert applied.returncode == 0, applied.stderr.decode()
    try:
        mesh = wait_ready(k8s_api, namespace, "ddpmesh")
        # upstream's objects, where upstream's users look for them
        assert mesh["status"]["serviceName"] == "ddpmesh-svc.monarch-tests.svc.cluster.local"
        assert mesh["status"]["readyReplicas"] == 2
        pods = k8s.CoreV1Api(k8s_api).list_namespaced_pod(
            namespace, label_selector="app.kubernetes.io/name=monarch-worker,"
            "monarch.pytorch.org/mesh-name=ddpmesh"
        ).items  # fmt: skip
        assert sorted(p.metadata.name for p in pods) == ["ddpmesh-0", "ddpmesh-1"]
        # GitOps: add a gateway to the live mesh; the operator fronts the same pods with it
        custom(k8s_api).patch_namespaced_custom_object(
            names.GROUP, names.VERSION, namespace, names.PLURAL, "ddpmesh",
            {"spec": {"gateway": {"enabled": True}}},
        )  # fmt: skip
        wait_until(
            lambda: (get_mesh(k8s_api, namespace, "ddpmesh")["status"].get("gateway") or {}).get(
                "ready"
            ),
            timeout=180,
            what="the gateway Ready",
            interval=0.5,
        )
        url, token = gateway_url_and_token(
            k8s_api, namespace, get_mesh(k8s_api, namespace, "ddpmesh")
        )
        with connect(url, token) as job:
            assert whoami_hosts(job, "ddpmesh") == {"ddpmesh-0", "ddpmesh-1"}
        with pytest.raises(AuthenticationError, match="HTTP 401"):
            connect(url, "wrong-token").close()
        # and turned off again: its objects go, the workers stay
        custom(k8s_api).patch_namespaced_custom_object(
            names.GROUP, names.VERSION, namespace, names.PLURAL, "ddpmesh",
            {"spec": {"gateway": {"enabled": False}}},
        )  # fmt: skip
        wait_until(
            lambda: (
                (found := objects(k8s_api, namespace))["deployments"] == []
                and found["services"] == ["ddpmesh-svc"]
                and found["pods"] == ["ddpmesh-0", "ddpmesh-1"]
            ),
            timeout=60,
            what="the gateway removed",
        )
    finally:
        operator.kubectl("delete", "namespace", namespace, "--wait=false")


def test_mesh_with_gateway_and_sync_runs_synced_code_and_takes_back_a_deleted_pod(
    operator: Any, k8s_api: Any, k8s_namespace: str, tmp_path: Path
) -> None:
    create_mesh(
        k8s_api,
        k8s_namespace,
        "trainers",
        {
            "replicas": 2,
            "gateway": {"enabled": True},
            "sync": {"enabled": True},
            "podTemplate": {"spec": {"containers": [{"name": "worker", "image": "monarch"}]}},
        },
    )
    mesh = wait_ready(k8s_api, k8s_namespace, "trainers")
    assert mesh["status"]["gateway"] == {
        "serviceName": "trainers-gateway",
        "port": names.GATEWAY_PORT,
        "tokenSecret": "trainers-gateway-token",
        "ready": True,
    }
    module = f"synced_{secrets.token_hex(4)}"
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    source = textwrap.dedent(
        """
        from monarch.actor import Actor, endpoint

        class Greeter(Actor):
            @endpoint
            def hello(self) -> str:
                return "VERSION"
        """
    )
    (workspace / f"{module}.py").write_text(source.replace("VERSION", "v1"))
    url, token = gateway_url_and_token(k8s_api, k8s_namespace, mesh)
    with connect(url, token) as job:
        job.sync(str(workspace))
        procs = job.trainers.spawn_procs(per_host={"procs": 1})
        greeters = procs.spawn("greeters", f"{module}:Greeter")
        assert list(greeters.hello.call().get(timeout=120).values()) == ["v1", "v1"]
        (workspace / f"{module}.py").write_text(source.replace("VERSION", "v2"))
        job.sync(str(workspace))
        assert list(greeters.hello.call().get(timeout=60).values()) == ["v2", "v2"]

        # a worker pod deleted mid-run: the StatefulSet recreates it, the gateway takes it in
        core = k8s.CoreV1Api(k8s_api)
        old_uid = core.read_namespaced_pod("trainers-0", k8s_namespace).metadata.uid
        core.delete_namespaced_pod("trainers-0", k8s_namespace, grace_period_seconds=0)
        wait_until(
            lambda: any(
                p.metadata.name == "trainers-0" and p.metadata.uid != old_uid and pod_ready(p)
                for p in core.list_namespaced_pod(k8s_namespace).items
            ),
            timeout=120,
            what="trainers-0 recreated",
        )
        job.wait_for_workers(timeout=120)
        again = job.trainers.spawn_procs(per_host={"procs": 1}).spawn("g2", f"{module}:Greeter")
        # the new pod's agent was caught up with the synced tree before it joined
        assert list(again.hello.call().get(timeout=120).values()) == ["v2", "v2"]
    wait_ready(k8s_api, k8s_namespace, "trainers")


def test_a_worker_container_restarted_in_place_gets_its_pod_replaced_and_the_mesh_heals(
    operator: Any, k8s_api: Any, k8s_namespace: str
) -> None:
    """A crashed or OOM-killed worker container is restarted by the kubelet in its pod, at the
    pod's IP, where Monarch cannot attach it again (README "Known gaps"): the operator deletes
    that pod, says so in an Event, and the StatefulSet's new pod, at a new IP, joins the mesh."""
    spec = {"replicas": 2, "gateway": {"enabled": True},
            "podTemplate": {"spec": {"containers": [{"name": "worker", "image": "monarch"}]}}}  # fmt: skip
    create_mesh(k8s_api, k8s_namespace, "phoenix", spec)
    mesh = wait_ready(k8s_api, k8s_namespace, "phoenix")
    core = k8s.CoreV1Api(k8s_api)
    url, token = gateway_url_and_token(k8s_api, k8s_namespace, mesh)
    with connect(url, token) as job:
        assert whoami_hosts(job, "phoenix") == {"phoenix-0", "phoenix-1"}

        def seen_ready(name: str) -> Any:  # what the operator records before it acts
            pod = core.read_namespaced_pod(name, k8s_namespace)
            return (
                pod if names.READY_RESTARTS_ANNOTATION in (pod.metadata.annotations or {}) else None
            )

        old = wait_until(lambda: seen_ready("phoenix-1"), timeout=30, what="phoenix-1 recorded")
        other = wait_until(lambda: seen_ready("phoenix-0"), timeout=30, what="phoenix-0 recorded")
        os.killpg(container_pid(old), signal.SIGKILL)  # as the OOM killer; restarted in place

        def replaced() -> Any:
            pod = next((p for p in core.list_namespaced_pod(k8s_namespace).items
                        if p.metadata.name == "phoenix-1"), None)  # fmt: skip
            return pod if pod and pod.metadata.uid != old.metadata.uid and pod_ready(pod) else None

        new = wait_until(replaced, timeout=120, what="phoenix-1 recreated", interval=0.5)
        assert new.status.pod_ip != old.status.pod_ip
        events = [e for e in core.list_namespaced_event(k8s_namespace).items
                  if e.reason == "RestartedWorkerReplaced"]  # fmt: skip
        on_mesh = [e for e in events if e.involved_object.kind == names.KIND]
        assert len(on_mesh) == 1, [e.message for e in events]  # once, not on every pass
        assert on_mesh[0].involved_object.name == "phoenix" and on_mesh[0].type == "Warning"
        assert f"phoenix-1 (IP {old.status.pod_ip})" in on_mesh[0].message
        assert "exit code 137" in on_mesh[0].message and "cannot attach" in on_mesh[0].message
        # the pod's own Event keeps why its worker died for KubernetesJob, the pod being gone
        on_pod = [e for e in core.list_namespaced_event(k8s_namespace).items
                  if e.involved_object.uid == old.metadata.uid]  # fmt: skip
        assert len([e for e in on_pod if e.reason == "RestartedWorkerReplaced"]) == 1
        serialized = [k8s_api.sanitize_for_serialization(e) for e in on_pod]
        assert lost_reason(None, serialized, "phoenix-1") == "Error"  # SIGKILL: Error, exit 137
        # only the restarted worker's pod: the other one keeps its process and IP
        assert (
            core.read_namespaced_pod("phoenix-0", k8s_namespace).metadata.uid == other.metadata.uid
        )
        state = job.wait_for_workers(timeout=120)
        workers = state["meshes"]["phoenix"]["workers"]
        assert any(new.status.pod_ip in w for w in workers), workers
        assert whoami_hosts(job, "phoenix") == {"phoenix-0", "phoenix-1"}


def test_invalid_meshes_are_rejected_by_the_api_server_with_the_schema_message(
    operator: Any, k8s_api: Any, k8s_namespace: str
) -> None:
    cases = {
        "zero": ({"replicas": 0}, "spec.replicas: Invalid value: 0: spec.replicas in body should be greater than or equal to 1"),
        "Bad-Name": ({"replicas": 1}, "metadata.name must start with a lowercase letter"),
        "wrongport": ({"replicas": 1, "port": "http"}, 'spec.port: Invalid value: "string": spec.port in body must be of type integer'),
    }  # fmt: skip
    for name, (spec, message) in cases.items():
        with pytest.raises(ApiException) as raised:
            create_mesh(k8s_api, k8s_namespace, name, spec)
        assert raised.value.status == 422
        assert message in json.loads(raised.value.body)["message"]
    # kubectl shows the same message to a GitOps user
    bad = {"apiVersion": f"{names.GROUP}/{names.VERSION}", "kind": names.KIND,
           "metadata": {"name": "zero", "namespace": k8s_namespace}, "spec": {"replicas": 0}}  # fmt: skip
    result = operator.kubectl("apply", "-f", "-", input=yaml.safe_dump(bad).encode())
    assert result.returncode != 0
    assert "should be greater than or equal to 1" in result.stderr.decode()
    # valid for the schema, refused for the StatefulSet it makes: said in status and an Event
    create_mesh(k8s_api, k8s_namespace, "noimage", {"replicas": 1,
                "podTemplate": {"containers": [{"name": "w", "command": ["true"]}]}})  # fmt: skip
    wait_until(
        lambda: ready_reason(k8s_api, k8s_namespace, "noimage") == "InvalidSpec",
        timeout=60,
        what="status InvalidSpec",
    )
    message = get_mesh(k8s_api, k8s_namespace, "noimage")["status"]["conditions"][0]["message"]
    assert "StatefulSet noimage refused" in message and "image" in message
    events = k8s.CoreV1Api(k8s_api).list_namespaced_event(k8s_namespace).items
    assert any(e.reason == "InvalidSpec" and e.type == "Warning" for e in events)


def objects(api: Any, namespace: str) -> dict[str, list[str]]:
    core, apps = k8s.CoreV1Api(api), k8s.AppsV1Api(api)
    return {
        "statefulsets": [
            s.metadata.name for s in apps.list_namespaced_stateful_set(namespace).items
        ],
        "deployments": [d.metadata.name for d in apps.list_namespaced_deployment(namespace).items],
        "services": sorted(s.metadata.name for s in core.list_namespaced_service(namespace).items),
        "secrets": [
            s.metadata.name
            for s in core.list_namespaced_secret(namespace).items
            if s.metadata.name.endswith("-token")
        ],
        "pods": sorted(
            p.metadata.name
            for p in core.list_namespaced_pod(namespace).items
            if p.metadata.deletion_timestamp is None
        ),
    }


def sleeper_template() -> dict[str, Any]:
    """Light pods for tests about objects, not Monarch: they sleep and are Ready at once."""
    command = ["python", "-c", "import time; time.sleep(3600)"]
    return {"containers": [{"name": "w", "image": "x", "command": command}],
            "terminationGracePeriodSeconds": 1}  # fmt: skip


def operator_pods(api: Any) -> list[Any]:
    return (
        k8s.CoreV1Api(api)
        .list_namespaced_pod(OPERATOR_NS, label_selector="app.kubernetes.io/name=monarch-operator")
        .items
    )


def test_operator_killed_mid_reconcile_converges_with_nothing_duplicated(
    operator: Any, k8s_api: Any, k8s_namespace: str
) -> None:
    spec = {"replicas": 2, "podTemplate": sleeper_template()}
    create_mesh(k8s_api, k8s_namespace, "sturdy", spec)
    killed = operator_pods(k8s_api)[0].metadata.name
    k8s.CoreV1Api(k8s_api).delete_namespaced_pod(killed, OPERATOR_NS, grace_period_seconds=0)
    wait_until(
        lambda: any(p.metadata.name != killed and pod_ready(p) for p in operator_pods(k8s_api)),
        timeout=120,
        what="the operator's replacement pod",
    )
    wait_ready(k8s_api, k8s_namespace, "sturdy")
    assert objects(k8s_api, k8s_namespace) == {
        "statefulsets": ["sturdy"],
        "deployments": [],
        "services": ["sturdy-svc"],
        "secrets": [],
        "pods": ["sturdy-0", "sturdy-1"],
    }
    # drift: a deleted child is put back by the next pass
    k8s.CoreV1Api(k8s_api).delete_namespaced_service("sturdy-svc", k8s_namespace)
    wait_until(
        lambda: "sturdy-svc" in objects(k8s_api, k8s_namespace)["services"],
        timeout=60,
        what="the headless Service recreated",
    )
    # suspend scales to zero and says so
    custom(k8s_api).patch_namespaced_custom_object(
        names.GROUP,
        names.VERSION,
        k8s_namespace,
        names.PLURAL,
        "sturdy",
        {"spec": {"suspend": True}},
    )
    wait_until(
        lambda: (
            ready_reason(k8s_api, k8s_namespace, "sturdy") == "Suspended"
            and not objects(k8s_api, k8s_namespace)["pods"]
        ),
        timeout=60,
        what="the mesh suspended with no pods",
    )


def test_deleting_a_mesh_while_the_operator_is_down_completes(
    operator: Any, k8s_api: Any, k8s_namespace: str
) -> None:
    create_mesh(
        k8s_api, k8s_namespace, "doomed", {"replicas": 1, "podTemplate": sleeper_template()}
    )
    wait_ready(k8s_api, k8s_namespace, "doomed")
    assert not get_mesh(k8s_api, k8s_namespace, "doomed")["metadata"].get("finalizers")
    apps = k8s.AppsV1Api(k8s_api)
    apps.patch_namespaced_deployment_scale(
        "monarch-operator", OPERATOR_NS, {"spec": {"replicas": 0}}
    )
    try:
        wait_until(lambda: not operator_pods(k8s_api), timeout=60, what="the operator gone")
        result = operator.kubectl(
            "delete", "monarchmesh", "doomed", "-n", k8s_namespace, "--timeout=30s"
        )
        assert result.returncode == 0, result.stderr.decode()
        # the garbage collector removes the children through their owner references
        wait_until(
            lambda: (
                objects(k8s_api, k8s_namespace)
                == {
                    "statefulsets": [],
                    "deployments": [],
                    "services": [],
                    "secrets": [],
                    "pods": [],
                }
            ),
            timeout=90,
            what="the children garbage-collected",
        )
    finally:
        apps.patch_namespaced_deployment_scale(
            "monarch-operator", OPERATOR_NS, {"spec": {"replicas": 1}}
        )
        wait_until(
            lambda: any(pod_ready(p) for p in operator_pods(k8s_api)),
            timeout=120,
            what="the operator back",
        )


def test_attach_mode_fronts_existing_pods_and_creates_no_workers(
    operator: Any, k8s_api: Any, k8s_namespace: str
) -> None:
    worker = {
        "name": "worker",
        "image": "x",
        "command": ["python", "-m", "monarch_gateway.worker", "tcp://$(POD_IP):26600"],
        "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
        "readinessProbe": {"tcpSocket": {"port": 26600}, "periodSeconds": 1},
    }
    k8s.CoreV1Api(k8s_api).create_namespaced_pod(
        k8s_namespace,
        {
            "metadata": {"name": "byo-0", "labels": {"team": "byo"}},
            "spec": {"containers": [worker]},
        },
    )
    create_mesh(
        k8s_api,
        k8s_namespace,
        "byo",
        {"workerSelector": {"matchLabels": {"team": "byo"}}, "gateway": {"enabled": True}},
    )
    mesh = wait_ready(k8s_api, k8s_namespace, "byo")
    found = objects(k8s_api, k8s_namespace)
    assert found["statefulsets"] == [] and found["services"] == ["byo-gateway"]
    assert [p for p in found["pods"] if not p.startswith("byo-gateway-")] == ["byo-0"]
    assert "serviceName" not in mesh["status"]  # no headless Service of workers
    url, token = gateway_url_and_token(k8s_api, k8s_namespace, mesh)
    with connect(url, token) as job:
        assert whoami_hosts(job, "byo") == {"byo-0"}


def test_an_idle_mesh_scales_to_zero_and_a_newer_activity_mark_brings_it_back(
    operator: Any, k8s_api: Any, k8s_namespace: str
) -> None:
    spec = {"replicas": 1, "idleTimeoutSeconds": 4, "podTemplate": sleeper_template()}
    create_mesh(k8s_api, k8s_namespace, "napper", spec)
    wait_until(
        lambda: (
            ready_reason(k8s_api, k8s_namespace, "napper") == "Idle"
            and not objects(k8s_api, k8s_namespace)["pods"]
        ),
        timeout=60,
        what="the idle mesh scaled to zero",
    )
    # marked as used (as KubernetesJob.state() does); a minute ahead, so that the 4 s timeout
    # cannot expire again before the check below on a loaded machine
    stamp = (datetime.now(UTC) + timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    custom(k8s_api).patch_namespaced_custom_object(
        names.GROUP, names.VERSION, k8s_namespace, names.PLURAL, "napper",
        {"metadata": {"annotations": {names.ACTIVITY_ANNOTATION: stamp}}},
    )  # fmt: skip
    wait_ready(k8s_api, k8s_namespace, "napper", timeout=60)
    assert objects(k8s_api, k8s_namespace)["pods"] == ["napper-0"]


def test_install_operator_from_python_applies_the_same_base_and_can_run_again(
    operator: Any, k8s_api: Any, install_operator_for_tests: Any
) -> None:
    """Last in the module: a second operator runs for a moment (it would reconcile the same
    meshes to the same objects, but none are made meanwhile). The ClusterRoleBinding is one
    per cluster, so the session's install is put back afterwards, as later modules need it
    (its etcd for etcd-v2 jobs too: ``test_torchrun_etcd.py``)."""
    namespace = f"ops-{secrets.token_hex(3)}"
    try:
        for _ in range(2):  # server-side apply: the second run changes nothing
            install_operator(k8s_api, namespace, listen_host="podIP", image="reg/monarch:1")
        pod = wait_until(lambda: operator_pod(k8s_api, namespace), timeout=120, what="operator")
        container = pod.spec.containers[0]
        assert container.image == "reg/monarch:1"
        assert container.command == ["python", "-m", "monarch_k8s.operator"]
        assert pod.spec.service_account_name == "monarch-operator"
        env = {e.name: e.value for e in container.env}
        assert env["MONARCH_LISTEN_HOST"] == "podIP" and env["MONARCH_IMAGE"] == "reg/monarch:1"
    finally:
        operator.kubectl("delete", "namespace", namespace, "--wait=false")
        install_operator_for_tests()
    # put back with the session's settings: an etcd-v2 job after this module still gets its etcd
    restored = k8s.AppsV1Api(k8s_api).read_namespaced_deployment("monarch-operator", OPERATOR_NS)
    env = {e.name for e in restored.spec.template.spec.containers[0].env}
    assert "TORCHRUN_ETCD_COMMAND" in env, env
