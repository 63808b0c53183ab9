"""Volumes, storage and in-cluster API access, end to end on the real control plane.

Each pod reports what it sees inside its own mount namespace on its log, which the tests read
through the API server (``read_namespaced_pod_log``), as a user would.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from k8s_testenv import Cluster
from k8s_testenv.testing import wait_until
from kubernetes import client

pytestmark = pytest.mark.timeout(180)

SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


def sh(script: str) -> list[str]:
    return ["/bin/sh", "-c", script]


@pytest.fixture
def mnt(tmp_path: Path) -> str:
    """A folder for the tests' mount paths: missing mount points are created on the host."""
    return str(tmp_path)


def pod(name: str, script: str | list[str], **spec: Any) -> dict[str, Any]:
    """A one-container pod; ``mnt`` becomes ``$M`` in the container, ``mounts`` its mounts."""
    mounts = spec.pop("mounts", [])
    env = [{"name": "M", "value": spec.pop("mnt", "")}]
    command = sh(script) if isinstance(script, str) else script
    container = {
        "name": "c",
        "image": "busybox",
        "command": command,
        "env": env,
        "volumeMounts": mounts,
    }
    return {
        "metadata": {"name": name, "labels": spec.pop("labels", {})},
        "spec": {"terminationGracePeriodSeconds": 1, "containers": [container], **spec},
    }


def log_of(core: client.CoreV1Api, ns: str, name: str) -> str:
    try:
        return str(core.read_namespaced_pod_log(name, ns))
    except client.ApiException:
        return ""


def wait_log(core: client.CoreV1Api, ns: str, name: str, text: str, timeout: float = 60) -> str:
    def seen() -> str | None:
        out = log_of(core, ns, name)
        return out if text in out else None

    return wait_until(
        seen,
        timeout=timeout,
        what=f"{text!r} in the log of {name}",
    )


def phase(core: client.CoreV1Api, ns: str, name: str) -> str:
    return str(core.read_namespaced_pod(name, ns).status.phase)


def test_a_claim_written_by_one_pod_is_read_by_another_and_lives_in_the_cluster_folder(
    k8s_cluster: Cluster, k8s_api: client.ApiClient, k8s_namespace: str, mnt: str
) -> None:
    core, ns = client.CoreV1Api(k8s_api), k8s_namespace
    core.create_namespaced_persistent_volume_claim(
        ns,
        {
            "metadata": {"name": "shared"},
            "spec": {
                "accessModes": ["ReadWriteMany"],
                "resources": {"requests": {"storage": "1Gi"}},
            },
        },
    )
    claim = [{"name": "data", "persistentVolumeClaim": {"claimName": "shared"}}]
    mounts = [{"name": "data", "mountPath": f"{mnt}/data"}]
    core.create_namespaced_pod(
        ns,
        pod("writer", "echo from-writer > $M/data/msg && echo written && sleep 300",
            volumes=claim, mounts=mounts, mnt=mnt, nodeName="node-0"),
    )  # fmt: skip
    wait_log(core, ns, "writer", "written")
    core.create_namespaced_pod(
        ns,
        pod("reader", "cat $M/data/msg && echo reader-was-here > $M/data/back && sleep 300",
            volumes=claim, mounts=mounts, mnt=mnt, nodeName="node-1"),
    )  # fmt: skip
    assert wait_log(core, ns, "reader", "from-writer").strip() == "from-writer"

    pvc = core.read_namespaced_persistent_volume_claim("shared", ns)
    assert (pvc.status.phase, pvc.spec.storage_class_name) == ("Bound", "standard")
    pv = core.read_persistent_volume(pvc.spec.volume_name)
    assert pv.spec.host_path.path.startswith("/tmp/hostpath_pv/")
    folder = k8s_cluster.workdir / "pv" / Path(pv.spec.host_path.path).name
    wait_until(lambda: (folder / "back").exists(), timeout=30, what="the reader's file")
    assert (folder / "msg").read_text() == "from-writer\n"

    # reclaim policy Delete: the controller-manager's deleter removes the folder
    for name in ("writer", "reader"):
        core.delete_namespaced_pod(name, ns)
    wait_until(lambda: not core.list_namespaced_pod(ns).items, timeout=60, what="pods gone")
    core.delete_namespaced_persistent_volume_claim("shared", ns)
    wait_until(lambda: not folder.exists(), timeout=60, what="provisioned folder deleted")


