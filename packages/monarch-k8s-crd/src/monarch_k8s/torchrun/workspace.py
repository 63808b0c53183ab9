"""How the submitted workspace gets into a TorchrunJob's worker pods: the one module to replace
for another mechanism (monarch-sync). Everything else in the operator calls only these four
functions; keep their signatures.

Contract
--------
- ``spec.workspace`` of a TorchrunJob is a free-form object owned by this module (the schema
  preserves unknown fields in it); ``spec.workspace.version`` (a string) is the version the
  submitter uploaded. :func:`submitted_version` reads it.
- :func:`workspace_children` ``(job, opts) -> list[dict]``: objects the operator creates (and,
  through their owner reference, deletes) for the job's workspace, before its Job. Their kinds
  must be among ``reconcile.KINDS`` (Service, PersistentVolumeClaim, Deployment, Pod, Secret,
  ConfigMap) and allowed by the operator's ClusterRole (``manifests/rbac.yaml``). Objects of a
  kind that must never be replaced in place (a PVC) are created once and left alone.
- :func:`add_workspace` ``(job, pod_spec, container, opts) -> None``: edits one worker pod's
  spec in place (volumes, mounts, init containers, sidecars) so that ``container`` (the torchrun
  container, whose ``workingDir`` is already ``job.working_dir``) sees the workspace there.
- :func:`observe_workspace` ``(api_client, job) -> WorkspaceState``: I/O allowed (read only).
  While ``ready`` is False the job's phase is ``Syncing`` and, if its Job does not exist yet,
  the operator does not create it; once True the Job is created. A running job whose workspace
  is not ``ready`` shows ``Syncing`` but keeps its pods (hot reload is this module's business).

Default mechanism (this file): the queue's or job's ``storage.workspace`` PVC ``<job>-workspace``
is mounted at the working dir; whoever fills it (``kubectl cp`` into a worker, a sync agent)
marks the version it holds by annotating the PVC ``torchrun.ai/workspace-version: <version>``.
A job without ``spec.workspace.version`` is ready at once (the code is in the image).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from monarch_k8s.torchrun import names
from monarch_k8s.torchrun.objects import Options, pvc
from monarch_k8s.torchrun.spec import Job

__all__ = [
    "VERSION_ANNOTATION",
    "WorkspaceState",
    "add_workspace",
    "observe_workspace",
    "submitted_version",
    "workspace_children",
]

Obj = dict[str, Any]
VERSION_ANNOTATION = "torchrun.ai/workspace-version"
VOLUME = "workspace"


@dataclass(frozen=True)
class WorkspaceState:
    ready: bool  # the workers' workspace is at the submitted version (or none was submitted)
    version: str | None  # the version the workspace holds now, if known
    message: str  # for the condition: what is awaited


def submitted_version(job: Job) -> str | None:
    version = job.workspace.get("version")
    return str(version) if version else None


def workspace_children(job: Job, opts: Options) -> list[Obj]:
    if not job.storage.workspace.enabled:
        return []
    return [pvc(job, VOLUME, job.storage.workspace)]


def add_workspace(job: Job, pod_spec: Obj, container: Obj, opts: Options) -> None:
    if not job.storage.workspace.enabled:
        return
    claim = {"claimName": names.pvc_name(job.name, VOLUME)}
    pod_spec.setdefault("volumes", []).append({"name": VOLUME, "persistentVolumeClaim": claim})
    mount = {"name": VOLUME, "mountPath": job.working_dir}
    container.setdefault("volumeMounts", []).append(mount)


def observe_workspace(api_client: client.ApiClient, job: Job) -> WorkspaceState:
    wanted = submitted_version(job)
    if wanted is None:
        return WorkspaceState(True, None, "no workspace version submitted")
    name = names.pvc_name(job.name, VOLUME)
    try:
        claim = client.CoreV1Api(api_client).read_namespaced_persistent_volume_claim(
            name, job.namespace
        )
        annotations = (claim.metadata.annotations if claim.metadata else None) or {}
        have = annotations.get(VERSION_ANNOTATION)
    except ApiException as exc:
        if exc.status != 404:
            raise
        have = None
    if have == wanted:
        return WorkspaceState(True, have, f"workspace at version {wanted}")
    return WorkspaceState(
        False, have, f"waiting for the workspace at version {wanted} (it holds {have or 'none'})"
    )
