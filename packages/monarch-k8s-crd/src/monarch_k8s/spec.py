"""What a :class:`~monarch_k8s.job.KubernetesJob` asks for, and the MonarchMesh that gives it.

``compute=`` may be a ``kubetorch.Compute`` (kubetorch is an optional extra: it is only read,
never imported here, and its controller is not needed), a plain dict of :class:`MeshSpec`'s
fields, or a :class:`MeshSpec`. All three become one :class:`MeshSpec`, and
:func:`mesh_manifest` turns that into a MonarchMesh with a gateway and sync agents.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monarch_k8s.errors import InvalidJobError
from monarch_k8s.names import GROUP, KIND, MESH_NAME_RE, VERSION, WORKER_PORT

__all__ = [
    "JOB_LABEL",
    "QUEUE_LABEL",
    "SETUP_DIR",
    "MeshSpec",
    "SetupStep",
    "check_name",
    "mesh_manifest",
    "setup_files",
    "to_spec",
]

QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
#: marks the objects a KubernetesJob created, so kill() removes those and nothing else
JOB_LABEL = "monarch.pytorch.org/created-by"
SETUP_DIR = "/opt/monarch-setup"  # the setup cache in the pods (pip targets, markers)
SETUP_FILES_DIR = "/opt/monarch-setup-files"  # kt.Image.copy sources, from a ConfigMap
SETUP_FILES_LIMIT = 900 * 1024  # a ConfigMap holds at most 1 MiB
WORKER_CONTAINER = "worker"
KUBETORCH_ACCOUNT = "kubetorch-service-account"


@dataclass(frozen=True)
class SetupStep:
    """One ``kt.Image`` step, replayed at pod start: ``pip`` (args: requirements), ``env``
    (``NAME=value`` pairs), ``bash`` (one command) or ``copy`` (source, dest)."""

    kind: str
    args: tuple[str, ...]


@dataclass(frozen=True)
class MeshSpec:
    """The compute of a mesh, without kubetorch. Resource strings are Kubernetes quantities."""

    replicas: int = 1
    image: str | None = None
    cpus: str | None = None
    memory: str | None = None
    gpus: int = 0
    env: dict[str, str] = field(default_factory=dict)
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, Any]] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    queue_name: str | None = None
    priority_class_name: str | None = None
    service_account_name: str | None = None
    image_pull_policy: str | None = None
    shared_memory: str | None = None
    setup: tuple[SetupStep, ...] = ()
    command: list[str] | None = None  # None: the operator's worker bootstrap
    setup_cache: str = "hostPath"  # or "emptyDir": a recreated pod then redoes the setup

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> MeshSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InvalidJobError(
                f"compute has unknown keys {unknown}; MeshSpec takes {sorted(known)}"
            )
        values = dict(values)
        values["setup"] = tuple(
            s if isinstance(s, SetupStep) else SetupStep(s[0], tuple(s[1:]))
            for s in values.get("setup", ())
        )
        return cls(**values)


def check_name(name: str) -> str:
    """Upstream's rule for a MonarchMesh name: lowercase letters and digits, starting with a
    letter, at most 63 characters (pods are ``<name>-<i>``; no dashes keeps DNS names simple)."""
    if not MESH_NAME_RE.match(name) or len(name) > 63:
        raise InvalidJobError(
            f"{name!r} is not a valid MonarchMesh name: use lowercase letters and digits, "
            "starting with a letter, at most 63 characters (e.g. 'trainers1')"
        )
    return name


def to_spec(compute: Any) -> MeshSpec:
    """A :class:`MeshSpec` from a MeshSpec, a dict of its fields or a ``kubetorch.Compute``."""
    if isinstance(compute, MeshSpec):
        return compute
    if isinstance(compute, dict):
        return MeshSpec.from_dict(compute)
    if type(compute).__module__.startswith("kubetorch"):
        return from_kubetorch(compute)
    raise InvalidJobError(
        f"compute must be a kubetorch.Compute, a MeshSpec or a dict, not {type(compute).__name__}"
    )


def _strings(values: dict[str, Any] | None) -> dict[str, str]:
    return {str(k): str(v) for k, v in (values or {}).items() if v is not None}


def from_kubetorch(compute: Any) -> MeshSpec:
    """Read a ``kubetorch.Compute`` (v0.5): resources, placement, metadata and image steps.

    kubetorch adds its own defaults (a GPU toleration, its labels and log-level env); only what
    the user asked for is carried over, so the pods look like the user's and nothing else.
    """
    image = compute.image
    gpus = int(compute.gpus or 0)
    tolerations = [
        {k: v for k, v in t.items() if v not in ("", None)}
        for t in (compute.tolerations or [])
        if gpus or t.get("key") not in ("nvidia.com/gpu", "dedicated")
    ]
    env = _strings(compute.env_vars)
    env.pop("KT_LOG_LEVEL", None)
    return MeshSpec(
        replicas=int(compute.replicas or 1),
        image=(image.image_id if image is not None else None) or None,
        cpus=str(compute.cpus) if compute.cpus else None,
        memory=str(compute.memory) if compute.memory else None,
        gpus=gpus,
        env=env,
        node_selector=_strings(compute.node_selector),
        tolerations=tolerations,
        labels={k: v for k, v in _strings(compute.user_labels).items() if k != QUEUE_LABEL},
        annotations=_strings(compute.user_annotations),
        queue_name=compute.queue_name,
        priority_class_name=compute.priority_class_name,
        # kubetorch's default account exists only where kubetorch is installed
        service_account_name=None
        if compute.service_account_name == KUBETORCH_ACCOUNT
        else compute.service_account_name,
        image_pull_policy=compute.image_pull_policy,
        shared_memory=compute.shared_memory_limit,
        setup=image_steps(image) if image is not None else (),
    )


def image_steps(image: Any) -> tuple[SetupStep, ...]:
    """A ``kt.Image``'s steps (its Dockerfile lines after FROM) as :class:`SetupStep`s."""
    copies = iter(image.copy_operations or [])
    steps: list[SetupStep] = []
    for line in image._dockerfile_contents or []:
        verb, _, rest = line.partition(" ")
        if verb == "RUN" and rest.startswith("$KT_PIP_INSTALL_CMD "):
            steps.append(SetupStep("pip", tuple(shlex.split(rest.split(" ", 1)[1]))))
        elif verb == "RUN":
            steps.append(SetupStep("bash", (rest,)))
        elif verb == "ENV":
            name, _, value = rest.partition(" ")
            steps.append(SetupStep("env", (f"{name}={value}",)))
        elif verb == "COPY":
            op = next(copies)
            src = os.path.expanduser(op["source"])
            dest = op.get("dest") or Path(src).name
            if op.get("contents") and os.path.isdir(src):
                src = src.rstrip("/") + "/."
            steps.append(SetupStep("copy", (src, dest)))
        else:
            raise InvalidJobError(
                f"kt.Image step {line!r} cannot be applied at pod start; "
                "use pip_install, set_env_vars, run_bash or copy, or build the image"
            )
    return tuple(steps)


