"""kopf handlers for TorchrunQueue and TorchrunJob: thin adapters to
:class:`~.reconcile.TorchrunReconciler`, ``on.event`` only (no finalizers, as for MonarchMesh:
deleting a job completes at once and the garbage collector takes its children). TTLs expire in
the periodic resync beside the operator (``monarch_k8s.operator.__main__``)."""

from __future__ import annotations

from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException

from monarch_k8s.torchrun import names
from monarch_k8s.torchrun.reconcile import TorchrunReconciler

__all__ = ["set_reconciler"]

_reconciler: TorchrunReconciler | None = None


def set_reconciler(reconciler: TorchrunReconciler) -> None:
    global _reconciler
    _reconciler = reconciler


def reconciler() -> TorchrunReconciler:
    assert _reconciler is not None, "set_reconciler() before kopf runs"
    return _reconciler


def _retry(exc: ApiException) -> kopf.TemporaryError:
    return kopf.TemporaryError(f"API error {exc.status}: {exc.reason}; retrying", delay=2)


@kopf.on.event(names.GROUP, names.VERSION, names.JOB_PLURAL)
def job_event(type: str | None, body: kopf.Body, **_: Any) -> None:
    if type == "DELETED":
        return
    try:
        reconciler().reconcile_job(dict(body))
    except ApiException as exc:
        raise _retry(exc) from exc


@kopf.on.event(names.GROUP, names.VERSION, names.QUEUE_PLURAL)
def queue_event(type: str | None, body: kopf.Body, **_: Any) -> None:
    if type == "DELETED":
        return  # its KAI Queue is pruned by the resync
    try:
        reconciler().reconcile_queue(dict(body))
    except ApiException as exc:
        raise _retry(exc) from exc


@kopf.on.event("batch", "v1", "jobs", labels={names.JOB_LABEL: kopf.PRESENT})
def batch_job_event(type: str | None, body: kopf.Body, **_: Any) -> None:
    """The Job's pods started, became ready, failed or finished: report it."""
    owners = [o for o in body.get("metadata", {}).get("ownerReferences", [])
              if o.get("kind") == names.JOB_KIND]  # fmt: skip
    if not owners:
        return
    ref = {"metadata": {"namespace": body["metadata"]["namespace"], "name": owners[0]["name"]}}
    try:
        reconciler().reconcile_job(ref)
    except ApiException as exc:
        raise _retry(exc) from exc
