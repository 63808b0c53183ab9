"""kopf handlers: thin adapters from watch events to :class:`~.reconcile.Reconciler`.

Only ``on.event`` handlers and no timers or daemons: kopf puts a finalizer on objects that have
delete handlers, daemons or timers, and a finalizer makes ``kubectl delete`` hang while the
operator is down. Without one, deleting a MonarchMesh completes at once and the garbage
collector removes its children through their owner references. The periodic resync that a
kopf timer would give runs instead beside the operator (``__main__.py``), over every mesh.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException

from monarch_k8s import names
from monarch_k8s.operator.reconcile import Reconciler

__all__ = ["configure", "set_reconciler"]

_reconciler: Reconciler | None = None


def set_reconciler(reconciler: Reconciler) -> None:
    global _reconciler
    _reconciler = reconciler


def reconciler() -> Reconciler:
    assert _reconciler is not None, "set_reconciler() before kopf runs"
    return _reconciler


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # A watch can go silent without a TCP error (kopf #585, #957): ask the server to end each
    # watch within a minute and give up on a stalled connection soon after; kopf re-watches.
    settings.watching.server_timeout = 60
    settings.watching.client_timeout = 75
    settings.watching.connect_timeout = 10
    settings.posting.level = logging.WARNING  # our own Events say what happened


def _retry(exc: ApiException) -> kopf.TemporaryError:
    return kopf.TemporaryError(f"API error {exc.status}: {exc.reason}; retrying", delay=2)


@kopf.on.event(names.GROUP, names.VERSION, names.PLURAL)
def mesh_event(type: str | None, body: kopf.Body, **_: Any) -> None:
    if type == "DELETED":
        return  # the garbage collector removes the children
    observed = (body.get("status") or {}).get("observedGeneration")
    # prune (extra reads) only when the spec changed since the last pass; the resync always does
    prune = observed != body.get("metadata", {}).get("generation")
    try:
        reconciler().reconcile(dict(body), prune=prune)
    except ApiException as exc:
        raise _retry(exc) from exc


def _owner_event(body: kopf.Body, type: str | None) -> None:
    """A child changed (status, deleted, edited): reconcile the mesh that owns it."""
    owners = [
        o
        for o in body.get("metadata", {}).get("ownerReferences", [])
        if o.get("kind") == names.KIND
    ]
    if not owners:
        return
    namespace = body["metadata"]["namespace"]
    try:
        mesh: dict[str, Any] = reconciler().custom.get_namespaced_custom_object(  # type: ignore[assignment]
            names.GROUP, names.VERSION, namespace, names.PLURAL, owners[0]["name"]
        )
    except ApiException as exc:
        if exc.status == 404:
            return  # being deleted with its children
        raise _retry(exc) from exc
    try:
        reconciler().reconcile(mesh, prune=type == "DELETED")  # a child gone: maybe pruned
    except ApiException as exc:
        raise _retry(exc) from exc


@kopf.on.event("apps", "v1", "statefulsets", labels={names.APP_LABEL: names.WORKER_APP})
def statefulset_event(type: str | None, body: kopf.Body, **_: Any) -> None:
    _owner_event(body, type)


@kopf.on.event("apps", "v1", "deployments", labels={names.APP_LABEL: names.GATEWAY_APP})
def deployment_event(type: str | None, body: kopf.Body, **_: Any) -> None:
    _owner_event(body, type)
