"""The namespace's workspace cache and how it feeds jobs: objects and decisions, no I/O.

How a workspace reaches a TorchrunJob's workers (the design; ``workspace.py`` wires it in):

1. **One cache per namespace** (the Deployment ``torchrun-workspace``, its PVC, a token
   Secret, a Role): a monarch-sync agent whose versions live on the PVC, so they outlive
   jobs. ``kubectl torchrun submit`` pushes the current directory to it through a
   port-forward (the laptop's only path into the cluster); the agent answers with what it
   lacks, so after a one-file edit only that file's bytes travel.
2. **The job records the version** it was submitted with: ``spec.workspace.version`` (the
   manifest's root hash), copied at pod creation into the ``workspace-sync`` init
   container's env.
3. **Each worker pod** runs that init container: a monarch-sync agent on the pod's workspace
   volume that exits once it holds the version, so the trainer starts only then, in the live
   tree (``<mount>/current``). The trainer's command is wrapped (``agent.py run``) so that an
   agent on the same folder runs beside it for hot reload and ends with it (a second
   container would keep a finished Job's pod running).
4. **The cache feeds them** (:func:`plan_feeds`, run by ``agent.py cache``): it watches the
   namespace's worker pods and pushes each version from its store to every agent that lacks
   it, all of them in one monarch-sync tree (the cache sends each byte once, agents forward).
   After a push it marks the pod with :data:`LIVE_ANNOTATION`.
5. **Hot reload**: ``kubectl torchrun sync JOB`` pushes to the cache and moves the job's
   ``spec.workspace.version`` to the new version; the cache feeds the running trainers' agents, whose
   ``current`` symlink flips atomically. See ``workspace.py`` for what the worker sees.

The token lives in a Secret (env ``MONARCH_SYNC_TOKEN`` from ``secretKeyRef``), never on a
command line; the plugin reads it through the API.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from monarch_k8s.torchrun.names import JOB_LABEL, WORKER_CONTAINER

__all__ = [
    "AGENT",
    "CACHE_APP",
    "CACHE_NAME",
    "CONTAINER_INIT",
    "FEEDER_ROLE_RULES",
    "LIVE_ANNOTATION",
    "POD_IP_ENV",
    "RUN_MODULE",
    "SYNC_PORT",
    "TOKEN_KEY",
    "TOKEN_SECRET",
    "VERSION_ENV",
    "WorkerPod",
    "cache_labels",
    "plan_feeds",
    "render_cache",
    "render_token_secret",
    "token_env",
    "worker_pod",
]

Obj = dict[str, Any]

CACHE_NAME = "torchrun-workspace"
CACHE_APP = "torchrun-workspace-cache"
TOKEN_SECRET = "torchrun-workspace-token"
TOKEN_KEY = "token"
SYNC_PORT = 26710
CACHE_ROOT = "/cache/root"  # the agent's versions, on the PVC
CACHE_SIZE = "20Gi"
#: on a worker pod: the version the cache last delivered to its agent
LIVE_ANNOTATION = "torchrun.ai/workspace-live"
VERSION_ENV = "TORCHRUN_WORKSPACE_VERSION"
CONTAINER_INIT = "workspace-sync"
RUN_MODULE = "monarch_k8s.torchrun.agent"
AGENT = ("python", "-m", RUN_MODULE)

#: what the cache's ServiceAccount may do in its namespace (the operator holds these too)
FEEDER_ROLE_RULES = [
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch", "patch"]},
    {"apiGroups": ["torchrun.ai"], "resources": ["torchrunjobs"], "verbs": ["get", "list"]},
]


def cache_labels() -> dict[str, str]:
    return {"app.kubernetes.io/name": CACHE_APP}


def token_env(var: str = "MONARCH_SYNC_TOKEN") -> Obj:
    ref = {"name": TOKEN_SECRET, "key": TOKEN_KEY}
    return {"name": var, "valueFrom": {"secretKeyRef": ref}}


POD_IP_ENV = {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
NAMESPACE_ENV = {
    "name": "POD_NAMESPACE",
    "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}},
}


def _meta(namespace: str, name: str) -> Obj:
    return {"name": name, "namespace": namespace, "labels": cache_labels()}


def render_token_secret(namespace: str, token: str) -> Obj:
    """Created once, never updated: the token of every push to this namespace's agents."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _meta(namespace, TOKEN_SECRET),
        "type": "Opaque",
        "stringData": {TOKEN_KEY: token},
    }


