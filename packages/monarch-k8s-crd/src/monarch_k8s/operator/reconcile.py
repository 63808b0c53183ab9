"""The I/O around :mod:`render`: read a mesh's children, send what :func:`plan_update` says,
write ``status`` and Events. Level-triggered: :meth:`Reconciler.reconcile` looks only at the
MonarchMesh and what the cluster holds now, so a missed event, a restart mid-way or a second
caller converge on the same objects (creates that race answer 409 and are left to the next
pass; replaces carry the live ``resourceVersion``, so a stale one is refused, never applied).
"""

from __future__ import annotations

import json
import logging
import secrets
from datetime import UTC, datetime
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from monarch_k8s import names
from monarch_k8s.operator.render import (
    Action,
    Mesh,
    MeshSpecError,
    Observed,
    RenderOptions,
    needs_token,
    parse_mesh,
    plan_update,
    render_children,
    render_status,
    render_token_secret,
)

__all__ = ["Reconciler"]

logger = logging.getLogger("monarch_k8s.operator")
Obj = dict[str, Any]

# kind -> (API class, method suffix)
KINDS = {
    "Service": (client.CoreV1Api, "service"),
    "Secret": (client.CoreV1Api, "secret"),
    "ServiceAccount": (client.CoreV1Api, "service_account"),
    "StatefulSet": (client.AppsV1Api, "stateful_set"),
    "Deployment": (client.AppsV1Api, "deployment"),
    "Role": (client.RbacAuthorizationV1Api, "role"),
    "RoleBinding": (client.RbacAuthorizationV1Api, "role_binding"),
}


