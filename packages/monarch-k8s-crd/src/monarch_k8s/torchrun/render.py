"""A parsed TorchrunJob in, the objects it needs out: headless Service, PVCs, the etcd for
``etcd-v2`` rendezvous (:mod:`.etcd`), and the indexed ``batch/v1`` Job whose pods run
torchrun. Pure.

Why a ``batch/v1`` Job: it gives ``backoffLimit``, ``activeDeadlineSeconds``, indexed pods with
stable hostnames (``<job>-<rank>``), and ``spec.suspend`` that may be flipped at any time (its
controller deletes the pods, and recreates them on resume); Kueue admits it natively, and KAI's
pod-grouper reads ``kai.scheduler/batch-min-member`` on it. TTL is not the Job's: the operator
deletes the TorchrunJob itself (:mod:`.reconcile`), so nothing is left to be recreated.
"""

from __future__ import annotations

import json
import shlex
from fractions import Fraction
from typing import Any

from monarch_k8s.torchrun import names, workspace
from monarch_k8s.torchrun.etcd import render_etcd, runs_etcd, wait_for_etcd
from monarch_k8s.torchrun.objects import Options, job_labels, metadata, pvc, scale_quantity
from monarch_k8s.torchrun.spec import Job

__all__ = ["render_children", "render_job", "rendezvous_endpoint", "torchrun_argv"]

Obj = dict[str, Any]


def rendezvous_endpoint(job: Job) -> str:
    """Where torchrun meets: worker 0 through the headless Service (c10d hosts its store
    there, static uses it as master), or the etcd for etcd-v2."""
    if job.rdzv_endpoint:
        return job.rdzv_endpoint
    if job.rdzv_backend == "etcd-v2":
        return f"{names.etcd_host(job.name, job.namespace)}:{names.ETCD_PORT}"
    return f"{names.worker_host(job.name, job.namespace)}:{job.port}"


def torchrun_argv(job: Job) -> list[str]:
    """``torchrun`` and its flags; the user's command runs under ``/bin/sh -c`` per process
    (``--no-python``), so it may be any command line (``python train.py --epochs 3``)."""
    shape = job.layout
    argv = ["torchrun", f"--nproc-per-node={shape.procs_per_node}"]
    if shape.standalone:
        argv += ["--standalone", "--nnodes=1"]
    else:
        nnodes = f"{shape.min_nodes}:{shape.nodes}" if shape.elastic else str(shape.nodes)
        argv += [f"--nnodes={nnodes}", "--node-rank=$(JOB_COMPLETION_INDEX)"]
        argv += [
            f"--rdzv-backend={job.rdzv_backend}",
            f"--rdzv-endpoint={rendezvous_endpoint(job)}",
        ]
        argv += [f"--rdzv-id={job.rdzv_id}"]
        if shape.elastic:
            argv += [f"--max-restarts={job.backoff_limit}"]
    return [*argv, "--no-python", "/bin/sh", "-c", job.command]


def container_command(job: Job) -> list[str]:
    """torchrun, after the job's etcd answers (each start: an in-place restart too) and the
    setup command."""
    steps = [wait_for_etcd(job) if runs_etcd(job) else "", job.setup_command or ""]
    run = f"exec {shlex.join(torchrun_argv(job))}"
    return ["/bin/sh", "-c", " && ".join([*(s for s in steps if s), run])]


def resources(job: Job) -> Obj:
    """One pod per node: its GPUs, and the node's CPUs and memory in proportion to them
    (all of the node's on a CPU-only queue)."""
    node, shape = job.node, job.layout
    share = Fraction(shape.gpus_per_node, node.gpus) if node.gpus else Fraction(1)
    requests: Obj = {}
    if node.cpus is not None:
        requests["cpu"] = scale_quantity(node.cpus, share, memory=False)
    if node.memory is not None:
        requests["memory"] = scale_quantity(node.memory, share, memory=True)
    limits: Obj = {}
    if shape.gpus_per_node:
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = str(shape.gpus_per_node)
    if "memory" in requests:
        limits["memory"] = requests["memory"]
    return {"requests": requests, "limits": limits} if requests else {}


def env(job: Job) -> list[Obj]:
    ours = {
        "TORCHRUN_JOB_NAME": job.name,
        "TORCHRUN_BACKEND": job.backend,  # the script's init_process_group backend
        "PYTHONUNBUFFERED": "1",
    }
    if job.storage.checkpoints.enabled:
        ours["CHECKPOINT_DIR"] = names.CHECKPOINTS_MOUNT
    if job.storage.datasets.enabled:
        ours["DATASETS_DIR"] = names.DATASETS_MOUNT
    given = [*(job.pod_defaults.get("env") or []), *job.env]
    taken = {e["name"] for e in given}
    return [{"name": k, "value": v} for k, v in ours.items() if k not in taken] + given


