"""TorchrunJob and TorchrunQueue ``status`` from what the cluster reports. Pure: ``now`` and
every observation are arguments.

Job phases, first match wins:

============  ===================================================================
Failed        the spec cannot run (reason says why), or the Job failed (backoff
              exhausted: ``BackoffLimitExceeded``; ``DeadlineExceeded``)
Succeeded     the Job completed
Suspended     ``spec.suspend`` is true (the Job is suspended: no pods)
Syncing       the workspace is not at the submitted version (:mod:`.workspace`)
Pending       the Job is not created yet
Queued        the Job waits: suspended by Kueue, fewer than ``minNodes`` workers ready,
              or the job's etcd (``etcd-v2``) not serving yet (``EtcdStarting``) or
              failing (``EtcdFailing``, a Warning: the workers would wait for it forever)
Running       at least ``minNodes`` workers ready
============  ===================================================================

``Succeeded`` and ``Failed`` are final: later observations (the Job gone) do not change them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from monarch_k8s.operator.status import condition
from monarch_k8s.torchrun.etcd import EtcdState
from monarch_k8s.torchrun.spec import Job, JobSpecError, parse_time

__all__ = [
    "FINAL",
    "PHASES",
    "JobObserved",
    "job_status",
    "queue_status",
    "spec_error_status",
    "ttl_expired",
]

Obj = dict[str, Any]
PHASES = ("Pending", "Syncing", "Queued", "Running", "Succeeded", "Failed", "Suspended")
FINAL = ("Succeeded", "Failed")


@dataclass(frozen=True)
class JobObserved:
    """The job's batch/v1 Job (None: absent), workspace state, and the state of the etcd the
    operator runs for it (None: it runs none)."""

    batch_job: Obj | None = None
    workspace_ready: bool = True
    workspace_version: str | None = None
    workspace_message: str = ""
    etcd: EtcdState | None = None
    extra: Obj = field(default_factory=dict)


def stamp(now: datetime) -> str:
    return now.strftime("%Y-%m-%dT%H:%M:%SZ")


def _job_condition(batch: Obj, kind: str) -> Obj | None:
    for cond in (batch.get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind and cond.get("status") == "True":
            return dict(cond)
    return None


def job_status(job: Job, seen: JobObserved, *, now: datetime) -> Obj:
    """The job's next ``status`` (phase, reason, message, conditions, workers, times)."""
    previous = job.status
    old_conditions = previous.get("conditions") or []
    if previous.get("phase") in FINAL:  # final: keep, refresh nothing but generation
        return {**previous, "observedGeneration": job.generation}
    batch = seen.batch_job
    st = (batch or {}).get("status") or {}
    shape = job.layout
    workers = {
        "desired": 0 if job.suspend else shape.nodes,
        "active": int(st.get("active", 0)),
        "ready": int(st.get("ready", 0)),
        "succeeded": int(st.get("succeeded", 0)),
        "failed": int(st.get("failed", 0)),
    }
    complete = _job_condition(batch, "Complete") if batch else None
    failed = _job_condition(batch, "Failed") if batch else None
    if complete is not None:
        phase, reason, message = "Succeeded", "Completed", "all workers finished"
    elif failed is not None:
        phase, reason = "Failed", str(failed.get("reason") or "JobFailed")
        message = str(failed.get("message") or "the Job failed")
        if reason == "BackoffLimitExceeded":
            message = (
                f"workers failed {workers['failed']} times, more than spec.backoffLimit="
                f"{job.backoff_limit}: see kubectl logs -l torchrun-job-name={job.name}"
            )
    elif job.suspend:
        phase, reason, message = "Suspended", "Suspended", "spec.suspend is true: no workers run"
    elif not seen.workspace_ready:
        phase, reason, message = "Syncing", "WorkspaceSyncing", seen.workspace_message
    elif batch is None:
        phase, reason, message = "Pending", "Creating", "creating the Job and its storage"
    elif (batch.get("spec") or {}).get("suspend"):
        phase, reason, message = "Queued", "AwaitingAdmission", "the Job waits for admission"
    elif (
        seen.etcd is not None
        and not seen.etcd.ready
        and (seen.etcd.failing or workers["ready"] >= shape.min_nodes)
    ):  # ready workers without their etcd only wait: they do not run yet
        phase, message = "Queued", seen.etcd.message
        reason = "EtcdFailing" if seen.etcd.failing else "EtcdStarting"
    elif workers["ready"] >= shape.min_nodes:
        phase, reason = "Running", "WorkersReady"
        message = f"{workers['ready']}/{shape.nodes} workers ready"
    else:
        phase, reason = "Queued", "WorkersPending"
        message = f"{workers['ready']}/{shape.nodes} workers ready, {shape.min_nodes} needed"
    status: Obj = {
        "phase": phase,
        "reason": reason,
        "message": message,
        "observedGeneration": job.generation,
        "queue": job.queue_name,
        "numNodes": shape.nodes,
        "minNodes": shape.min_nodes,
        "procsPerNode": shape.procs_per_node,
        "workers": workers,
        "workersReady": f"{workers['ready']}/{workers['desired']}",
    }
    if seen.workspace_version:
        status["workspaceVersion"] = seen.workspace_version
    start = previous.get("startTime") or (stamp(now) if phase == "Running" else None)
    if start:
        status["startTime"] = start
    if phase in FINAL:
        done = (complete or {}).get("lastTransitionTime") or (failed or {}).get(
            "lastTransitionTime"
        )
        status["completionTime"] = st.get("completionTime") or done or stamp(now)
    status["conditions"] = [
        condition("Valid", True, "SpecValid", "the spec can run", now, old_conditions),
        condition(
            "WorkspaceReady",
            seen.workspace_ready,
            "Synced" if seen.workspace_ready else "WorkspaceSyncing",
            seen.workspace_message or "no workspace version submitted",
            now,
            old_conditions,
        ),
        condition("Running", phase == "Running", reason, message, now, old_conditions),
        condition("Suspended", phase == "Suspended", reason, message, now, old_conditions),
        condition("Complete", phase == "Succeeded", reason, message, now, old_conditions),
        condition("Failed", phase == "Failed", reason, message, now, old_conditions),
    ]
    if seen.etcd is not None:
        etcd_reason = (
            "EtcdReady"
            if seen.etcd.ready
            else "EtcdFailing"
            if seen.etcd.failing
            else "EtcdStarting"
        )
        status["conditions"].insert(
            2,
            condition(
                "RendezvousReady",
                seen.etcd.ready,
                etcd_reason,
                seen.etcd.message,
                now,
                old_conditions,
            ),
        )
    return status