def setup_files(spec: MeshSpec) -> tuple[dict[str, str], list[dict[str, str]]]:
    """The ConfigMap ``binaryData`` carrying ``copy`` sources, and per file ``{key, dest}``."""
    import base64

    data: dict[str, str] = {}
    files: list[dict[str, str]] = []
    size = 0
    for step in spec.setup:
        if step.kind != "copy":
            continue
        src, dest = step.args
        root = Path(src.removesuffix("/."))
        if not root.exists():
            raise InvalidJobError(f"kt.Image.copy source {src!r} does not exist here")
        if root.is_file():
            pairs = [(root, dest)]
        else:
            base = dest if src.endswith("/.") else f"{dest.rstrip('/')}/{root.name}"
            pairs = [
                (p, f"{base}/{p.relative_to(root).as_posix()}")
                for p in sorted(root.rglob("*"))
                if p.is_file()
            ]
        for path, target in pairs:
            body = path.read_bytes()
            size += len(body)
            if size > SETUP_FILES_LIMIT:
                raise InvalidJobError(
                    f"kt.Image.copy sources exceed {SETUP_FILES_LIMIT // 1024} KiB; "
                    "put large trees in sync_dirs (pushed by monarch-sync) or in the image"
                )
            key = f"f{len(files)}"
            data[key] = base64.b64encode(body).decode()
            files.append({"key": key, "dest": target})
    return data, files


def _resources(spec: MeshSpec) -> dict[str, Any]:
    requests: dict[str, Any] = {}
    if spec.cpus:
        requests["cpu"] = spec.cpus
    if spec.memory:
        requests["memory"] = spec.memory
    limits = dict(requests)
    if spec.gpus:
        limits["nvidia.com/gpu"] = spec.gpus
        requests["nvidia.com/gpu"] = spec.gpus
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def setup_plan(spec: MeshSpec, files: list[dict[str, str]]) -> dict[str, Any]:
    """What the init container replays; its hash keys the cache, so a restart skips it."""
    steps = [
        {"kind": s.kind, "args": list(s.args)} for s in spec.setup if s.kind in ("pip", "bash")
    ]
    env = dict(a.split("=", 1) for s in spec.setup if s.kind == "env" for a in s.args)
    plan = {"steps": steps, "env": env, "files": files}
    digest = hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:16]
    return {**plan, "hash": digest}