def worker_pod_template(job: Job, opts: Options) -> Obj:
    defaults, sched = job.pod_defaults, job.scheduling
    container: Obj = {
        "name": names.WORKER_CONTAINER,
        "image": job.image,
        "command": container_command(job),
        "workingDir": job.working_dir,
        "env": env(job),
        "ports": [{"name": "rdzv", "containerPort": job.port}],
    }
    if resources(job):
        container["resources"] = resources(job)
    if defaults.get("securityContext"):
        container["securityContext"] = defaults["securityContext"]
    if defaults.get("imagePullPolicy"):
        container["imagePullPolicy"] = defaults["imagePullPolicy"]
    spec: Obj = {
        "restartPolicy": job.restart_policy,
        "subdomain": names.service_name(job.name),
        "containers": [container],
    }
    for ours, theirs in (("securityContext", "podSecurityContext"),
                         ("serviceAccountName", "serviceAccountName")):  # fmt: skip
        if defaults.get(theirs):
            spec[ours] = defaults[theirs]
    if sched.get("scheduler"):
        spec["schedulerName"] = sched["scheduler"]
    for key in ("priorityClassName", "nodeSelector", "affinity", "tolerations"):
        if sched.get(key):
            spec[key] = sched[key]
    mounts = container.setdefault("volumeMounts", [])
    volumes = spec.setdefault("volumes", [])
    for volume, path in (("datasets", names.DATASETS_MOUNT),
                         ("checkpoints", names.CHECKPOINTS_MOUNT)):  # fmt: skip
        if getattr(job.storage, volume).enabled:
            claim = {"claimName": names.pvc_name(job.name, volume)}
            volumes.append({"name": volume, "persistentVolumeClaim": claim})
            mounts.append({"name": volume, "mountPath": path})
    if job.storage.shm_size_per_gpu:
        procs = job.layout.procs_per_node
        size = scale_quantity(job.storage.shm_size_per_gpu, procs, memory=True)
        volumes.append({"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": size}})
        mounts.append({"name": "shm", "mountPath": names.SHM_MOUNT})
    workspace.add_workspace(job, spec, container, opts)
    labels = {**(defaults.get("labels") or {}), **job.labels, **pod_labels(job)}
    annotations = {**(defaults.get("annotations") or {}), **job.annotations}
    return {"metadata": {"labels": labels, "annotations": annotations}, "spec": spec}


def pod_labels(job: Job) -> dict[str, str]:
    labels = {**job_labels(job), names.QUEUE_LABEL: job.queue_name}
    if job.kai_queue:
        labels[names.KAI_QUEUE_LABEL] = job.kai_queue
    if job.node.gpu_type:
        labels["torchrun.ai/gpu-type"] = job.node.gpu_type
    return labels


def render_job(job: Job, opts: Options, *, suspend: bool) -> Obj:
    """The indexed Job: one pod per node, all of them or none (gang) under KAI and Kueue."""
    shape = job.layout
    labels = pod_labels(job)
    if job.kueue_queue:
        labels[names.KUEUE_QUEUE_LABEL] = job.kueue_queue
    meta = metadata(job, job.name, labels)
    # KAI: the pod-group needs this many pods at once (a batch Job is otherwise minMember 1)
    meta["annotations"] = {
        names.KAI_MIN_MEMBER: str(shape.min_nodes),
        names.QUEUE_SNAPSHOT_ANNOTATION: json.dumps(job.queue_spec, sort_keys=True),
    }
    spec: Obj = {
        "completionMode": "Indexed",
        "completions": shape.nodes,
        "parallelism": shape.nodes,
        "backoffLimit": job.backoff_limit,
        "suspend": suspend,
        "template": worker_pod_template(job, opts),
    }
    if job.deadline_s:
        spec["activeDeadlineSeconds"] = job.deadline_s
    if shape.elastic:
        spec["successPolicy"] = {"rules": [{"succeededCount": shape.min_nodes}]}
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": spec}


def render_service(job: Job) -> Obj:
    """Headless, publishing not-ready pods: workers resolve each other while starting."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(job, names.service_name(job.name), job_labels(job)),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": job_labels(job),
            "ports": [{"name": "rdzv", "port": job.port}],
        },
    }


def render_children(job: Job, opts: Options) -> list[Obj]:
    """Every object the job needs before its Job, in creation order."""
    children: list[Obj] = [render_service(job)]
    children += workspace.workspace_children(job, opts)
    for volume in ("datasets", "checkpoints"):
        if getattr(job.storage, volume).enabled:
            children.append(pvc(job, volume, getattr(job.storage, volume)))
    if runs_etcd(job):
        children += render_etcd(job, opts)
    return children