class Reconciler:
    def __init__(self, api_client: client.ApiClient, options: RenderOptions | None = None):
        self.api_client = api_client
        self.options = options or RenderOptions()
        self.core = client.CoreV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)

    # -- generic object access, as plain dicts -------------------------------------------
    def _call(self, kind: str, verb: str, *args: Any, **kwargs: Any) -> Any:
        api_class, suffix = KINDS[kind]
        method = getattr(api_class(self.api_client), f"{verb}_namespaced_{suffix}")
        return method(*args, **kwargs)

    def read(self, kind: str, namespace: str, name: str) -> Obj | None:
        try:
            response = self._call(kind, "read", name, namespace, _preload_content=False)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return dict(json.loads(response.data))

    def apply(self, mesh: Mesh, desired: Obj) -> Action:
        meta = desired["metadata"]
        kind, namespace, name = desired["kind"], meta["namespace"], meta["name"]
        action, body = plan_update(desired, self.read(kind, namespace, name))
        try:
            if action is Action.CREATE:
                self._call(kind, "create", namespace, body)
            elif action is Action.REPLACE:
                self._call(kind, "replace", name, namespace, body)
            elif action is Action.SCALE:
                self._call(kind, "patch", name, namespace, body)
        except ApiException as exc:
            if exc.status == 409:  # created meanwhile, or changed under us: next pass
                logger.info("%s %s/%s changed meanwhile; next pass", kind, namespace, name)
                return Action.NONE
            raise
        if action is not Action.NONE:
            self.event(mesh, "Normal", action.value.capitalize(), f"{action.value} {kind} {name}")
        return action

    # -- one MonarchMesh ------------------------------------------------------------------
    def reconcile(self, body: Obj, now: datetime | None = None) -> Obj | None:
        """Bring one mesh's children and status to what its spec says; return the status."""
        now = now or datetime.now(UTC)
        try:
            mesh = parse_mesh(body)
        except MeshSpecError as exc:
            self.event_raw(body, "Warning", "InvalidSpec", str(exc))
            self.patch_status(body, {"conditions": [invalid_condition(str(exc), now)]})
            return None
        if needs_token(mesh):
            self.ensure_token(mesh)
        for desired in render_children(mesh, now=now, opts=self.options):
            self.apply(mesh, desired)
        status = render_status(
            mesh, self.observe(mesh), now=now, previous=(body.get("status") or {}).get("conditions")
        )
        old = body.get("status") or {}
        if any(old.get(k) != v for k, v in status.items()):
            self.patch_status(body, status)
            if (old.get("conditions") or [{}])[0].get("reason") != status["conditions"][0][
                "reason"
            ]:
                cond = status["conditions"][0]
                self.event(mesh, "Normal", cond["reason"], cond["message"])
        return status

    def ensure_token(self, mesh: Mesh) -> None:
        name = names.token_secret_name(mesh.name)
        if self.read("Secret", mesh.namespace, name) is None:
            secret = render_token_secret(mesh, secrets.token_urlsafe(32))
            try:
                self._call("Secret", "create", mesh.namespace, secret)
                self.event(mesh, "Normal", "Create", f"create Secret {name}")
            except ApiException as exc:
                if exc.status != 409:
                    raise

    def observe(self, mesh: Mesh) -> Observed:
        replicas = ready = 0
        if mesh.worker_selector is None:
            sts = self.read("StatefulSet", mesh.namespace, mesh.name) or {}
            st = sts.get("status") or {}
            replicas, ready = int(st.get("replicas", 0)), int(st.get("readyReplicas", 0))
        else:
            pods = self.core.list_namespaced_pod(
                mesh.namespace, label_selector=mesh.worker_selector
            ).items
            replicas = len(pods)
            ready = sum(1 for p in pods if pod_ready(p))
        gateway_ready = False
        if mesh.gateway is not None:
            dep = self.read("Deployment", mesh.namespace, names.gateway_name(mesh.name)) or {}
            gateway_ready = int((dep.get("status") or {}).get("readyReplicas", 0)) > 0
        return Observed(replicas=replicas, ready_replicas=ready, gateway_ready=gateway_ready)

    def patch_status(self, body: Obj, status: Obj) -> None:
        meta = body["metadata"]
        try:
            self.custom.patch_namespaced_custom_object_status(
                names.GROUP, names.VERSION, meta["namespace"], names.PLURAL, meta["name"],
                {"status": status},
            )  # fmt: skip
        except ApiException as exc:
            if exc.status != 404:  # deleted meanwhile: nothing to report on
                raise

    def reconcile_all(self) -> int:
        """The periodic resync: every MonarchMesh in the cluster, whatever the watches said."""
        meshes: Obj = self.custom.list_cluster_custom_object(  # type: ignore[assignment]
            names.GROUP, names.VERSION, names.PLURAL
        )
        done = 0
        for body in meshes.get("items", []):
            try:
                self.reconcile(body)
                done += 1
            except Exception:
                meta = body.get("metadata", {})
                logger.exception("resync of %s/%s failed", meta.get("namespace"), meta.get("name"))
        return done

    # -- Events ---------------------------------------------------------------------------
    def event(self, mesh: Mesh, kind: str, reason: str, message: str) -> None:
        ref = {"namespace": mesh.namespace, "name": mesh.name, "uid": mesh.uid}
        self.event_raw({"metadata": ref}, kind, reason, message)

    def event_raw(self, body: Obj, kind: str, reason: str, message: str) -> None:
        meta = body["metadata"]
        now = datetime.now(UTC)
        event = {
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": f"{names.GROUP}/{names.VERSION}",
                "kind": names.KIND,
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid", ""),
            },
            "type": kind,
            "reason": reason,
            "message": message[:1000],
            "source": {"component": names.FIELD_MANAGER},
            "firstTimestamp": now.isoformat(),
            "lastTimestamp": now.isoformat(),
            "count": 1,
        }
        try:
            self.core.create_namespaced_event(meta["namespace"], event)  # type: ignore[arg-type]
        except ApiException as exc:  # an Event is a courtesy: never fail a reconcile on one
            logger.warning("could not post event %s: %s", reason, exc.reason)


def pod_ready(pod: Any) -> bool:
    if pod.metadata.deletion_timestamp is not None or pod.status is None:
        return False
    return any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])


def invalid_condition(message: str, now: datetime) -> Obj:
    return {
        "type": "Ready",
        "status": "False",
        "reason": "InvalidSpec",
        "message": message,
        "lastTransitionTime": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
