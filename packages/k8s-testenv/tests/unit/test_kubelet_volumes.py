"""Volume rules on plain dicts (files, modes, errors, mounts) and the AtomicWriter on disk."""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

import pytest
from k8s_testenv.kubelet.mounts import PodVolumes, write_atomic
from k8s_testenv.kubelet.podspec import ConfigError, PodNetwork
from k8s_testenv.kubelet.volumes import (
    File,
    Mount,
    TokenSpec,
    VolumeError,
    claim_of,
    claim_path,
    container_mounts,
    hostpath_action,
    memory_size,
    mount_point,
    mount_script,
    object_refs,
    payload,
    token_needs_refresh,
    token_specs,
)

NET = PodNetwork(pod_ip="127.10.0.7", host_ip="127.0.0.1", node_name="node-0")
POD: dict[str, Any] = {
    "metadata": {
        "name": "web-0",
        "namespace": "team",
        "uid": "u-1",
        "labels": {"app": "web", "tier": 'a"b'},
        "annotations": {},
    },
    "spec": {"nodeName": "node-0", "containers": [{"name": "c"}]},
}
CM = {"data": {"a.txt": "alpha", "b.txt": "beta"}, "binaryData": {"bin": "AAE="}}
SECRET = {"data": {"password": base64.b64encode(b"s3cret").decode()}}


def files(volume: dict[str, Any], objects: Any = None, tokens: Any = None) -> dict[str, File]:
    return payload(volume, POD, NET, objects=objects or {}, tokens=tokens or {})


def test_config_map_volume_shows_every_key_with_the_default_mode() -> None:
    volume = {"name": "cfg", "configMap": {"name": "cm"}}
    assert object_refs(volume) == [("configmap", "cm")]
    assert files(volume, {("configmap", "cm"): CM}) == {
        "a.txt": File(b"alpha", 0o644),
        "b.txt": File(b"beta", 0o644),
        "bin": File(b"\x00\x01", 0o644),
    }


def test_items_pick_keys_paths_and_modes() -> None:
    volume = {
        "name": "cfg",
        "configMap": {
            "name": "cm",
            "defaultMode": 0o440,
            "items": [
                {"key": "a.txt", "path": "conf/a"},
                {"key": "b.txt", "path": "b", "mode": 0o600},
            ],
        },
    }
    assert files(volume, {("configmap", "cm"): CM}) == {
        "conf/a": File(b"alpha", 0o440),
        "b": File(b"beta", 0o600),
    }


def test_missing_objects_and_keys_fail_with_the_kubelets_messages_unless_optional() -> None:
    cm = {"name": "cfg", "configMap": {"name": "y"}}
    with pytest.raises(VolumeError, match=r'^configmap "y" not found$'):
        files(cm, {("configmap", "y"): None})
    secret = {"name": "s", "secret": {"secretName": "creds"}}
    with pytest.raises(VolumeError, match=r'^secret "creds" not found$'):
        files(secret, {("secret", "creds"): None})
    optional = {"name": "cfg", "configMap": {"name": "y", "optional": True}}
    assert files(optional, {("configmap", "y"): None}) == {}
    bad_key = {"name": "cfg", "configMap": {"name": "cm", "items": [{"key": "zz", "path": "z"}]}}
    with pytest.raises(VolumeError, match="configmap references non-existent config key: zz"):
        files(bad_key, {("configmap", "cm"): CM})
    bad_secret_key = {
        "name": "s",
        "secret": {"secretName": "creds", "items": [{"key": "k", "path": "k"}]},
    }
    with pytest.raises(VolumeError, match=r"^references non-existent secret key: k$"):
        files(bad_secret_key, {("secret", "creds"): SECRET})


def test_secret_values_are_decoded() -> None:
    volume = {"name": "s", "secret": {"secretName": "creds", "defaultMode": 0o400}}
    assert object_refs(volume) == [("secret", "creds")]
    assert files(volume, {("secret", "creds"): SECRET}) == {"password": File(b"s3cret", 0o400)}


def test_downward_api_formats_labels_like_upstream() -> None:
    volume = {
        "name": "info",
        "downwardAPI": {
            "items": [
                {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}},
                {"path": "./name", "fieldRef": {"fieldPath": "metadata.name"}, "mode": 0o600},
                {
                    "path": "mem",
                    "resourceFieldRef": {"containerName": "c", "resource": "limits.memory"},
                },
            ]
        },
    }
    assert files(volume) == {
        "labels": File(b'app="web"\ntier="a\\"b"', 0o644),
        "name": File(b"web-0", 0o600),
        "mem": File(b"0", 0o644),
    }