def render_cache(
    namespace: str, *, image: str, listen_host: str, storage_class: str | None = None
) -> list[Obj]:
    """The cache's objects but the token Secret, in creation order (RBAC first).

    ``listen_host``: ``$(POD_IP)`` where pods share one network namespace (k8s-testenv),
    else ``0.0.0.0`` (a port-forward dials the pod's loopback). No owner: the cache serves
    every job of the namespace and outlives them (``kubectl delete deploy,pvc -l
    app.kubernetes.io/name=torchrun-workspace-cache`` resets it).
    """
    claim: Obj = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": CACHE_SIZE}},
    }
    if storage_class:
        claim["storageClassName"] = storage_class
    rbac_name = CACHE_NAME
    container = {
        "name": "cache",
        "image": image,
        "command": [
            *AGENT,
            "cache",
            "--root",
            CACHE_ROOT,
            "--listen",
            f"{listen_host}:{SYNC_PORT}",
        ],
        "env": [POD_IP_ENV, NAMESPACE_ENV, token_env()],
        "ports": [{"name": "sync", "containerPort": SYNC_PORT}],
        "readinessProbe": {"tcpSocket": {"port": SYNC_PORT}, "periodSeconds": 1},
        "volumeMounts": [{"name": "cache", "mountPath": "/cache"}],
    }
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(namespace, rbac_name)},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": _meta(namespace, rbac_name),
            "rules": FEEDER_ROLE_RULES,
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": _meta(namespace, rbac_name),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": rbac_name},
            "subjects": [{"kind": "ServiceAccount", "name": rbac_name, "namespace": namespace}],
        },
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": _meta(namespace, CACHE_NAME),
            "spec": claim,
        },
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": _meta(namespace, CACHE_NAME),
            "spec": {
                "replicas": 1,
                "strategy": {"type": "Recreate"},  # one agent on the claim at a time
                "selector": {"matchLabels": cache_labels()},
                "template": {
                    "metadata": {"labels": cache_labels()},
                    "spec": {
                        "serviceAccountName": rbac_name,
                        "containers": [container],
                        "volumes": [
                            {"name": "cache", "persistentVolumeClaim": {"claimName": CACHE_NAME}}
                        ],
                    },
                },
            },
        },
    ]


# -- feeding -------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerPod:
    """What the cache needs to know of one worker pod."""

    uid: str
    name: str
    job: str
    address: str | None  # the agent's host:port, None until the pod has an IP
    stage: str  # "init": workspace-sync runs; "running": the trainer runs; else "other"
    created_version: str  # what its init container waits for
    live_version: str | None  # what the cache last delivered (LIVE_ANNOTATION)

    def wants(self, desired: dict[str, str]) -> str | None:
        """The version this pod should hold now: its own while starting (it was submitted
        with it), the job's current one once running (hot reload)."""
        if self.stage == "init":
            return self.created_version
        if self.stage == "running":
            return desired.get(self.job, self.created_version)
        return None


def _running(statuses: list[Obj] | None, name: str) -> bool:
    for status in statuses or []:
        if status.get("name") == name:
            return (status.get("state") or {}).get("running") is not None
    return False


def worker_pod(pod: Obj) -> WorkerPod | None:
    """A worker pod from its JSON form (as the API serves it), or None if it takes no
    workspace (no job label, or no ``workspace-sync`` init container with a version)."""
    meta, spec, status = pod.get("metadata") or {}, pod.get("spec") or {}, pod.get("status") or {}
    job = (meta.get("labels") or {}).get(JOB_LABEL)
    init = next((c for c in spec.get("initContainers") or [] if c["name"] == CONTAINER_INIT), None)
    if not job or init is None or meta.get("deletionTimestamp"):
        return None
    version = next((e.get("value") for e in init.get("env") or [] if e["name"] == VERSION_ENV), "")
    if not version:
        return None
    if _running(status.get("initContainerStatuses"), CONTAINER_INIT):
        stage = "init"
    elif _running(status.get("containerStatuses"), WORKER_CONTAINER):
        stage = "running"
    else:
        stage = "other"
    ip = status.get("podIP")
    return WorkerPod(
        uid=str(meta.get("uid", "")),
        name=str(meta.get("name", "")),
        job=str(job),
        address=f"{ip}:{SYNC_PORT}" if ip else None,
        stage=stage,
        created_version=str(version),
        live_version=(meta.get("annotations") or {}).get(LIVE_ANNOTATION),
    )


def plan_feeds(
    pods: list[WorkerPod],
    desired: dict[str, str],
    available: set[str],
    delivered: dict[str, str] | None = None,
) -> dict[str, list[WorkerPod]]:
    """Version -> the pods to push it to now, each version in one tree.

    ``desired``: job name -> its ``spec.workspace.version``; ``available``: the versions the
    cache holds; ``delivered``: pod uid -> version pushed by this cache process (its mark on
    the pod may not be visible yet). A pod is skipped while it has no address, when it holds
    what it wants, or when the cache does not hold that version (yet: the laptop's push may
    still be under way).
    """
    delivered = delivered or {}
    plan: dict[str, list[WorkerPod]] = {}
    for pod in sorted(pods, key=lambda p: p.name):
        want = pod.wants(desired)
        if want is None or pod.address is None or want not in available:
            continue
        have = delivered.get(pod.uid, pod.live_version)
        if have == want:
            continue
        plan.setdefault(want, []).append(pod)
    return plan
