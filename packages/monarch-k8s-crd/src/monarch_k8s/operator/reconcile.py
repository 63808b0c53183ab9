"""The I/O around :mod:`render`: read a mesh's children, send what :func:`plan_update` says,
write ``status`` and Events. Level-triggered: :meth:`Reconciler.reconcile` looks only at the
MonarchMesh and what the cluster holds now, so a missed event, a restart mid-way or a second
caller converge on the same objects (creates that race answer 409 and are left to the next
pass; replaces carry the live ``resourceVersion``, so a stale one is refused, never applied).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import secrets
import urllib.request
from datetime import UTC, datetime
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from monarch_k8s import names
from monarch_k8s.operator.kube import KubeObjects
from monarch_k8s.operator.plan import Action, plan_update
from monarch_k8s.operator.render import (
    Mesh,
    MeshSpecError,
    RenderOptions,
    activity_to_mark,
    gateway_labels,
    needs_token,
    parse_mesh,
    render_children,
    render_token_secret,
    stale_children,
)
from monarch_k8s.operator.status import Observed, render_status

__all__ = ["Reconciler"]

logger = logging.getLogger("monarch_k8s.operator")
Obj = dict[str, Any]

# kind -> apiVersion of the children; sent through the dynamic client as plain JSON (the
# typed client validates bodies and would refuse e.g. `nvidia.com/gpu: 4` in a user template)
KINDS = {
    "Service": "v1",
    "Secret": "v1",
    "ServiceAccount": "v1",
    "StatefulSet": "apps/v1",
    "Deployment": "apps/v1",
    "Role": "rbac.authorization.k8s.io/v1",
    "RoleBinding": "rbac.authorization.k8s.io/v1",
}


class Reconciler(KubeObjects):
    KINDS = KINDS
    COMPONENT = names.FIELD_MANAGER

    def __init__(self, api_client: client.ApiClient, options: RenderOptions | None = None):
        super().__init__(api_client)
        self.options = options or RenderOptions()

    # -- generic object access, as plain dicts -------------------------------------------

    def _call(self, kind: str, verb: str, namespace: str, body: Obj, name: str = "") -> None:
        resource = self._resource(kind)
        if verb == "create":
            self.dynamic.create(resource, body=body, namespace=namespace)
        elif verb == "replace":
            self.dynamic.replace(resource, body=body, name=name, namespace=namespace)
        else:
            self.dynamic.patch(
                resource, body=body, name=name, namespace=namespace,
                content_type="application/merge-patch+json",
            )  # fmt: skip

    def apply(self, mesh: Mesh, desired: Obj) -> Action:
        meta = desired["metadata"]
        kind, namespace, name = desired["kind"], meta["namespace"], meta["name"]
        action, body = plan_update(desired, self.read(kind, namespace, name))
        try:
            if action is Action.CREATE:
                self._call(kind, "create", namespace, body)
            elif action is Action.REPLACE:
                self._call(kind, "replace", namespace, body, name)
            elif action is Action.SCALE:
                self._call(kind, "patch", namespace, body, name)
        except ApiException as exc:
            if exc.status == 409:  # created meanwhile, or changed under us: next pass
                logger.info("%s %s/%s changed meanwhile; next pass", kind, namespace, name)
                return Action.NONE
            if exc.status in (400, 422):  # what the user's template makes is invalid
                raise MeshSpecError(f"{kind} {name} refused: {api_message(exc)}") from exc
            raise
        if action is not Action.NONE:
            self.event(mesh, "Normal", action.value.capitalize(), f"{action.value} {kind} {name}")
        return action

    # -- one MonarchMesh ------------------------------------------------------------------
    def reconcile(
        self, body: Obj, now: datetime | None = None, *, prune: bool = True
    ) -> Obj | None:
        """Bring one mesh's children and status to what its spec says; return the status.
        ``prune``: also delete children the spec no longer asks for (skipped on a child's
        status change, which cannot change the spec: fewer reads on the hot path).

        Passes over one mesh run one at a time (kopf runs handlers of different resources, and
        the resync, in parallel), each on the mesh as it is once the previous pass is done, so
        two passes never race to create, or report one change twice."""
        meta = body.get("metadata", {})
        lock = self._lock_for(f"{meta['namespace']}/{meta['name']}")
        waited = not lock.acquire(blocking=False)
        if waited:
            lock.acquire()
        try:
            if waited or "spec" not in body:  # another pass ran meanwhile, or just a name
                try:
                    body = self.custom.get_namespaced_custom_object(  # type: ignore[assignment]
                        names.GROUP, names.VERSION, meta["namespace"], names.PLURAL, meta["name"]
                    )
                except ApiException as exc:
                    if exc.status == 404:
                        return None  # deleted meanwhile: the garbage collector takes the rest
                    raise
            return self._reconcile(body, now or datetime.now(UTC), prune=prune)
        finally:
            lock.release()

    def _reconcile(self, body: Obj, now: datetime, *, prune: bool) -> Obj | None:
        try:
            mesh = self.note_activity(parse_mesh(body), now)
            if needs_token(mesh):
                self.ensure_token(mesh)
            children = render_children(mesh, now=now, opts=self.options)
            for desired in children:
                self.apply(mesh, desired)
            if prune:
                self.prune(mesh, children)
        except MeshSpecError as exc:
            old = ((body.get("status") or {}).get("conditions") or [{}])[0]
            if old.get("message") != str(exc):  # once per distinct problem, not every pass
                self.event_raw(body, "Warning", "InvalidSpec", str(exc))
                self.patch_status(body, {"conditions": [invalid_condition(str(exc), now)]})
            return None
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

    def note_activity(self, mesh: Mesh, now: datetime) -> Mesh:
        """A gateway with clients marks the mesh used (``last-activity``), so an idle timeout
        never scales away a mesh someone is connected to; ``KubernetesJob`` marks it too."""
        if not mesh.idle_timeout_s or mesh.gateway is None:
            return mesh
        stamp = activity_to_mark(mesh, self.gateway_sessions(mesh), now)
        if stamp is None:
            return mesh
        patch = {"metadata": {"annotations": {names.ACTIVITY_ANNOTATION: stamp}}}
        self.custom.patch_namespaced_custom_object(
            names.GROUP, names.VERSION, mesh.namespace, names.PLURAL, mesh.name, patch
        )
        return dataclasses.replace(
            mesh, annotations={**mesh.annotations, names.ACTIVITY_ANNOTATION: stamp}
        )

    def gateway_sessions(self, mesh: Mesh) -> int | None:
        """Client sessions the gateway reports on ``/healthz``; None if it cannot be asked."""
        assert mesh.gateway is not None
        selector = ",".join(f"{k}={v}" for k, v in gateway_labels(mesh.name).items())
        pods = self.core.list_namespaced_pod(mesh.namespace, label_selector=selector).items
        token = self.gateway_token(mesh)
        for pod in pods:
            if pod_ready(pod) and pod.status is not None and pod.status.pod_ip:
                url = f"http://{pod.status.pod_ip}:{mesh.gateway.port}/healthz"
                # without the token /healthz answers liveness only (no session count)
                request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
                try:
                    with urllib.request.urlopen(request, timeout=2) as response:
                        return int(json.loads(response.read()).get("sessions", 0))
                except (OSError, ValueError):
                    return None
        return None

    def gateway_token(self, mesh: Mesh) -> str:
        """The bearer token of the mesh's gateway, from the Secret the operator generated."""
        secret = self.read("Secret", mesh.namespace, names.token_secret_name(mesh.name)) or {}
        encoded = (secret.get("data") or {}).get(names.TOKEN_KEY, "")
        return base64.b64decode(encoded).decode() if encoded else ""

    def prune(self, mesh: Mesh, children: list[Obj]) -> None:
        for kind, name in stale_children(mesh, children):
            live = self.read(kind, mesh.namespace, name)
            owners = (live or {}).get("metadata", {}).get("ownerReferences") or []
            if not any(o.get("uid") == mesh.uid for o in owners):
                continue  # not ours (or gone): never touch it
            try:
                self.dynamic.delete(self._resource(kind), name=name, namespace=mesh.namespace)
            except ApiException as exc:
                if exc.status != 404:
                    raise
            self.event(mesh, "Normal", "Delete", f"delete {kind} {name}: no longer asked for")

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
        involved = {
            "apiVersion": f"{names.GROUP}/{names.VERSION}",
            "kind": names.KIND,
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta.get("uid", ""),
        }
        self.post_event(involved, kind, reason, message)


def api_message(exc: ApiException) -> str:
    try:
        return str(json.loads(exc.body or "")["message"])
    except (TypeError, ValueError, KeyError):
        return str(exc.reason)


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
