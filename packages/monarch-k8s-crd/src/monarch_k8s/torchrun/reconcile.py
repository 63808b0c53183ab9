"""The I/O around :mod:`.render` and :mod:`.status`: read a TorchrunJob's queue and children,
create what is missing, flip the Job's ``suspend``, write ``status`` and Events, delete a job
whose TTL has passed; and keep each TorchrunQueue's KAI Queue and status. Level-triggered as
the MonarchMesh reconciler: every pass looks only at what the cluster holds now, so a restart
mid-run converges.

What is never changed after creation: PVCs (sizes are immutable in practice) and the Job's pod
template (immutable in ``batch/v1``; the schema makes the job's fields immutable too). Only the
Job's ``suspend`` follows the spec, at any time.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from monarch_k8s.operator.kube import KubeObjects
from monarch_k8s.torchrun import names, workspace
from monarch_k8s.torchrun.etcd import EtcdState, etcd_state, render_etcd, runs_etcd
from monarch_k8s.torchrun.objects import Options, job_labels
from monarch_k8s.torchrun.render import render_children, render_job
from monarch_k8s.torchrun.spec import (
    Job,
    JobSpecError,
    Queue,
    parse_job,
    parse_queue,
    queue_problem,
)
from monarch_k8s.torchrun.status import (
    FINAL,
    JobObserved,
    job_status,
    queue_status,
    spec_error_status,
    ttl_expired,
)

__all__ = ["TorchrunReconciler"]

logger = logging.getLogger("monarch_k8s.operator.torchrun")
Obj = dict[str, Any]

KINDS = {
    "Service": "v1",
    "PersistentVolumeClaim": "v1",
    "Pod": "v1",
    "Secret": "v1",
    "ConfigMap": "v1",
    "Deployment": "apps/v1",
    "Job": "batch/v1",
    # the namespace's workspace cache (workspace.py) runs under its own ServiceAccount
    "ServiceAccount": "v1",
    "Role": "rbac.authorization.k8s.io/v1",
    "RoleBinding": "rbac.authorization.k8s.io/v1",
}


class TorchrunReconciler(KubeObjects):
    KINDS = KINDS
    CREATE_ONCE = frozenset(("PersistentVolumeClaim", "Secret", "Job", "Pod"))
    GROUP, VERSION, KIND = names.GROUP, names.VERSION, names.JOB_KIND
    COMPONENT = "torchrun-operator"

    def __init__(self, api_client: client.ApiClient, options: Options | None = None):
        super().__init__(api_client)
        self.options = options or Options()
        self.ext = client.ApiextensionsV1Api(api_client)

    def spec_error(self, child: str, message: str) -> Exception:
        return JobSpecError("Refused", f"{child}: {message}")

    # -- TorchrunJob ----------------------------------------------------------------------
    def reconcile_job(self, body: Obj, now: datetime | None = None) -> Obj | None:
        """One pass over one job (:meth:`~.kube.KubeObjects.one_pass`)."""
        with self.one_pass(names.JOB_PLURAL, body) as current:
            if current is None:
                return None
            return self._reconcile_job(current, now or datetime.now(UTC))

    def _reconcile_job(self, body: Obj, now: datetime) -> Obj | None:
        meta, status = body["metadata"], body.get("status") or {}
        if status.get("phase") in FINAL:
            if ttl_expired(body, now):
                self.delete_job(body)
                return None
            if status.get("observedGeneration") == meta.get("generation"):
                return status
        try:
            job = parse_job(body, self.job_queue(body))
            if status.get("phase") in FINAL:  # a new generation of a finished job: report only
                return self.write_job_status(body, {**status, "observedGeneration": job.generation})
            for child in render_children(job, self.options):
                self.apply(body, child)
            seen = self.observe_job(job)
            if seen.batch_job is None and seen.workspace_ready:
                self.apply(body, render_job(job, self.options, suspend=self.suspend_at_create(job)))
                seen = self.observe_job(job)
            elif seen.batch_job is not None:
                self.follow_suspend(body, job, seen.batch_job)
            status = job_status(job, seen, now=now)
            if status["phase"] in FINAL and runs_etcd(job):  # before the status: a retry sees it
                self.delete_etcd(body, job)
        except JobSpecError as exc:
            return self.write_job_status(body, spec_error_status(body, exc, now=now))
        return self.write_job_status(body, status)

    def owned_batch_job(self, namespace: str, name: str, uid: str) -> Obj | None:
        """The job's Job; None also for a Job of that name it does not own (one of a deleted
        job of the same name, not yet collected: creating ours waits for it to go)."""
        batch = self.read("Job", namespace, name)
        owners = ((batch or {}).get("metadata") or {}).get("ownerReferences") or []
        return batch if any(o.get("uid") == uid for o in owners) else None

    def job_queue(self, body: Obj) -> Queue | None:
        """The job's queue as its Job was created with it (the snapshot on the Job), else as
        it is now; None when there is neither."""
        meta = body["metadata"]
        name = str((body.get("spec") or {}).get("jobQueue", ""))
        batch = self.owned_batch_job(meta["namespace"], meta["name"], str(meta.get("uid", "")))
        snapshot = (
            ((batch or {}).get("metadata") or {})
            .get("annotations", {})
            .get(names.QUEUE_SNAPSHOT_ANNOTATION)
        )
        if snapshot:
            return parse_queue(
                {"metadata": {"name": name, "namespace": meta["namespace"]},
                 "spec": json.loads(snapshot)}
            )  # fmt: skip
        found = self.get_queue(meta["namespace"], name) if name else None
        return parse_queue(found) if found else None

    def suspend_at_create(self, job: Job) -> bool:
        # under Kueue the Job starts suspended and Kueue unsuspends it when admitted whole
        return job.suspend or bool(job.kueue_queue)

    def follow_suspend(self, body: Obj, job: Job, batch: Obj) -> None:
        """Suspend or resume the Job as ``spec.suspend`` says, at any time. Under Kueue a
        resume is Kueue's to make (it admits the job again)."""
        spec, st = batch.get("spec") or {}, batch.get("status") or {}
        if any(c.get("type") in ("Complete", "Failed") and c.get("status") == "True"
               for c in st.get("conditions") or []):  # fmt: skip
            return
        live = bool(spec.get("suspend"))
        if job.suspend == live or (not job.suspend and job.kueue_queue):
            return
        self.merge_patch("Job", job.namespace, job.name, {"spec": {"suspend": job.suspend}})
        if job.suspend:
            self.event(body, "Normal", "Suspend", "spec.suspend: stopping the workers")
        else:
            self.event(body, "Normal", "Resume", "spec.suspend cleared: recreating the workers")

    def observe_job(self, job: Job) -> JobObserved:
        state = workspace.observe_workspace(self.api_client, job)
        return JobObserved(
            batch_job=self.owned_batch_job(job.namespace, job.name, job.uid),
            workspace_ready=state.ready,
            workspace_version=state.version,
            workspace_message=state.message,
            etcd=self.observe_etcd(job) if runs_etcd(job) else None,
        )

    def observe_etcd(self, job: Job) -> EtcdState:
        selector = ",".join(f"{k}={v}" for k, v in job_labels(job, "etcd").items())
        pods = self.core.list_namespaced_pod(job.namespace, label_selector=selector).items
        return etcd_state([self.api_client.sanitize_for_serialization(p) for p in pods])

    def write_job_status(self, body: Obj, status: Obj) -> Obj:
        old = body.get("status") or {}
        if any(old.get(k) != v for k, v in status.items()):
            self.patch_status(body, names.JOB_PLURAL, status)
            reason = status.get("reason")
            failing = reason == "EtcdFailing" and old.get("reason") != reason  # newly: warn once
            if old.get("phase") != status.get("phase") or failing:
                kind = "Warning" if status["phase"] == "Failed" or failing else "Normal"
                self.event(body, kind, status.get("reason") or status["phase"],
                           f"{status['phase']}: {status.get('message', '')}")  # fmt: skip
        return status

    def delete_etcd(self, body: Obj, job: Job) -> None:
        """A finished job's etcd goes at once (no worker will rendezvous again), not with the
        job: a job kept for its logs and status holds no running etcd."""
        for obj in render_etcd(job, self.options):
            kind, name = obj["kind"], obj["metadata"]["name"]
            if self.read(kind, job.namespace, name) is None:
                continue
            self.delete(kind, job.namespace, name)
            self.event(body, "Normal", "Delete", f"the job finished: deleted {kind} {name}")

    def delete_job(self, body: Obj) -> None:
        """TTL: the TorchrunJob goes, and its children with it (owner references); nothing is
        left that a later pass could recreate from."""
        meta = body["metadata"]
        ttl = body["spec"].get("ttlSecondsAfterFinished")
        self.event(body, "Normal", "TTLExpired", f"finished more than {ttl}s ago: deleting")
        try:
            self.custom.delete_namespaced_custom_object(
                names.GROUP, names.VERSION, meta["namespace"], names.JOB_PLURAL, meta["name"],
                body=client.V1DeleteOptions(
                    propagation_policy="Background",
                    preconditions=client.V1Preconditions(uid=meta.get("uid")),
                ),
            )  # fmt: skip
        except ApiException as exc:
            if exc.status not in (404, 409):
                raise

    # -- TorchrunQueue --------------------------------------------------------------------
    def get_queue(self, namespace: str, name: str) -> Obj | None:
        return self.get_custom(names.QUEUE_PLURAL, namespace, name)

    def kai_installed(self) -> bool:
        try:
            self.ext.read_custom_resource_definition(f"{names.KAI_PLURAL}.{names.KAI_GROUP}")
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def ensure_kai_queue(self, queue: Queue) -> tuple[bool, str, str]:
        if not queue.kai_queue:
            return True, "Ready", "no KAI queue asked for (spec.kaiQueue)"
        if not self.kai_installed():
            return (
                False,
                "KaiSchedulerNotInstalled",
                f"spec.kaiQueue {queue.kai_queue!r}: the KAI scheduler's Queue CRD "
                f"({names.KAI_PLURAL}.{names.KAI_GROUP}) is not installed; install KAI or "
                "drop spec.kaiQueue",
            )
        unlimited = {"quota": -1, "limit": -1, "overQuotaWeight": 1}
        kai_spec: Obj = {"resources": {k: dict(unlimited) for k in ("cpu", "gpu", "memory")}}
        if queue.parent_kai_queue:
            kai_spec["parentQueue"] = queue.parent_kai_queue
        body = {
            "apiVersion": f"{names.KAI_GROUP}/{names.KAI_VERSION}",
            "kind": names.KAI_KIND,
            "metadata": {
                "name": queue.kai_queue,
                "labels": {names.KAI_OWNER_LABEL: names.kai_owner(queue.namespace, queue.name)},
            },
            "spec": kai_spec,
        }
        kai = (names.KAI_GROUP, names.KAI_VERSION, names.KAI_PLURAL)
        try:
            live: Obj = self.custom.get_cluster_custom_object(*kai, queue.kai_queue)  # type: ignore[assignment]
        except ApiException as exc:
            if exc.status != 404:
                raise
            try:
                self.custom.create_cluster_custom_object(*kai, body)
            except ApiException as err:
                if err.status != 409:
                    raise
            return True, "Ready", f"KAI queue {queue.kai_queue} created"
        owner = ((live.get("metadata") or {}).get("labels") or {}).get(names.KAI_OWNER_LABEL)
        if owner != names.kai_owner(queue.namespace, queue.name):
            return True, "Ready", f"KAI queue {queue.kai_queue} exists (not ours: left as it is)"
        if any((live.get("spec") or {}).get(k) != v for k, v in kai_spec.items()):
            self.custom.patch_cluster_custom_object(*kai, queue.kai_queue, {"spec": kai_spec})
        return True, "Ready", f"KAI queue {queue.kai_queue} exists"

    def reconcile_queue(self, body: Obj, now: datetime | None = None) -> Obj:
        now = now or datetime.now(UTC)
        queue = parse_queue(body)
        problem = queue_problem(queue)
        kai = self.ensure_kai_queue(queue) if problem is None else (False, "Invalid", "")
        jobs: Obj = self.custom.list_namespaced_custom_object(  # type: ignore[assignment]
            names.GROUP, names.VERSION, queue.namespace, names.JOB_PLURAL
        )
        using = [
            j for j in jobs.get("items", []) if (j.get("spec") or {}).get("jobQueue") == queue.name
        ]
        active = [j for j in using if (j.get("status") or {}).get("phase") not in FINAL]
        status = queue_status(
            body, problem=problem, kai=kai, jobs=len(using), active_jobs=len(active), now=now
        )
        old = body.get("status") or {}
        if any(old.get(k) != v for k, v in status.items()):
            self.patch_status(body, names.QUEUE_PLURAL, status)
            old_ready: Obj = next(
                (c for c in old.get("conditions") or [] if c["type"] == "Ready"), {}
            )
            new_ready = status["conditions"][1]
            if old_ready.get("reason") != new_ready["reason"]:
                kind = "Normal" if new_ready["status"] == "True" else "Warning"
                self.event(body, kind, new_ready["reason"], new_ready["message"])
        return status

    def prune_kai_queues(self) -> None:
        """KAI Queues (cluster-scoped, so not garbage-collected) whose TorchrunQueue is gone."""
        if not self.kai_installed():
            return
        listed: Obj = self.custom.list_cluster_custom_object(  # type: ignore[assignment]
            names.KAI_GROUP,
            names.KAI_VERSION,
            names.KAI_PLURAL,
            label_selector=names.KAI_OWNER_LABEL,
        )
        for kai in listed.get("items", []):
            owner = kai["metadata"]["labels"][names.KAI_OWNER_LABEL]
            namespace, _, queue = owner.partition(".")
            if self.get_queue(namespace, queue) is None:
                try:
                    self.custom.delete_cluster_custom_object(
                        names.KAI_GROUP,
                        names.KAI_VERSION,
                        names.KAI_PLURAL,
                        kai["metadata"]["name"],
                    )
                except ApiException as exc:
                    if exc.status != 404:
                        raise

    # -- shared ---------------------------------------------------------------------------
    def reconcile_all(self) -> int:
        """The periodic resync: every queue and job, whatever the watches said (TTLs expire
        here)."""
        done = self.resync(names.QUEUE_PLURAL, self.reconcile_queue)
        done += self.resync(names.JOB_PLURAL, self.reconcile_job)
        try:
            self.prune_kai_queues()
        except Exception:
            logger.exception("pruning KAI queues failed")
        return done