def spec_error_status(body: Obj, error: JobSpecError, *, now: datetime) -> Obj:
    """``Failed`` with the error's reason; final, as a spec the API accepted cannot change
    (the schema makes the fields the operator reads immutable)."""
    previous = body.get("status") or {}
    old = previous.get("conditions") or []
    meta = body.get("metadata") or {}
    return {
        "phase": "Failed",
        "reason": error.reason,
        "message": str(error),
        "observedGeneration": int(meta.get("generation", 0)),
        "queue": str((body.get("spec") or {}).get("jobQueue", "")),
        "completionTime": previous.get("completionTime") or stamp(now),
        "conditions": [
            condition("Valid", False, error.reason, str(error), now, old),
            condition("Failed", True, error.reason, str(error), now, old),
        ],
    }


def ttl_expired(body: Obj, now: datetime) -> bool:
    """A finished job whose ``ttlSecondsAfterFinished`` has passed since it finished."""
    ttl = (body.get("spec") or {}).get("ttlSecondsAfterFinished")
    status = body.get("status") or {}
    if ttl is None or status.get("phase") not in FINAL or not status.get("completionTime"):
        return False
    return (now - parse_time(status["completionTime"])).total_seconds() >= ttl


def queue_status(
    body: Obj,
    *,
    problem: tuple[str, str] | None,
    kai: tuple[bool, str, str],
    jobs: int,
    active_jobs: int,
    now: datetime,
) -> Obj:
    """``problem``: (reason, message) when the spec is not valid; ``kai``: (ok, reason,
    message) of the KAI Queue; ``jobs``: TorchrunJobs naming this queue (``active_jobs`` of
    them not finished)."""
    old = (body.get("status") or {}).get("conditions") or []
    valid = problem is None
    v_reason, v_message = problem or ("SpecValid", "jobs may use this queue")
    kai_ok, kai_reason, kai_message = kai
    ready = valid and kai_ok
    r_reason = kai_reason if valid else v_reason
    r_message = kai_message if valid else v_message
    return {
        "observedGeneration": int((body.get("metadata") or {}).get("generation", 0)),
        "jobs": jobs,
        "activeJobs": active_jobs,
        "conditions": [
            condition("Valid", valid, v_reason, v_message, now, old),
            condition("Ready", ready, r_reason, r_message, now, old),
        ],
    }
