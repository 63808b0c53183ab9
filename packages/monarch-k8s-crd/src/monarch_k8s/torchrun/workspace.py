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

Mechanism: monarch-sync (see :mod:`.cache` for the whole design)
-----------------------------------------------------------------
- :func:`workspace_children`: the job's ``<job>-workspace`` claim when ``storage.workspace`` is
  enabled, and the namespace's workspace cache (Deployment, PVC, token Secret, its
  ServiceAccount and Role), shared by every job of the namespace and owned by none (it keeps
  versions across jobs, so a resubmit sends only what changed).
- :func:`add_workspace`: the ``workspace-sync`` init container (a monarch-sync agent that exits
  once its tree is at ``spec.workspace.version``) on the workspace volume (the job's PVC, one
  folder per pod, or an ``emptyDir``), mounted at the working dir; the trainer runs in the live
  tree ``<working dir>/current`` (also ``$TORCHRUN_WORKSPACE``), wrapped so an agent on the same
  folder serves hot reloads while it runs (images without ``monarch_k8s`` run unwrapped).
- :func:`observe_workspace`: ready when the job has no worker pods yet (so its Job is created
  at once and the pods start while the laptop still uploads: they wait in their init
  container) or when every worker pod holds the version (``torchrun.ai/workspace-live``, set by
  the cache after each push); ``Syncing`` in between, and again during a hot reload.

**What a running worker sees on hot reload** (``kubectl torchrun sync JOB``): the symlink
``$TORCHRUN_WORKSPACE`` (``<working dir>/current``) flips atomically to the new tree; a path
opened through it reads the new version at once, and ``os.readlink`` on it names the version
(``versions/<root hash>``): that change is the signal to watch. Processes keep their working
directory (the tree they started in) until they restart: torchrun's restarts (a failed
worker, ``--max-restarts``), a pod restart, or suspend/resume pick the new tree up. The two
newest versions are kept, so an old working directory stays readable for one more reload.
A job without ``spec.workspace.version`` gets none of this: the code is in the image (and an
enabled workspace claim is mounted at the working dir as scratch space).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from kubernetes import client

from monarch_k8s.torchrun import names
from monarch_k8s.torchrun.cache import (
    AGENT,
    CONTAINER_INIT,
    POD_IP_ENV,
    RUN_MODULE,
    SYNC_PORT,
    VERSION_ENV,
    render_cache,
    render_token_secret,
    token_env,
    worker_pod,
)
from monarch_k8s.torchrun.objects import Options, pvc
from monarch_k8s.torchrun.spec import Job

__all__ = [
    "WorkspaceState",
    "add_workspace",
    "observe_workspace",
    "submitted_version",
    "workspace_children",
]

Obj = dict[str, Any]
VOLUME = "workspace"
POD_NAME_ENV = {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}
#: the trainer's command, run under the reload agent when the image has it (else as is);
#: ``$1``/``$2`` are the listen address and root, the rest the original command
WRAPPER = (
    'l=$1 r=$2; shift 2; if python -c "import monarch_k8s.torchrun.agent" 2>/dev/null; '
    f'then exec python -m {RUN_MODULE} run --listen "$l" --root "$r" -- "$@"; fi; exec "$@"'
)


@dataclass(frozen=True)
class WorkspaceState:
    ready: bool  # the workers' workspace is at the submitted version (or none was submitted)
    version: str | None  # the version the workspace holds now, if known
    message: str  # for the condition: what is awaited


def submitted_version(job: Job) -> str | None:
    version = job.workspace.get("version")
    return str(version) if version else None


def _listen_host(opts: Options) -> str:
    return "$(POD_IP)" if opts.listen_host == "podIP" else opts.listen_host


def workspace_children(job: Job, opts: Options) -> list[Obj]:
    """The namespace's cache, not owned by the job. The token Secret is created once (its
    random token is only used if none exists)."""
    claim = [pvc(job, VOLUME, job.storage.workspace)] if job.storage.workspace.enabled else []
    if submitted_version(job) is None:
        return claim
    secret = render_token_secret(job.namespace, secrets.token_hex(24))
    cache = render_cache(job.namespace, image=opts.image, listen_host=_listen_host(opts))
    return [*claim, secret, *cache]


def _with_env(container: Obj, *env: Obj) -> None:
    ours = {e["name"] for e in env}
    container["env"] = [*env, *(e for e in container.get("env") or [] if e["name"] not in ours)]


def add_workspace(job: Job, pod_spec: Obj, container: Obj, opts: Options) -> None:
    version = submitted_version(job)
    claim = {"claimName": names.pvc_name(job.name, VOLUME)}
    if version is None:  # the code is in the image; the claim, if any, is scratch space
        if job.storage.workspace.enabled:
            pod_spec.setdefault("volumes", []).append(
                {"name": VOLUME, "persistentVolumeClaim": claim}
            )
            container.setdefault("volumeMounts", []).append(
                {"name": VOLUME, "mountPath": job.working_dir}
            )
        return
    root = job.working_dir
    live = f"{root}/current"
    mount: Obj = {"name": VOLUME, "mountPath": root}
    if job.storage.workspace.enabled:  # the job's claim: one folder per pod
        pod_spec.setdefault("volumes", []).append({"name": VOLUME, "persistentVolumeClaim": claim})
        mount["subPathExpr"] = "$(POD_NAME)"
    else:
        pod_spec.setdefault("volumes", []).append({"name": VOLUME, "emptyDir": {}})
    listen = f"{_listen_host(opts)}:{SYNC_PORT}"
    env = [POD_IP_ENV, POD_NAME_ENV, token_env()]
    init = {
        "name": CONTAINER_INIT,
        "image": opts.image,
        "command": [*AGENT, "init", "--listen", listen, "--root", root, "--version", version],
        "env": [*env, {"name": VERSION_ENV, "value": version}],
        "volumeMounts": [dict(mount)],
    }
    pod_spec["initContainers"] = [init, *(pod_spec.get("initContainers") or [])]
    _with_env(container, *env, {"name": "TORCHRUN_WORKSPACE", "value": live})
    container.setdefault("volumeMounts", []).append(dict(mount))
    container["workingDir"] = live
    command = [*(container.get("command") or []), *(container.get("args") or [])]
    if command:
        container["command"] = ["sh", "-c", WRAPPER, "sh", listen, root, *command]
        container.pop("args", None)


def observe_workspace(api_client: client.ApiClient, job: Job) -> WorkspaceState:
    wanted = submitted_version(job)
    if wanted is None:
        return WorkspaceState(True, None, "no workspace version submitted")
    items = (
        client.CoreV1Api(api_client)
        .list_namespaced_pod(job.namespace, label_selector=f"{names.JOB_LABEL}={job.name}")
        .items
    )
    pods = [worker_pod(api_client.sanitize_for_serialization(p)) for p in items]
    workers = [p for p in pods if p is not None]
    if not workers:
        return WorkspaceState(True, None, f"workers will wait for workspace {wanted[:12]}")
    holding = [p for p in workers if p.live_version == wanted]
    message = f"{len(holding)}/{len(workers)} workers hold workspace {wanted[:12]}"
    return WorkspaceState(len(holding) == len(workers), wanted if holding else None, message)