def kube_api_access(sa_expiration: int = 3607) -> dict[str, Any]:
    """The volume the ServiceAccount admission plugin adds to every pod."""
    return {
        "name": "kube-api-access-abcde",
        "projected": {
            "defaultMode": 420,
            "sources": [
                {"serviceAccountToken": {"expirationSeconds": sa_expiration, "path": "token"}},
                {
                    "configMap": {
                        "name": "kube-root-ca.crt",
                        "items": [{"key": "ca.crt", "path": "ca.crt"}],
                    }
                },
                {
                    "downwardAPI": {
                        "items": [
                            {"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}
                        ]
                    }
                },
            ],
        },
    }


def test_projected_service_account_volume_has_token_ca_and_namespace() -> None:
    volume = kube_api_access()
    (spec,) = token_specs(volume)
    assert spec == TokenSpec("", 3607)
    ca = {"data": {"ca.crt": "PEM"}}
    got = files(volume, {("configmap", "kube-root-ca.crt"): ca}, {spec: "jwt"})
    assert got == {
        "token": File(b"jwt", 0o644),
        "ca.crt": File(b"PEM", 0o644),
        "namespace": File(b"team", 0o644),
    }


def test_projected_volume_reports_every_failing_source() -> None:
    volume = {
        "name": "p",
        "projected": {"sources": [{"configMap": {"name": "a"}}, {"secret": {"name": "b"}}]},
    }
    with pytest.raises(VolumeError, match=r'^\[configmap "a" not found, secret "b" not found\]$'):
        files(volume, {("configmap", "a"): None, ("secret", "b"): None})


def test_payload_paths_may_not_escape_the_volume() -> None:
    volume = {
        "name": "cfg",
        "configMap": {"name": "cm", "items": [{"key": "a.txt", "path": "../x"}]},
    }
    with pytest.raises(VolumeError, match=r"must not contain '\.\.'"):
        files(volume, {("configmap", "cm"): CM})


def test_unsupported_volume_types_are_named() -> None:
    with pytest.raises(VolumeError, match="does not support csi volumes"):
        files({"name": "x", "csi": {"driver": "d"}})


def test_token_is_refreshed_at_80_percent_of_its_lifetime_or_after_a_day() -> None:
    spec = TokenSpec("", 3600)
    expires = 10_000.0
    assert not token_needs_refresh(spec, expires, now=expires - 3600 + 2879)
    assert token_needs_refresh(spec, expires, now=expires - 720)
    long = TokenSpec("", 7 * 86400)
    assert token_needs_refresh(long, 1e6 + long.expiration_seconds, now=1e6 + 86400)


@pytest.mark.parametrize(
    ("path_type", "found", "outcome"),
    [
        ("", None, None),
        ("DirectoryOrCreate", None, "mkdir"),
        ("DirectoryOrCreate", "Directory", None),
        ("FileOrCreate", None, "touch"),
        ("Directory", "Directory", None),
        ("Socket", "Socket", None),
        ("File", "Directory", "hostPath type check failed: /h is not a file, it's a Directory"),
        (
            "FileOrCreate",
            "Directory",
            "hostPath type check failed: /h is not a file, it's a Directory",
        ),
        (
            "Directory",
            None,
            "hostPath type check failed, /h is not a directory, unable to determine its type: "
            "stat /h: no such file or directory",
        ),
        ("Pipe", "File", "Pipe is an invalid volume type"),
    ],
)
def test_host_path_type_checks(path_type: str, found: str | None, outcome: str | None) -> None:
    if outcome in (None, "mkdir", "touch"):
        assert hostpath_action("/h", path_type, found) == outcome
    else:
        with pytest.raises(VolumeError) as err:
            hostpath_action("/h", path_type, found)
        assert str(err.value) == outcome


def test_memory_empty_dir_size_is_the_smallest_of_node_pod_limit_and_size_limit() -> None:
    def pod(limits: list[str | None]) -> dict[str, Any]:
        containers = [
            {"name": f"c{i}", "resources": {"limits": {"memory": m}} if m else {}}
            for i, m in enumerate(limits)
        ]
        return {"spec": {"containers": containers}}

    shm = {"name": "shm", "emptyDir": {"medium": "Memory"}}
    sized = {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "64Mi"}}
    assert memory_size(shm, pod([None]), "128Gi") == 128 * 2**30
    assert memory_size(shm, pod(["1Gi", "1Gi"]), "128Gi") == 2 * 2**30
    assert memory_size(shm, pod(["1Gi", None]), "128Gi") == 128 * 2**30  # no pod-level limit
    assert memory_size(sized, pod(["1Gi"]), "128Gi") == 64 * 2**20
    assert memory_size(sized, pod(["32Mi"]), "128Gi") == 32 * 2**20


