"""The operator's decisions as plain functions: MonarchMesh in, child objects out."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from monarch_k8s import names
from monarch_k8s.operator.plan import Action, plan_update
from monarch_k8s.operator.render import (
    MeshSpecError,
    RenderOptions,
    activity_to_mark,
    desired_replicas,
    parse_mesh,
    render_children,
    selector_string,
    stale_children,
)
from monarch_k8s.operator.status import Observed, render_status

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
OPTS = RenderOptions(image="img:1")
UPSTREAM = yaml.safe_load((Path(__file__).parent.parent / "data" / "ddp_mesh.yaml").read_text())


def body(spec: dict[str, Any], name: str = "mesh", **meta: Any) -> dict[str, Any]:
    metadata = {"name": name, "namespace": "ns", "uid": "u-1", "generation": 3, **meta}
    return {"apiVersion": "monarch.pytorch.org/v1alpha1", "kind": "MonarchMesh",
            "metadata": metadata, "spec": spec}  # fmt: skip


def children(b: dict[str, Any], now: datetime = NOW) -> dict[tuple[str, str], dict[str, Any]]:
    objs = render_children(parse_mesh(b), now=now, opts=OPTS)
    return {(o["kind"], o["metadata"]["name"]): o for o in objs}


def template_spec(objs: dict[tuple[str, str], Any], name: str = "mesh") -> dict[str, Any]:
    return objs[("StatefulSet", name)]["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def test_upstream_ddp_mesh_gives_the_service_and_statefulset_upstream_makes() -> None:
    objs = children({**UPSTREAM, "metadata": {**UPSTREAM["metadata"], "uid": "u-1"}})
    assert set(objs) == {("Service", "ddpmesh-svc"), ("StatefulSet", "ddpmesh")}
    labels = {
        "monarch.pytorch.org/mesh-name": "ddpmesh",
        "app.kubernetes.io/name": "monarch-worker",
    }
    owner = {"apiVersion": "monarch.pytorch.org/v1alpha1", "kind": "MonarchMesh",
             "name": "ddpmesh", "uid": "u-1", "controller": True, "blockOwnerDeletion": True}  # fmt: skip
    svc = objs[("Service", "ddpmesh-svc")]
    assert svc["metadata"]["labels"] == labels
    assert svc["metadata"]["namespace"] == "monarch-tests"
    assert svc["metadata"]["ownerReferences"] == [owner]
    assert svc["spec"] == {"clusterIP": "None", "selector": labels,
                           "ports": [{"name": "monarch", "port": 26600}]}  # fmt: skip
    sts = objs[("StatefulSet", "ddpmesh")]
    assert sts["metadata"]["ownerReferences"] == [owner]
    assert sts["metadata"]["labels"] == labels
    spec = sts["spec"]
    assert spec["replicas"] == 2 and spec["serviceName"] == "ddpmesh-svc"
    assert spec["selector"] == {"matchLabels": labels}
    assert spec["podManagementPolicy"] == "Parallel"
    assert spec["template"]["metadata"]["labels"] == labels
    worker = spec["template"]["spec"]["containers"][0]
    given = UPSTREAM["spec"]["podTemplate"]["containers"][0]
    # the user's container is kept as written: command, image, resources
    assert {k: worker[k] for k in given} == given
    assert len(sts["metadata"]["annotations"][names.TEMPLATE_HASH_ANNOTATION]) == 64


def test_a_container_without_command_gets_the_worker_bootstrap_and_a_readiness_probe() -> None:
    objs = children(body({"replicas": 1, "port": 27000,
                          "podTemplate": {"containers": [{"name": "w", "image": "x"}]}}))  # fmt: skip
    worker = template_spec(objs)["containers"][0]
    assert worker["command"] == [
        "python",
        "-m",
        "monarch_k8s.run",
        "worker",
        "tcp://$(POD_IP):27000",
    ]
    assert worker["env"][0] == {
        "name": "POD_IP",
        "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}},
    }
    assert worker["readinessProbe"]["tcpSocket"] == {"port": 27000}
    assert {"name": "monarch", "containerPort": 27000} in worker["ports"]


def test_a_container_with_args_but_no_command_keeps_its_args_for_the_image_entrypoint() -> None:
    # Kubernetes semantics: args go to the image's ENTRYPOINT (or are the command line when it
    # has none). The bootstrap would replace the entrypoint and silently drop them.
    args = ["--listen", "tcp://$(POD_IP):27000", "--log-level", "debug"]
    objs = children(body({"replicas": 1, "port": 27000,
                          "podTemplate": {"containers": [{"name": "w", "image": "x",
                                                          "args": args}]}}))  # fmt: skip
    worker = template_spec(objs)["containers"][0]
    assert "command" not in worker and worker["args"] == args
    assert worker["env"][0]["name"] == "POD_IP"  # $(POD_IP) in the args expands
    assert worker["readinessProbe"]["tcpSocket"] == {"port": 27000}
    assert {"name": "monarch", "containerPort": 27000} in worker["ports"]


def test_a_full_pod_template_keeps_its_metadata_and_spec() -> None:
    template = {"metadata": {"labels": {"team": "a"}, "annotations": {"x": "y"}},
                "spec": {"nodeSelector": {"gpu": "h100"},
                         "containers": [{"name": "w", "image": "x", "command": ["run"]}]}}  # fmt: skip
    objs = children(body({"replicas": 2, "podTemplate": template}))
    tpl = objs[("StatefulSet", "mesh")]["spec"]["template"]
    assert tpl["metadata"]["labels"]["team"] == "a"
    assert tpl["metadata"]["labels"][names.MESH_LABEL] == "mesh"
    assert tpl["metadata"]["annotations"] == {"x": "y"}
    assert tpl["spec"]["nodeSelector"] == {"gpu": "h100"}
    assert tpl["spec"]["containers"][0]["command"] == ["run"]


def test_sync_puts_an_agent_beside_each_worker_sharing_an_empty_dir_it_imports_from() -> None:
    objs = children(body({"replicas": 1, "sync": {"enabled": True},
                          "podTemplate": {"containers": [{"name": "w", "image": "x",
                           "env": [{"name": "PYTHONPATH", "value": "/app"}]}]}}))  # fmt: skip
    spec = template_spec(objs)
    worker, agent = spec["containers"]
    assert spec["volumes"] == [{"name": "monarch-sync", "emptyDir": {}}]
    mount = {"name": "monarch-sync", "mountPath": names.SYNC_MOUNT}
    assert mount in worker["volumeMounts"] and mount in agent["volumeMounts"]
    env = {e["name"]: e.get("value") for e in worker["env"]}
    assert env["MONARCH_SYNC_ROOT"] == "/var/lib/monarch-sync/root/current"
    assert env["PYTHONPATH"] == "/var/lib/monarch-sync/root/current:/app"
    assert agent["command"][:4] == ["python", "-m", "monarch_k8s.run", "sync-agent"]
    assert f"$(POD_IP):{names.SYNC_PORT}" in agent["command"]
    token = {"secretKeyRef": {"name": "mesh-gateway-token", "key": "token"}}
    assert {"name": "MONARCH_SYNC_TOKEN", "valueFrom": token} in agent["env"]


def test_gateway_gets_a_deployment_service_and_a_service_account_that_may_only_read_pods() -> None:
    objs = children(body({"replicas": 2, "gateway": {"enabled": True, "args": ["--poll", "1"]},
                          "podTemplate": {"containers": [{"name": "w", "image": "x"}]}}))  # fmt: skip
    dep = objs[("Deployment", "mesh-gateway")]
    pod = dep["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "mesh-gateway"
    argv = pod["containers"][0]["command"]
    assert argv[:5] == ["python", "-m", "monarch_k8s.run", "gateway", "serve"]
    selector = "app.kubernetes.io/name=monarch-worker,monarch.pytorch.org/mesh-name=mesh"
    assert argv[argv.index("--mesh-selector") + 1] == f"mesh=ns/{selector}:26600"
    assert argv[-2:] == ["--poll", "1"]
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["MONARCH_GATEWAY_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "mesh-gateway-token"
    assert env["MONARCH_EXPECTED_WORKERS"]["value"] == "2"
    # its one vain attempt at a worker restarted at its old IP takes this, not Monarch's minute
    assert env["HYPERACTOR_MESH_ATTACH_CONFIG_TIMEOUT"]["value"] == "15s"
    assert objs[("Service", "mesh-gateway")]["spec"]["ports"][0]["port"] == names.GATEWAY_PORT
    assert objs[("Role", "mesh-gateway")]["rules"] == [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}
    ]
    binding = objs[("RoleBinding", "mesh-gateway")]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "mesh-gateway", "namespace": "ns"}
    ]
    assert all(o["metadata"]["ownerReferences"][0]["uid"] == "u-1" for o in objs.values())


def test_the_gateway_listens_on_the_pod_ip_where_pods_share_a_network() -> None:
    b = body({"replicas": 1, "gateway": {}, "podTemplate": {"containers": [{"name": "w"}]}})
    b["spec"]["gateway"] = {"enabled": True}
    opts = RenderOptions(listen_host="podIP")
    dep = next(
        o for o in render_children(parse_mesh(b), now=NOW, opts=opts) if o["kind"] == "Deployment"
    )
    argv = dep["spec"]["template"]["spec"]["containers"][0]["command"]
    assert argv[argv.index("--host") + 1] == "$(POD_IP)"


def test_attach_mode_fronts_the_selected_pods_and_makes_no_workers() -> None:
    b = body({"workerSelector": {"matchLabels": {"team": "a"},
              "matchExpressions": [{"key": "tier", "operator": "In", "values": ["x", "y"]}]}})  # fmt: skip
    objs = children(b)
    assert not any(kind == "StatefulSet" for kind, _ in objs)
    assert ("Service", "mesh-svc") not in objs
    argv = objs[("Deployment", "mesh-gateway")]["spec"]["template"]["spec"]["containers"][0][
        "command"
    ]
    assert argv[argv.index("--mesh-selector") + 1] == "mesh=ns/team=a,tier in (x,y):26600"
    assert objs[("Deployment", "mesh-gateway")]["spec"]["replicas"] == 1


def test_selector_string_rejects_a_selector_that_selects_everything() -> None:
    with pytest.raises(MeshSpecError, match="workerSelector"):
        selector_string({})
    assert selector_string({"matchExpressions": [{"key": "k", "operator": "DoesNotExist"}]}) == "!k"


def test_suspend_and_idle_scale_to_zero_and_new_activity_brings_the_mesh_back() -> None:
    spec = {"replicas": 3, "idleTimeoutSeconds": 600, "gateway": {"enabled": True},
            "podTemplate": {"containers": [{"name": "w"}]}}  # fmt: skip
    created = (NOW - timedelta(hours=1)).isoformat()
    assert desired_replicas(parse_mesh(body(spec, creationTimestamp=created)), NOW) == 0
    recent = {
        names.ACTIVITY_ANNOTATION: (NOW - timedelta(seconds=30)).strftime("%Y-%m-%dT%H:%M:%SZ")
    }
    active = body(spec, creationTimestamp=created, annotations=recent)
    assert desired_replicas(parse_mesh(active), NOW) == 3
    assert desired_replicas(parse_mesh(active), NOW + timedelta(seconds=700)) == 0
    idle = children(body(spec, creationTimestamp=created))
    assert idle[("StatefulSet", "mesh")]["spec"]["replicas"] == 0
    assert idle[("Deployment", "mesh-gateway")]["spec"]["replicas"] == 0
    suspended = body({**spec, "suspend": True}, annotations=recent)
    assert desired_replicas(parse_mesh(suspended), NOW) == 0
    # the activity annotation never reaches the StatefulSet: marking use is no template change
    assert (
        names.ACTIVITY_ANNOTATION
        not in children(active)[("StatefulSet", "mesh")]["metadata"]["annotations"]
    )


def test_a_mesh_without_containers_is_refused_with_the_field_named() -> None:
    with pytest.raises(MeshSpecError, match=r"spec\.podTemplate has no containers"):
        children(body({"replicas": 1, "podTemplate": {}}))


def sts(replicas: int = 2, **container: Any) -> dict[str, Any]:
    b = body({"replicas": replicas, "podTemplate": {"containers": [{"name": "w", **container}]}})
    return next(o for o in children(b).values() if o["kind"] == "StatefulSet")


def live(obj: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(obj)
    out["metadata"]["resourceVersion"] = "42"
    return out


def test_plan_creates_what_is_missing_and_leaves_what_matches() -> None:
    assert plan_update(sts(), None)[0] is Action.CREATE
    assert plan_update(sts(), live(sts()))[0] is Action.NONE


def test_plan_ignores_a_webhook_rewrite_of_the_live_template_but_applies_a_spec_change() -> None:
    mutated = live(sts())
    mutated["spec"]["template"]["spec"]["containers"][0]["image"] = "mirror.local/x"
    assert plan_update(sts(), mutated)[0] is Action.NONE
    action, sent = plan_update(sts(image="v2"), mutated)  # the MonarchMesh changed
    assert action is Action.REPLACE and sent["metadata"]["resourceVersion"] == "42"


def test_plan_scales_when_only_replicas_differ() -> None:
    assert plan_update(sts(3), live(sts(2))) == (Action.SCALE, {"spec": {"replicas": 3}})


def test_plan_keeps_the_allocated_cluster_ip_when_it_replaces_a_service() -> None:
    b = body(
        {
            "replicas": 1,
            "gateway": {"enabled": True},
            "podTemplate": {"containers": [{"name": "w"}]},
        }
    )
    svc = children(b)[("Service", "mesh-gateway")]
    old = live(svc)
    old["metadata"]["annotations"] = {names.APPLIED_HASH_ANNOTATION: "stale"}
    old["spec"]["clusterIP"] = "10.0.0.7"
    action, sent = plan_update(copy.deepcopy(svc), old)
    assert action is Action.REPLACE and sent["spec"]["clusterIP"] == "10.0.0.7"
    assert (
        plan_update(copy.deepcopy(svc), live(plan_update(copy.deepcopy(svc), None)[1]))[0]
        is Action.NONE
    )


def test_status_says_where_the_gateway_is_and_keeps_the_transition_time() -> None:
    mesh = parse_mesh(body({"replicas": 2, "gateway": {"enabled": True},
                            "podTemplate": {"containers": [{"name": "w"}]}}))  # fmt: skip
    waiting = render_status(mesh, Observed(2, 1, False), now=NOW)
    assert waiting["conditions"][0]["reason"] == "Waiting"
    assert waiting["serviceName"] == "mesh-svc.ns.svc.cluster.local"
    assert waiting["gateway"] == {"serviceName": "mesh-gateway", "port": 8765,
                                  "tokenSecret": "mesh-gateway-token", "ready": False}  # fmt: skip
    later = NOW + timedelta(minutes=5)
    still = render_status(mesh, Observed(2, 2, False), now=later, previous=waiting["conditions"])
    assert (
        still["conditions"][0]["lastTransitionTime"]
        == waiting["conditions"][0]["lastTransitionTime"]
    )
    ready = render_status(mesh, Observed(2, 2, True), now=later, previous=still["conditions"])
    assert ready["conditions"][0]["reason"] == "AllReady"
    assert ready["conditions"][0]["lastTransitionTime"] == "2026-12-01T12:05:00Z"
    assert ready["observedGeneration"] == 3


def test_status_reports_suspended_and_idle_meshes() -> None:
    spec = {"replicas": 1, "podTemplate": {"containers": [{"name": "w"}]}}
    suspended = parse_mesh(body({**spec, "suspend": True}))
    assert render_status(suspended, Observed(), now=NOW)["conditions"][0]["reason"] == "Suspended"
    idle = parse_mesh(
        body({**spec, "idleTimeoutSeconds": 5}, creationTimestamp="2026-12-01T11:00:00Z")
    )
    assert render_status(idle, Observed(), now=NOW)["conditions"][0]["reason"] == "Idle"


def test_a_gateway_with_clients_marks_use_now_and_then_not_on_every_pass() -> None:
    spec = {"replicas": 1, "idleTimeoutSeconds": 600, "gateway": {"enabled": True},
            "podTemplate": {"containers": [{"name": "w"}]}}  # fmt: skip
    fresh = parse_mesh(body(spec))
    assert activity_to_mark(fresh, 0, NOW) is None  # nobody connected
    assert activity_to_mark(fresh, None, NOW) is None  # gateway not reachable
    assert activity_to_mark(fresh, 2, NOW) == "2026-12-01T12:00:00Z"
    marked = parse_mesh(body(spec, annotations={names.ACTIVITY_ANNOTATION: "2026-12-01T12:00:00Z"}))
    assert activity_to_mark(marked, 2, NOW + timedelta(seconds=60)) is None
    assert activity_to_mark(marked, 2, NOW + timedelta(seconds=200)) == "2026-12-01T12:03:20Z"
    assert activity_to_mark(parse_mesh(body({**spec, "idleTimeoutSeconds": None})), 2, NOW) is None


def test_children_a_mesh_no_longer_asks_for_are_named_for_pruning() -> None:
    with_gateway = body({"replicas": 1, "gateway": {"enabled": True},
                         "podTemplate": {"containers": [{"name": "w"}]}})  # fmt: skip
    mesh = parse_mesh(with_gateway)
    assert stale_children(mesh, render_children(mesh, now=NOW, opts=OPTS)) == []
    without = parse_mesh(body({"replicas": 1, "podTemplate": {"containers": [{"name": "w"}]}}))
    stale = stale_children(without, render_children(without, now=NOW, opts=OPTS))
    assert sorted(stale) == sorted((k, "mesh-gateway") for k in
                                   ("Deployment", "Service", "RoleBinding", "Role", "ServiceAccount"))  # fmt: skip
    attach = parse_mesh(body({"workerSelector": {"matchLabels": {"a": "b"}}}))
    assert sorted(stale_children(attach, render_children(attach, now=NOW, opts=OPTS))) == [
        ("Service", "mesh-svc"), ("StatefulSet", "mesh")]  # fmt: skip


def test_a_short_idle_timeout_is_marked_before_a_pass_could_find_the_mesh_idle() -> None:
    spec = {"replicas": 1, "idleTimeoutSeconds": 2, "gateway": {"enabled": True},
            "podTemplate": {"containers": [{"name": "w"}]}}  # fmt: skip
    marked = parse_mesh(body(spec, annotations={names.ACTIVITY_ANNOTATION: "2026-12-01T12:00:00Z"}))
    later = NOW + timedelta(seconds=1)  # half the timeout: the 5 s throttle must not apply
    stamp = activity_to_mark(marked, 1, later)
    assert stamp == "2026-12-01T12:00:01Z"
    remarked = parse_mesh(body(spec, annotations={names.ACTIVITY_ANNOTATION: stamp}))
    assert desired_replicas(remarked, later) == 1
