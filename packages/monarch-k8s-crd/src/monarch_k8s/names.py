"""Names shared by the operator and ``KubernetesJob``: the API group, labels, child objects.

Upstream's operator (meta-pytorch/monarch-kubernetes, ``internal/controller/config.go``) fixes
the worker labels, the ``-svc`` suffix of the headless Service and the ``monarch`` port name;
an upstream MonarchMesh must find its pods where upstream's users look for them.
"""

from __future__ import annotations

import re

__all__ = [
    "ACTIVITY_ANNOTATION",
    "APPLIED_HASH_ANNOTATION",
    "APP_LABEL",
    "EXIT_REASON_ANNOTATION",
    "FIELD_MANAGER",
    "GATEWAY_APP",
    "GATEWAY_PORT",
    "GROUP",
    "KIND",
    "MESH_LABEL",
    "MESH_NAME_RE",
    "OPERATOR_NAMESPACE",
    "PLURAL",
    "PORT_NAME",
    "READY_RESTARTS_ANNOTATION",
    "RESTARTED_WORKER_REPLACED",
    "SYNC_MOUNT",
    "SYNC_PORT",
    "TEMPLATE_HASH_ANNOTATION",
    "TOKEN_KEY",
    "VERSION",
    "WORKER_APP",
    "WORKER_PORT",
    "gateway_name",
    "token_secret_name",
    "worker_labels",
    "worker_service_name",
]

GROUP = "monarch.pytorch.org"
VERSION = "v1alpha1"
KIND = "MonarchMesh"
PLURAL = "monarchmeshes"

#: upstream's CEL rule for a MonarchMesh name (at most 63 characters)
MESH_NAME_RE = re.compile(r"^[a-z][a-z0-9]*$")

APP_LABEL = "app.kubernetes.io/name"
WORKER_APP = "monarch-worker"
GATEWAY_APP = "monarch-gateway"
MESH_LABEL = "monarch.pytorch.org/mesh-name"
PORT_NAME = "monarch"

WORKER_PORT = 26600  # upstream's default spec.port
GATEWAY_PORT = 8765  # monarch-gateway serve's default
SYNC_PORT = 26700  # the monarch-sync agent beside each worker (spec.sync)

TOKEN_KEY = "token"  # key of the gateway token in its Secret
#: SHA-256 of the desired pod template, so webhook rewrites of the live one cause no fights
TEMPLATE_HASH_ANNOTATION = "monarch.pytorch.org/pod-template-hash"
#: RFC 3339 time of the last use; the operator scales an idle mesh to zero and back on a new one
ACTIVITY_ANNOTATION = "monarch.pytorch.org/last-activity"
#: on a worker pod: the worker container's restartCount when the operator saw it Ready; once it
#: dies after that, the pod is deleted for a new IP (``operator/restarts.py``)
READY_RESTARTS_ANNOTATION = "monarch.pytorch.org/worker-ready-restarts"
#: reason of the Events (on the mesh and on the pod) when the operator deletes such a pod; the
#: one on the pod carries the container's termination reason (``OOMKilled``) in this annotation,
#: so ``KubernetesJob`` still says why the worker was lost once the pod is gone
RESTARTED_WORKER_REPLACED = "RestartedWorkerReplaced"
EXIT_REASON_ANNOTATION = "monarch.pytorch.org/exit-reason"


#: SHA-256 of every other desired child (Service, Deployment, RBAC): replaced only when it changes
APPLIED_HASH_ANNOTATION = "monarch.pytorch.org/applied-hash"
FIELD_MANAGER = "monarch-operator"
OPERATOR_NAMESPACE = "monarch-system"  # where the install manifests put the operator
#: the emptyDir a worker (or the gateway) shares with its sync agent sidecar (spec.sync)
SYNC_MOUNT = "/var/lib/monarch-sync"


def worker_labels(mesh: str) -> dict[str, str]:
    """The labels upstream puts on a mesh's pods, StatefulSet and Service (and selects by)."""
    return {MESH_LABEL: mesh, APP_LABEL: WORKER_APP}


def worker_service_name(mesh: str) -> str:
    """The headless Service: pods resolve as ``<mesh>-<i>.<mesh>-svc.<ns>.svc.cluster.local``."""
    return f"{mesh}-svc"


def gateway_name(mesh: str) -> str:
    """The gateway's Deployment and Service."""
    return f"{mesh}-gateway"


def token_secret_name(mesh: str) -> str:
    """The generated Secret holding the gateway's bearer token under :data:`TOKEN_KEY`."""
    return f"{mesh}-gateway-token"