def test_claim_must_be_bound_to_a_host_path_or_local_volume() -> None:
    bound = {"spec": {"volumeName": "pv-1"}, "status": {"phase": "Bound"}}
    host = {"spec": {"hostPath": {"path": "/tmp/hostpath_pv/u"}}}
    assert claim_path("data", bound, host) == "/tmp/hostpath_pv/u"
    assert claim_path("data", bound, {"spec": {"local": {"path": "/mnt/d"}}}) == "/mnt/d"
    with pytest.raises(VolumeError, match="PVC is not bound"):
        claim_path("data", {"spec": {}, "status": {"phase": "Pending"}}, None)
    with pytest.raises(VolumeError, match='persistentvolumeclaims "data" not found'):
        claim_path("data", None, None)
    with pytest.raises(VolumeError, match="neither hostPath nor local"):
        claim_path("data", bound, {"spec": {"nfs": {"path": "/x"}}})


def test_an_ephemeral_volume_uses_the_claim_its_pod_controls() -> None:
    volume = {"name": "scratch", "ephemeral": {"volumeClaimTemplate": {"spec": {}}}}
    assert claim_of(volume, POD) == ("web-0-scratch", False)
    pvc = {
        "metadata": {"ownerReferences": [{"uid": "u-1", "controller": True}]},
        "spec": {"volumeName": "pv-1"},
        "status": {"phase": "Bound"},
    }
    pv = {"spec": {"hostPath": {"path": "/p"}}}
    assert claim_path("web-0-scratch", pvc, pv, owner=POD) == "/p"
    stranger = {**pvc, "metadata": {"ownerReferences": [{"uid": "other", "controller": True}]}}
    with pytest.raises(VolumeError) as err:
        claim_path("web-0-scratch", stranger, pv, owner=POD)
    assert str(err.value) == (
        "PVC team/web-0-scratch was not created for pod team/web-0 (pod is not owner)"
    )
    claim = {"name": "d", "persistentVolumeClaim": {"claimName": "data", "readOnly": True}}
    assert claim_of(claim, POD) == ("data", True)


def test_container_mounts_resolve_sub_paths_and_sort_parents_first() -> None:
    container = {
        "name": "c",
        "volumeMounts": [
            {"name": "cfg", "mountPath": "/etc/app/conf.d/x.yaml", "subPath": "x.yaml"},
            {"name": "data", "mountPath": "/data/", "readOnly": True},
            {"name": "data", "mountPath": "/logs", "subPathExpr": "logs/$(POD_NAME)"},
            {"name": "cfg", "mountPath": "/etc/app"},
        ],
    }
    paths = {"cfg": ("/v/cfg", True), "data": ("/v/data", False)}
    mounts = container_mounts(container, paths, {"POD_NAME": "web-0"})
    assert mounts == [
        Mount("/v/data", "/data", True, "data"),
        Mount("/v/data/logs/web-0", "/logs", False, "data", "/v/data"),
        Mount("/v/cfg", "/etc/app", True, "cfg"),
        Mount("/v/cfg/x.yaml", "/etc/app/conf.d/x.yaml", True, "cfg", "/v/cfg"),
    ]
    # a mount point inside an earlier mount is created in that volume's folder, as upstream
    assert mount_point(mounts[3], mounts[:3]) == "/v/cfg/conf.d/x.yaml"
    assert mount_point(mounts[2], mounts[:2]) == "/etc/app"
    assert mount_script(mounts[:1]) == "mount --bind -o ro /v/data /data"