def test_an_ephemeral_volume_gets_its_own_claim_that_goes_with_the_pod(
    k8s_api: client.ApiClient, k8s_namespace: str, mnt: str
) -> None:
    core, ns = client.CoreV1Api(k8s_api), k8s_namespace
    template = {
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}
    }
    core.create_namespaced_pod(
        ns,
        pod("eph", "echo kept > $M/scratch/f && cat $M/scratch/f && sleep 300",
            volumes=[{"name": "scratch", "ephemeral": {"volumeClaimTemplate": template}}],
            mounts=[{"name": "scratch", "mountPath": f"{mnt}/scratch"}], mnt=mnt),
    )  # fmt: skip
    assert wait_log(core, ns, "eph", "kept").strip() == "kept"
    pvc = core.read_namespaced_persistent_volume_claim("eph-scratch", ns)
    assert pvc.status.phase == "Bound" and pvc.metadata.owner_references[0].name == "eph"
    core.delete_namespaced_pod("eph", ns)
    wait_until(
        lambda: not core.list_namespaced_persistent_volume_claim(ns).items,
        timeout=60,
        what="the ephemeral claim garbage-collected",
    )


def test_secret_config_map_and_downward_api_files_have_their_modes_and_follow_updates(
    k8s_api: client.ApiClient, k8s_namespace: str, mnt: str
) -> None:
    core, ns = client.CoreV1Api(k8s_api), k8s_namespace
    core.create_namespaced_config_map(
        ns, {"metadata": {"name": "app"}, "data": {"greeting": "hello-v1", "other": "x"}}
    )
    core.create_namespaced_secret(
        ns, {"metadata": {"name": "creds"}, "stringData": {"password": "pw-v1"}}
    )
    volumes = [
        {
            "name": "cfg",
            "configMap": {
                "name": "app",
                "items": [{"key": "greeting", "path": "greeting", "mode": 0o600}],
            },
        },
        {"name": "sec", "secret": {"secretName": "creds", "defaultMode": 0o400}},
        {
            "name": "info",
            "downwardAPI": {
                "items": [{"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]
            },
        },
    ]
    mounts = [
        {"name": "cfg", "mountPath": f"{mnt}/etc/app"},
        {"name": "sec", "mountPath": f"{mnt}/etc/creds"},
        {"name": "info", "mountPath": f"{mnt}/etc/podinfo"},
        {"name": "cfg", "mountPath": f"{mnt}/pinned", "subPath": "greeting"},
    ]
    script = (
        "stat -L -c 'mode %a %n' $M/etc/app/greeting $M/etc/creds/password; ls $M/etc/app; "
        "(echo x > $M/etc/app/new) 2>/dev/null || echo read-only; last=''; while true; do "
        'now="$(cat $M/etc/app/greeting) $(cat $M/etc/creds/password) $(cat $M/pinned) '
        '$(tr "\\n" , < $M/etc/podinfo/labels)"; '
        '[ "$now" != "$last" ] && echo "seen $now" && last="$now"; sleep 0.1; done'
    )
    core.create_namespaced_pod(
        ns, pod("reader", script, volumes=volumes, mounts=mounts, labels={"v": "1"}, mnt=mnt)
    )
    first = wait_log(core, ns, "reader", "seen ")
    assert "mode 600 " in first and "/etc/app/greeting" in first and "mode 400 " in first
    assert "read-only" in first
    assert "\ngreeting\n" in first and "other" not in first  # only the listed item
    assert 'seen hello-v1 pw-v1 hello-v1 v="1"' in first

    core.patch_namespaced_config_map("app", ns, {"data": {"greeting": "hello-v2"}})
    core.patch_namespaced_secret("creds", ns, {"stringData": {"password": "pw-v2"}})
    core.patch_namespaced_pod("reader", ns, {"metadata": {"labels": {"v": "2"}}})
    # the subPath mount keeps the first version, as upstream
    wait_log(core, ns, "reader", 'seen hello-v2 pw-v2 hello-v1 v="2"', timeout=30)


def test_pod_uses_its_service_account_token_and_rbac_refuses_a_verb_its_role_lacks(
    k8s_api: client.ApiClient, k8s_namespace: str
) -> None:
    core, ns = client.CoreV1Api(k8s_api), k8s_namespace
    core.create_namespaced_service_account(ns, {"metadata": {"name": "lister"}})
    rbac = client.RbacAuthorizationV1Api(k8s_api)
    rbac.create_namespaced_role(
        ns,
        {
            "metadata": {"name": "pod-reader"},
            "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}],
        },
    )
    rbac.create_namespaced_role_binding(
        ns,
        {
            "metadata": {"name": "lister-reads-pods"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-reader"},
            "subjects": [{"kind": "ServiceAccount", "name": "lister", "namespace": ns}],
        },
    )  # fmt: skip
    program = f"""
import base64, json, os
from kubernetes import client, config
config.load_incluster_config()
api = client.CoreV1Api()
ns = open("{SA_DIR}/namespace").read()
claims = open("{SA_DIR}/token").read().split(".")[1]
claims = json.loads(base64.urlsafe_b64decode(claims + "=" * (-len(claims) % 4)))
out = {{"ns": ns, "sub": claims["sub"], "bound_pod": claims["kubernetes.io"]["pod"]["name"],
       "host": os.environ["KUBERNETES_SERVICE_HOST"],
       "pods": sorted(p.metadata.name for p in api.list_namespaced_pod(ns).items)}}
try:
    api.create_namespaced_config_map(ns, {{"metadata": {{"name": "nope"}}}})
except client.ApiException as exc:
    out["create"] = [exc.status, json.loads(exc.body)["message"]]
print("RESULT " + json.dumps(out), flush=True)
"""
    core.create_namespaced_pod(
        ns, pod("me", [sys.executable, "-c", program], serviceAccountName="lister")
    )
    core.create_namespaced_pod(
        ns,
        pod(
            "no-token",
            f"test -e {SA_DIR}/token && echo has-token || echo no-token; sleep 300",
            automountServiceAccountToken=False,
        ),
    )
    out = wait_log(core, ns, "me", "RESULT ")
    result = json.loads(out.split("RESULT ", 1)[1])
    assert result["ns"] == ns and result["bound_pod"] == "me"
    assert result["sub"] == f"system:serviceaccount:{ns}:lister"
    assert result["host"] == "127.0.0.1"
    assert result["pods"] == ["me", "no-token"]
    assert result["create"] == [
        403,
        f'configmaps is forbidden: User "system:serviceaccount:{ns}:lister" cannot create '
        f'resource "configmaps" in API group "" in the namespace "{ns}"',
    ]
    assert wait_log(core, ns, "no-token", "token").strip() == "no-token"
    assert not any(
        v.name.startswith("kube-api-access")
        for v in core.read_namespaced_pod("no-token", ns).spec.volumes or []
    )


def _empty_dir(cluster: Cluster, p: Any, name: str) -> Path:
    meta = p.metadata
    pod_dir = f"{meta.namespace}_{meta.name}_{meta.uid}"
    return (
        cluster.workdir
        / "kubelet"
        / "pods"
        / pod_dir
        / "volumes"
        / "kubernetes.io~empty-dir"
        / name
    )


def test_empty_dirs_host_paths_sub_paths_read_only_mounts_and_memory_tmpfs(
    k8s_cluster: Cluster, k8s_api: client.ApiClient, k8s_namespace: str, mnt: str
) -> None:
    core, ns = client.CoreV1Api(k8s_api), k8s_namespace
    volumes = [
        {"name": "scratch", "emptyDir": {}},
        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "32Mi"}},
        {"name": "host", "hostPath": {"path": f"{mnt}/on-host", "type": "DirectoryOrCreate"}},
    ]
    mounts = [
        {"name": "scratch", "mountPath": f"{mnt}/scratch"},
        {"name": "scratch", "mountPath": f"{mnt}/work", "subPath": "a/b"},
        {"name": "scratch", "mountPath": f"{mnt}/scratch-ro", "readOnly": True},
        {"name": "shm", "mountPath": "/dev/shm"},
        {"name": "host", "mountPath": f"{mnt}/host"},
    ]
    script = (
        "echo via-host > $M/host/h && echo data > $M/work/f && cat $M/scratch/a/b/f $M/scratch-ro/a/b/f && "
        "((touch $M/scratch-ro/x 2>/dev/null && echo ro-writable) || echo ro-refused) && "
        "grep ' /dev/shm ' /proc/self/mountinfo | tail -n1 | grep -o ' - tmpfs ' && "
        "echo \"shm-bytes $(($(stat -f -c '%b * %S' /dev/shm)))\" && echo done && sleep 300"
    )
    core.create_namespaced_pod(ns, pod("scratch", script, volumes=volumes, mounts=mounts, mnt=mnt))
    out = wait_log(core, ns, "scratch", "done")
    assert out.split("\n")[:5] == [
        "data",
        "data",
        "ro-refused",
        " - tmpfs ",
        f"shm-bytes {32 * 2**20}",
    ]

    p = core.read_namespaced_pod("scratch", ns)
    folder, shm = _empty_dir(k8s_cluster, p, "scratch"), _empty_dir(k8s_cluster, p, "shm")
    assert (folder / "a" / "b" / "f").read_text() == "data\n"
    assert (Path(mnt) / "on-host" / "h").read_text() == "via-host\n"
    kubelet_mounts = Path(f"/proc/{k8s_cluster.pids['kubelet']}/mountinfo")
    assert f" {shm} " in kubelet_mounts.read_text()  # the tmpfs, in the kubelet's namespace
    core.delete_namespaced_pod("scratch", ns)
    wait_until(lambda: not folder.exists(), timeout=30, what="emptyDir folder removed")
    assert f" {shm} " not in kubelet_mounts.read_text()


def test_a_missing_config_map_keeps_the_pod_creating_with_a_failed_mount_event_until_it_appears(
    k8s_api: client.ApiClient, k8s_namespace: str, mnt: str
) -> None:
    core, ns = client.CoreV1Api(k8s_api), k8s_namespace
    core.create_namespaced_pod(
        ns,
        pod("waiting", "cat $M/cfg/k; sleep 300",
            volumes=[{"name": "cfg", "configMap": {"name": "later"}}],
            mounts=[{"name": "cfg", "mountPath": f"{mnt}/cfg"}], mnt=mnt),
    )  # fmt: skip
    core.create_namespaced_persistent_volume_claim(
        ns,
        {
            "metadata": {"name": "nowhere"},
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "storageClassName": "no-such-class",
                "resources": {"requests": {"storage": "1Gi"}},
            },
        },
    )
    core.create_namespaced_pod(
        ns,
        pod("unbound", "sleep 300",
            volumes=[{"name": "d", "persistentVolumeClaim": {"claimName": "nowhere"}}],
            mounts=[{"name": "d", "mountPath": f"{mnt}/d"}]),
    )  # fmt: skip
    core.create_namespaced_pod(ns, pod("fine", "echo fine; sleep 300"))

    def repeated_event() -> Any:
        events = core.list_namespaced_event(
            ns, field_selector="involvedObject.name=waiting,reason=FailedMount"
        ).items
        return events[0] if len(events) == 1 and events[0].count >= 2 else None

    event = wait_until(repeated_event, timeout=30, what="a repeated FailedMount event")
    assert event.type == "Warning" and event.source.component == "kubelet"
    assert (
        event.message == 'MountVolume.SetUp failed for volume "cfg" : configmap "later" not found'
    )
    waiting = core.read_namespaced_pod("waiting", ns)
    assert waiting.status.phase == "Pending"
    conditions = {c.type: c.status for c in waiting.status.conditions}
    assert conditions["PodReadyToStartContainers"] == "False"
    assert waiting.status.container_statuses[0].state.waiting.reason == "ContainerCreating"
    wait_log(core, ns, "fine", "fine")

    unbound = core.read_namespaced_pod("unbound", ns)
    (scheduled,) = [c for c in unbound.status.conditions if c.type == "PodScheduled"]
    assert (unbound.status.phase, scheduled.reason) == ("Pending", "Unschedulable")
    assert "pod has unbound immediate PersistentVolumeClaims" in scheduled.message

    core.create_namespaced_config_map(ns, {"metadata": {"name": "later"}, "data": {"k": "arrived"}})
    assert wait_log(core, ns, "waiting", "arrived").strip() == "arrived"
    assert phase(core, ns, "waiting") == "Running"


