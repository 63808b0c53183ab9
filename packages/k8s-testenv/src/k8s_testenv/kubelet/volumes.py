"""Pure volume decisions: what each pod volume holds, and what to mount where in a container.

Theory of operation: the I/O layer (:mod:`k8s_testenv.kubelet.mounts`) asks this module which
API objects and tokens a volume needs (:func:`object_refs`, :func:`token_specs`), fetches them,
and hands them back to :func:`payload`, which returns the files (path, bytes, mode) a
configMap, secret, downwardAPI or projected volume shows, with the upstream kubelet's rules
and error messages (``pkg/volume/{configmap,secret,downwardapi,projected}``). For each container
:func:`container_mounts` turns ``volumeMounts`` into bind mounts (subPath, readOnly) and
:func:`mount_point` says where a missing mount point must be created. Nothing here reads a
clock, a file or the network.
"""

from __future__ import annotations

import base64
import json
import posixpath
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from k8s_testenv.kubelet import podspec

__all__ = [
    "DEFAULT_MODE",
    "File",
    "Mount",
    "TokenSpec",
    "VolumeError",
    "claim_of",
    "claim_path",
    "container_mounts",
    "hostpath_action",
    "memory_size",
    "mount_point",
    "mount_script",
    "object_refs",
    "payload",
    "plugin_dir",
    "token_needs_refresh",
    "token_specs",
    "volume_kind",
]

DEFAULT_MODE = 0o644
#: where the kubelet keeps each kind of volume under the pod folder (as upstream names them);
#: hostPath and persistentVolumeClaim volumes live elsewhere on the host
PLUGIN_DIRS = {
    "emptyDir": "kubernetes.io~empty-dir",
    "configMap": "kubernetes.io~configmap",
    "secret": "kubernetes.io~secret",
    "downwardAPI": "kubernetes.io~downward-api",
    "projected": "kubernetes.io~projected",
}
SUPPORTED = (*PLUGIN_DIRS, "hostPath", "persistentVolumeClaim", "ephemeral")
_TOKEN_MAX_AGE = 24 * 3600.0


class VolumeError(Exception):
    """A volume cannot be set up; the text is what a kubelet puts after ``SetUp failed ... :``."""


@dataclass(frozen=True)
class File:
    """One file of a volume the kubelet writes (upstream's ``FileProjection``)."""

    data: bytes
    mode: int


@dataclass(frozen=True)
class TokenSpec:
    """A ``serviceAccountToken`` projection: one TokenRequest bound to the pod."""

    audience: str
    expiration_seconds: int


@dataclass(frozen=True)
class Mount:
    """A bind mount into a container. ``volume_root`` is set for subPath mounts (the source
    must then stay inside it)."""

    source: str
    target: str
    read_only: bool
    volume: str
    volume_root: str | None = None


def volume_kind(volume: Mapping[str, Any]) -> str:
    """The volume's source type (``emptyDir``, ``configMap`` ...); VolumeError if unsupported."""
    for kind in SUPPORTED:
        if kind in volume:
            return kind
    others = sorted(k for k in volume if k != "name")
    raise VolumeError(
        f"the process kubelet does not support {'/'.join(others) or 'this'} volumes "
        f"(supported: {', '.join(SUPPORTED)})"
    )


def plugin_dir(volume: Mapping[str, Any]) -> str | None:
    """The folder name upstream uses for this volume's kind, or None for host-backed kinds."""
    return PLUGIN_DIRS.get(volume_kind(volume))