@pytest.mark.parametrize(
    ("mount", "message"),
    [
        ({"name": "nope", "mountPath": "/x"}, 'cannot find volume "nope" to mount into container "c"'),
        ({"name": "v", "mountPath": "/x", "subPath": "/abs"}, "error SubPath `/abs` must not be an absolute path"),
        ({"name": "v", "mountPath": "/x", "subPathExpr": "$(UP)/x"}, "unable to provision SubPath `../x`: must not contain '..'"),
    ],
)  # fmt: skip
def test_bad_volume_mounts_are_container_config_errors(mount: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        container_mounts({"name": "c", "volumeMounts": [mount]}, {"v": ("/v", False)}, {"UP": ".."})
    assert str(err.value) == message


def test_mount_script_quotes_paths() -> None:
    assert mount_script([Mount("/v/a b", "/x'y", False, "v")]) == (
        "mount --bind '/v/a b' '/x'\"'\"'y'"
    )


def test_atomic_writer_swaps_data_and_prunes_removed_keys(tmp_path: Path) -> None:
    write_atomic(tmp_path, {"a": File(b"1", 0o600), "dir/b": File(b"2", 0o644)})
    first = os.readlink(tmp_path / "..data")
    assert os.readlink(tmp_path / "a") == "..data/a"
    assert (tmp_path / "dir" / "b").read_bytes() == b"2"
    assert oct((tmp_path / "a").stat().st_mode & 0o777) == oct(0o600)
    with open(tmp_path / "a", "rb") as held:  # what a subPath bind mount holds: the old inode
        write_atomic(tmp_path, {"a": File(b"one", 0o644)})
        assert os.readlink(tmp_path / "..data") != first
        assert not (tmp_path / first).exists()
        assert (tmp_path / "a").read_bytes() == b"one"
        assert not os.path.lexists(tmp_path / "dir")
        assert held.read() == b"1"
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("..2")) == [
        "..data",
        "a",
    ]


class NoSources:
    """Volume sources for volumes that need no API object."""

    generation = 0

    def object(self, kind: str, namespace: str, name: str) -> None:
        return None

    def claim(self, namespace: str, name: str) -> tuple[None, None]:
        return None, None

    def token(self, pod: Any, spec: TokenSpec) -> tuple[str, float]:
        raise AssertionError("no token expected")


def pod_volumes(tmp_path: Path, volumes: list[dict[str, Any]]) -> tuple[PodVolumes, list[str]]:
    warnings: list[str] = []
    pod = {"metadata": {"name": "p", "namespace": "ns", "uid": "u"}, "spec": {"volumes": volumes}}
    volumes_ = PodVolumes(
        pod,
        tmp_path / "pod",
        net=NET,
        sources=NoSources(),
        node_memory="1Gi",
        warn=lambda reason, message: warnings.append(f"{reason}: {message}"),
    )
    return volumes_, warnings


def test_sub_paths_are_created_inside_the_volume_and_may_not_escape_it(tmp_path: Path) -> None:
    volumes, warnings = pod_volumes(tmp_path, [{"name": "v", "emptyDir": {}}])
    assert volumes.sync(volumes.pod, now=0.0) and not warnings
    root = Path(volumes.paths["v"][0])
    assert oct(root.stat().st_mode & 0o777) == oct(0o777)
    target = tmp_path / "mnt" / "work"
    container = {
        "name": "c",
        "volumeMounts": [{"name": "v", "mountPath": str(target), "subPath": "a/b"}],
    }
    (mount,) = volumes.mounts_for(container, {})
    assert mount.source == str(root / "a" / "b") and (root / "a" / "b").is_dir()
    assert target.is_dir()  # the mount point, created on the host
    (root / "out").symlink_to(tmp_path)
    container["volumeMounts"][0]["subPath"] = "out"
    with pytest.raises(ConfigError) as err:
        volumes.mounts_for(container, {})
    assert str(err.value) == 'failed to prepare subPath for volumeMount "v" of container "c"'
    volumes.teardown()
    assert not (tmp_path / "pod" / "volumes").exists() and tmp_path.exists()


def test_a_failed_host_path_check_is_retried_and_reported_as_failed_mount(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    spec = {"name": "h", "hostPath": {"path": str(missing), "type": "Directory"}}
    volumes, warnings = pod_volumes(tmp_path, [spec])
    assert not volumes.sync(volumes.pod, now=0.0)
    assert warnings == [
        f'FailedMount: MountVolume.SetUp failed for volume "h" : hostPath type check failed, '
        f"{missing} is not a directory, unable to determine its type: stat {missing}: no such "
        "file or directory"
    ]
    assert not volumes.sync(volumes.pod, now=0.1) and len(warnings) == 1  # back-off
    missing.mkdir()
    assert volumes.sync(volumes.pod, now=1.0) and volumes.paths == {"h": (str(missing), False)}