def mesh_manifest(
    name: str,
    namespace: str,
    spec: MeshSpec,
    *,
    port: int = WORKER_PORT,
    job_id: str = "",
    files_configmap: str | None = None,
    files: list[dict[str, str]] | None = None,
) -> dict[str, Any]:
    """The MonarchMesh for ``spec``: workers, a gateway in front, a sync agent beside each."""
    check_name(name)
    if spec.replicas < 1:
        raise InvalidJobError(f"replicas must be at least 1, got {spec.replicas}")
    plan = setup_plan(spec, files or [])
    env = {**spec.env, **plan["env"]}
    container: dict[str, Any] = {"name": WORKER_CONTAINER, "image": spec.image or "monarch-worker"}
    if spec.command:
        container["command"] = list(spec.command)
    if spec.image_pull_policy:
        container["imagePullPolicy"] = spec.image_pull_policy
    resources = _resources(spec)
    if resources:
        container["resources"] = resources
    pod: dict[str, Any] = {"containers": [container]}
    volumes: list[dict[str, Any]] = []
    mounts: list[dict[str, Any]] = []
    if plan["steps"] or plan["files"]:
        cache = (
            {"hostPath": {"path": "/var/cache/monarch-setup", "type": "DirectoryOrCreate"}}
            if spec.setup_cache == "hostPath"
            else {"emptyDir": {}}
        )
        volumes.append({"name": "monarch-setup", **cache})
        mounts.append({"name": "monarch-setup", "mountPath": SETUP_DIR})
        init_mounts = list(mounts)
        if plan["files"]:
            volumes.append({"name": "monarch-setup-files", "configMap": {"name": files_configmap}})
            init_mounts.append({"name": "monarch-setup-files", "mountPath": SETUP_FILES_DIR})
        home = f"{SETUP_DIR}/{plan['hash']}"
        env["PYTHONPATH"] = f"{home}/site:{home}/files"
        env["MONARCH_SETUP_FILES"] = f"{home}/files"
        pod["initContainers"] = [
            {
                "name": "monarch-setup",
                "image": container["image"],
                "command": ["python", "-m", "monarch_k8s.bootstrap"],
                "env": [{"name": "MONARCH_SETUP_PLAN", "value": json.dumps(plan)}]
                + [{"name": k, "value": v} for k, v in plan["env"].items()],
                "volumeMounts": init_mounts,
            }
        ]
    if spec.shared_memory:
        volumes.append(
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.shared_memory}}
        )
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    if env:
        container["env"] = [{"name": k, "value": v} for k, v in env.items()]
    if mounts:
        container["volumeMounts"] = mounts
    if volumes:
        pod["volumes"] = volumes
    if spec.node_selector:
        pod["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        pod["tolerations"] = list(spec.tolerations)
    if spec.priority_class_name:
        pod["priorityClassName"] = spec.priority_class_name
    if spec.service_account_name:
        pod["serviceAccountName"] = spec.service_account_name
    labels = dict(spec.labels)
    if spec.queue_name:
        labels[QUEUE_LABEL] = spec.queue_name
    template: dict[str, Any] = {"spec": pod}
    if labels or spec.annotations:
        template["metadata"] = {
            k: v for k, v in (("labels", labels), ("annotations", spec.annotations)) if v
        }
    meta_labels = {JOB_LABEL: job_id or "kubernetesjob"}
    if spec.queue_name:
        meta_labels[QUEUE_LABEL] = spec.queue_name  # Kueue admits the workload by this label
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {"name": name, "namespace": namespace, "labels": meta_labels},
        "spec": {
            "replicas": spec.replicas,
            "port": port,
            "podTemplate": template,
            "gateway": {"enabled": True},
            "sync": {"enabled": True},
        },
    }


def attach_manifest(
    name: str,
    namespace: str,
    selector: dict[str, str],
    *,
    port: int = WORKER_PORT,
    job_id: str = "",
) -> dict[str, Any]:
    """A MonarchMesh in attach mode: a gateway in front of existing pods, no workers made."""
    check_name(name)
    if not selector:
        raise InvalidJobError("selector must name at least one label, e.g. {'app': 'workers'}")
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {JOB_LABEL: job_id or "kubernetesjob"},
        },
        "spec": {
            "port": port,
            "workerSelector": {"matchLabels": dict(selector)},
            "gateway": {"enabled": True},
        },
    }