def _sources(volume: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """A volume as a list of projection sources (a configMap volume is one source)."""
    kind = volume_kind(volume)
    if kind == "projected":
        return list(volume["projected"].get("sources") or [])
    if kind in ("configMap", "secret", "downwardAPI"):
        return [{kind: volume[kind]}]
    return []


def object_refs(volume: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The (``configmap``|``secret``, name) objects the volume's files come from."""
    refs: list[tuple[str, str]] = []
    for source in _sources(volume):
        if "configMap" in source:
            refs.append(("configmap", source["configMap"]["name"]))
        elif "secret" in source:
            refs.append(("secret", source["secret"].get("secretName") or source["secret"]["name"]))
    return refs


def token_specs(volume: Mapping[str, Any]) -> list[TokenSpec]:
    """The service-account tokens a projected volume needs."""
    return [
        TokenSpec(
            source["serviceAccountToken"].get("audience", ""),
            int(source["serviceAccountToken"].get("expirationSeconds", 3600)),
        )
        for source in _sources(volume)
        if "serviceAccountToken" in source
    ]


def _key_files(
    kind: str,
    obj: Mapping[str, Any] | None,
    ref: Mapping[str, Any],
    default_mode: int,
) -> dict[str, File]:
    """Upstream ``MakePayload`` for a configMap or secret (``obj`` None: not found)."""
    name = ref.get("secretName") or ref["name"]
    optional = bool(ref.get("optional"))
    if obj is None:
        if not optional:
            raise VolumeError(f'{kind} "{name}" not found')
        obj = {}
    values: dict[str, bytes] = {}
    if kind == "secret":
        values = {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
    else:
        values = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
        values |= {k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()}
    items = ref.get("items") or []
    if not items:
        return {k: File(v, default_mode) for k, v in values.items()}
    files: dict[str, File] = {}
    for item in items:
        if item["key"] not in values:
            if optional:
                continue
            what = "configmap references non-existent config key" if kind == "configmap" else (
                "references non-existent secret key"
            )  # fmt: skip
            raise VolumeError(f"{what}: {item['key']}")
        files[item["path"]] = File(values[item["key"]], int(item.get("mode", default_mode)))
    return files


def _format_map(values: Mapping[str, str]) -> str:
    """Upstream ``fieldpath.FormatMap``: sorted ``key="value"`` lines."""
    return "\n".join(f"{k}={json.dumps(values[k], ensure_ascii=False)}" for k in sorted(values))


def _downward_files(
    items: Sequence[Mapping[str, Any]],
    pod: Mapping[str, Any],
    net: podspec.PodNetwork,
    default_mode: int,
) -> dict[str, File]:
    meta = pod.get("metadata", {})
    containers = {c["name"]: c for c in pod.get("spec", {}).get("containers", [])}
    files: dict[str, File] = {}
    for item in items:
        mode = int(item.get("mode", default_mode))
        if "fieldRef" in item:
            path = item["fieldRef"]["fieldPath"]
            if path in ("metadata.labels", "metadata.annotations"):
                value = _format_map(meta.get(path.split(".")[1]) or {})
            else:
                try:
                    value = podspec.field_ref(pod, path, net)
                except podspec.ConfigError as exc:
                    raise VolumeError(str(exc)) from None
        else:
            ref = item["resourceFieldRef"]
            container = containers.get(ref.get("containerName", ""))
            if container is None:
                raise VolumeError(f"container {ref.get('containerName', '')!r} not found in pod")
            value = podspec.resource_field(container, ref)
        files[posixpath.normpath(item["path"])] = File(value.encode(), mode)
    return files


def payload(
    volume: Mapping[str, Any],
    pod: Mapping[str, Any],
    net: podspec.PodNetwork,
    *,
    objects: Mapping[tuple[str, str], Mapping[str, Any] | None],
    tokens: Mapping[TokenSpec, str],
) -> dict[str, File]:
    """The files of a configMap, secret, downwardAPI or projected volume.

    ``objects`` maps each of :func:`object_refs` to the API object (None: not found) and
    ``tokens`` each of :func:`token_specs` to a token. Raises VolumeError with the kubelet's
    message; several failing sources of a projected volume give ``[a, b]`` as upstream.
    """
    kind = volume_kind(volume)
    default_mode = int(volume[kind].get("defaultMode", DEFAULT_MODE))
    files: dict[str, File] = {}
    errors: list[str] = []
    for source in _sources(volume):
        try:
            if "configMap" in source:
                ref = source["configMap"]
                obj = objects.get(("configmap", ref["name"]))
                files |= _key_files("configmap", obj, ref, default_mode)
            elif "secret" in source:
                ref = source["secret"]
                obj = objects.get(("secret", ref.get("secretName") or ref["name"]))
                files |= _key_files("secret", obj, ref, default_mode)
            elif "downwardAPI" in source:
                items = source["downwardAPI"].get("items") or []
                files |= _downward_files(items, pod, net, default_mode)
            elif "serviceAccountToken" in source:
                spec = source["serviceAccountToken"]
                token = tokens[token_specs({"projected": {"sources": [source]}})[0]]
                files[spec["path"]] = File(token.encode(), default_mode)
            else:
                raise VolumeError(f"unsupported projection {sorted(source)}")
        except VolumeError as exc:
            errors.append(str(exc))
    if errors:
        raise VolumeError(errors[0] if len(errors) == 1 else f"[{', '.join(errors)}]")
    for path in files:
        _check_payload_path(path)
    return files


def _check_payload_path(path: str) -> None:
    """Upstream ``AtomicWriter.validatePath``."""
    parts = path.split("/")
    if not path:
        raise VolumeError(f'invalid path: must not be empty: "{path}"')
    if path.startswith("/"):
        raise VolumeError(f"invalid path: must be relative path: {path}")
    if ".." in parts:
        raise VolumeError(f"invalid path: must not contain '..': {path}")
    if parts[0].startswith(".."):
        raise VolumeError(f"invalid path: must not start with '..': {path}")


def token_needs_refresh(spec: TokenSpec, expires_at: float, now: float) -> bool:
    """The kubelet token manager's rule: refresh after 80 % of the TTL or after 24 h."""
    issued = expires_at - spec.expiration_seconds
    if now >= issued + _TOKEN_MAX_AGE:
        return True
    return now >= expires_at - spec.expiration_seconds * 0.2


def memory_size(volume: Mapping[str, Any], pod: Mapping[str, Any], node_memory: str) -> int:
    """Bytes of a ``medium: Memory`` emptyDir's tmpfs (upstream calculateEmptyDirMemorySize):
    node allocatable memory, lowered to the pod's memory limit, then to ``sizeLimit``."""
    size = int(podspec.quantity(node_memory))
    spec = pod.get("spec", {})
    limits = [
        (c.get("resources") or {}).get("limits", {}).get("memory")
        for c in spec.get("containers", [])
    ]
    if limits and all(limits):
        pod_limit = sum(int(podspec.quantity(str(x))) for x in limits)
        init = [
            int(podspec.quantity(str(m)))
            for c in spec.get("initContainers", [])
            if (m := (c.get("resources") or {}).get("limits", {}).get("memory"))
        ]
        pod_limit = max([pod_limit, *init])
        if 0 < pod_limit <= size:
            size = pod_limit
    limit = volume["emptyDir"].get("sizeLimit")
    if limit is not None and 0 < (wanted := int(podspec.quantity(str(limit)))) <= size:
        size = wanted
    return size


_TYPE_NAMES = {
    "Directory": "directory",
    "File": "file",
    "Socket": "socket file",
    "CharDevice": "character device",
    "BlockDevice": "block device",
}


def hostpath_action(path: str, path_type: str, found: str | None) -> str | None:
    """What a hostPath volume of ``type: path_type`` needs, given what ``path`` is on disk.

    ``found`` is one of the ``type`` names (``Directory``, ``File``, ``Socket`` ...), None when
    the path does not exist, or ``"Unknown"``. Returns ``"mkdir"``, ``"touch"`` or None (use
    as is); raises VolumeError with upstream's message when the check fails.
    """
    if ".." in path.split("/"):
        raise VolumeError(f"invalid HostPath `{path}`: must not contain '..'")
    if not path_type:
        return None
    if path_type == "DirectoryOrCreate":
        if found is None:
            return "mkdir"
        path_type = "Directory"
    elif path_type == "FileOrCreate":
        if found is None:
            return "touch"
        path_type = "File"
    if path_type not in _TYPE_NAMES:
        raise VolumeError(f"{path_type} is an invalid volume type")
    if found == path_type:
        return None
    expected = _TYPE_NAMES[path_type]
    if found is None:
        raise VolumeError(
            f"hostPath type check failed, {path} is not a {expected}, unable to determine its "
            f"type: stat {path}: no such file or directory"
        )
    raise VolumeError(f"hostPath type check failed: {path} is not a {expected}, it's a {found}")


def claim_of(volume: Mapping[str, Any], pod: Mapping[str, Any]) -> tuple[str, bool]:
    """(claim name, read-only) of a persistentVolumeClaim or generic ephemeral volume; the
    ephemeral volume controller names its claim ``<pod>-<volume>``."""
    if "ephemeral" in volume:
        return f"{pod['metadata']['name']}-{volume['name']}", False
    source = volume["persistentVolumeClaim"]
    return str(source["claimName"]), bool(source.get("readOnly"))


def claim_path(
    claim: str,
    pvc: Mapping[str, Any] | None,
    pv: Mapping[str, Any] | None,
    *,
    owner: Mapping[str, Any] | None = None,
) -> str:
    """The host path of a bound claim's hostPath or local PersistentVolume.

    ``owner`` (for ephemeral volumes) is the pod that must control the claim.
    """
    if pvc is None:
        raise VolumeError(
            f'failed to fetch PVC from API server: persistentvolumeclaims "{claim}" not found'
        )
    if owner is not None:
        meta = owner["metadata"]
        refs = pvc.get("metadata", {}).get("ownerReferences") or []
        if not any(r.get("controller") and r.get("uid") == meta["uid"] for r in refs):
            raise VolumeError(
                f"PVC {meta['namespace']}/{claim} was not created for pod "
                f"{meta['namespace']}/{meta['name']} (pod is not owner)"
            )
    if pvc.get("metadata", {}).get("deletionTimestamp"):
        raise VolumeError("PVC is being deleted")
    volume_name = pvc.get("spec", {}).get("volumeName")
    if pvc.get("status", {}).get("phase") != "Bound" or not volume_name:
        raise VolumeError("PVC is not bound")
    if pv is None:
        raise VolumeError(f'persistentvolumes "{volume_name}" not found')
    spec = pv.get("spec", {})
    source = spec.get("hostPath") or spec.get("local")
    if source is None:
        raise VolumeError(
            f'PersistentVolume "{volume_name}" is neither hostPath nor local; the process '
            "kubelet mounts only those"
        )
    return str(source["path"])


def container_mounts(
    container: Mapping[str, Any],
    volume_paths: Mapping[str, tuple[str, bool]],
    env: Mapping[str, str],
) -> list[Mount]:
    """The container's bind mounts, parents before children (as container runtimes sort them).

    ``volume_paths`` maps each set-up volume to (host path, mount read-only). Raises
    :class:`~k8s_testenv.kubelet.podspec.ConfigError` (CreateContainerConfigError) with the
    kubelet's ``makeMounts`` messages.
    """
    mounts: list[Mount] = []
    for item in container.get("volumeMounts") or []:
        name = item["name"]
        if name not in volume_paths:
            raise podspec.ConfigError(
                f'cannot find volume "{name}" to mount into container "{container["name"]}"'
            )
        root, forced_ro = volume_paths[name]
        sub = item.get("subPath", "")
        if item.get("subPathExpr"):
            sub = podspec.expand(item["subPathExpr"], env)
        source, volume_root = root, None
        if sub:
            if sub.startswith("/"):
                raise podspec.ConfigError(f"error SubPath `{sub}` must not be an absolute path")
            if ".." in sub.split("/"):
                raise podspec.ConfigError(
                    f"unable to provision SubPath `{sub}`: must not contain '..'"
                )
            source, volume_root = posixpath.join(root, sub), root
        target = posixpath.normpath(posixpath.join("/", item["mountPath"]))
        ro = bool(item.get("readOnly")) or forced_ro
        mounts.append(Mount(source, target, ro, name, volume_root))
    return sorted(mounts, key=lambda m: len(m.target.strip("/").split("/")))


def mount_point(mount: Mount, earlier: Sequence[Mount]) -> str:
    """Where ``mount``'s target must exist before binding: inside the deepest earlier mount that
    contains it (its host folder, like upstream's nested mount points), else on the host."""
    best: Mount | None = None
    for other in earlier:
        if mount.target.startswith(other.target.rstrip("/") + "/") and (
            best is None or len(other.target) > len(best.target)
        ):
            best = other
    if best is None:
        return mount.target
    return posixpath.join(best.source, posixpath.relpath(mount.target, best.target))


def mount_script(mounts: Sequence[Mount]) -> str:
    """Shell commands (``&&``-joined) that bind every mount inside the container's namespace."""
    return " && ".join(
        f"mount --bind{' -o ro' if m.read_only else ''} {shlex.quote(m.source)} "
        f"{shlex.quote(m.target)}"
        for m in mounts
    )