def test_working_dir_inside_a_volume_is_entered_after_the_mounts(
    k8s_cluster: Cluster, k8s_api: client.ApiClient, k8s_namespace: str, mnt: str
) -> None:
    """As runc: the container starts in its workingDir as seen through its mounts, even a
    folder that exists only inside a volume (an init container made it)."""
    core, ns = client.CoreV1Api(k8s_api), k8s_namespace
    spec = pod("workdir", "pwd && cat here", volumes=[{"name": "v", "emptyDir": {}}],
               mounts=[{"name": "v", "mountPath": f"{mnt}/v"}], mnt=mnt)  # fmt: skip
    init = {**spec["spec"]["containers"][0], "name": "init",
            "command": sh("mkdir -p $M/v/inner && echo inside > $M/v/inner/here")}  # fmt: skip
    spec["spec"]["initContainers"] = [init]
    spec["spec"]["containers"][0]["workingDir"] = f"{mnt}/v/inner"
    spec["spec"]["restartPolicy"] = "Never"
    core.create_namespaced_pod(ns, spec)
    assert wait_log(core, ns, "workdir", "inside").split("\n")[:2] == [f"{mnt}/v/inner", "inside"]
    assert not (Path(mnt) / "v" / "inner").exists()  # the host's mount point stays empty
