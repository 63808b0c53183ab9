"""The I/O around :mod:`render`: read a mesh's children, send what :func:`~.plan.plan_update` says,
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

from monarch_k8s import names
from monarch_k8s.operator import restarts
from monarch_k8s.operator.kube import KubeObjects
from monarch_k8s.operator.render import (
    Mesh,
    MeshSpecError,
    RenderOptions,
    activity_to_mark,
    desired_replicas,
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
    GROUP, VERSION, KIND = names.GROUP, names.VERSION, names.KIND
    COMPONENT = names.FIELD_MANAGER

    def __init__(self, api_client: client.ApiClient, options: RenderOptions | None = None):
        super().__init__(api_client)
        self.options = options or RenderOptions()

    def spec_error(self, child: str, message: str) -> Exception:
        return MeshSpecError(f"{child} refused: {message}")

    # -- one MonarchMesh ------------------------------------------------------------------
    def reconcile(
        self, body: Obj, now: datetime | None = None, *, prune: bool = True
    ) -> Obj | None:
        """Bring one mesh's children and status to what its spec says; return the status
        (None when the mesh is gone or its spec is invalid). ``prune``: also delete children
        the spec no longer asks for (skipped on a child's status change, which cannot change
        the spec: fewer reads on the hot path). One pass at a time per mesh
        (:meth:`~.kube.KubeObjects.one_pass`); a mesh deleted meanwhile leaves the rest to the
        garbage collector."""
        with self.one_pass(names.PLURAL, body) as current:
            if current is None:
                return None
            return self._reconcile(current, now or datetime.now(UTC), prune=prune)

    def _reconcile(self, body: Obj, now: datetime, *, prune: bool) -> Obj | None:
        try:
            mesh = self.note_activity(parse_mesh(body), now)
            if needs_token(mesh):
                self.ensure_token(mesh)
            children = render_children(mesh, now=now, opts=self.options)
            for desired in children:
                self.apply(ref(mesh), desired)
            if prune:
                self.prune(mesh, children)
            if mesh.worker_selector is None and desired_replicas(mesh, now) > 0:
                self.replace_restarted_workers(mesh)
        except MeshSpecError as exc:
            old = ((body.get("status") or {}).get("conditions") or [{}])[0]
            if old.get("message") != str(exc):  # once per distinct problem, not every pass
                self.event(body, "Warning", "InvalidSpec", str(exc))
                self.patch_status(
                    body, names.PLURAL, {"conditions": [invalid_condition(str(exc), now)]}
                )
            return None
        status = render_status(
            mesh, self.observe(mesh), now=now, previous=(body.get("status") or {}).get("conditions")
        )
        old = body.get("status") or {}
        if any(old.get(k) != v for k, v in status.items()):
            self.patch_status(body, names.PLURAL, status)
            if (old.get("conditions") or [{}])[0].get("reason") != status["conditions"][0][
                "reason"
            ]:
                cond = status["conditions"][0]
                self.event(ref(mesh), "Normal", cond["reason"], cond["message"])
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

    def replace_restarted_workers(self, mesh: Mesh) -> None:
        """Delete the pods whose worker container restarted in place (:mod:`.restarts`): Monarch
        cannot attach a worker again at the IP its pod keeps; recreated, the pod gets a new one.
        Pods of attach mode are not ours to delete and are left alone."""
        container = str(mesh.template["spec"]["containers"][0].get("name", ""))
        selector = ",".join(f"{k}={v}" for k, v in names.worker_labels(mesh.name).items())
        listed = self.core.list_namespaced_pod(mesh.namespace, label_selector=selector).items
        for pod in self.api_client.sanitize_for_serialization(listed):
            action = restarts.decide(pod, container=container, statefulset=mesh.name)
            try:
                if isinstance(action, restarts.Mark):
                    meta = {"resourceVersion": action.resource_version,  # as seen, or 409
                            "annotations": {names.READY_RESTARTS_ANNOTATION: str(action.restarts)}}  # fmt: skip
                    self.core.patch_namespaced_pod(action.pod, mesh.namespace, {"metadata": meta})
                elif isinstance(action, restarts.Fence):
                    once = client.V1Preconditions(uid=action.uid)  # never a newer pod of the name
                    self.core.delete_namespaced_pod(
                        action.pod, mesh.namespace, body=client.V1DeleteOptions(preconditions=once)
                    )
                    logger.warning("mesh %s/%s: %s", mesh.namespace, mesh.name, action.message())
                    why = names.RESTARTED_WORKER_REPLACED
                    self.event(ref(mesh), "Warning", why, action.message())
                    involved = {"apiVersion": "v1", "kind": "Pod", "name": action.pod,
                                "namespace": mesh.namespace, "uid": action.uid}  # fmt: skip
                    exit_reason = {names.EXIT_REASON_ANNOTATION: action.reason}
                    self.post_event(involved, "Warning", why, action.message(), exit_reason)
            except client.ApiException as exc:
                if exc.status not in (404, 409):  # gone, or changed meanwhile: the next pass
                    raise

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
            self.delete(kind, mesh.namespace, name)
            self.event(ref(mesh), "Normal", "Delete", f"delete {kind} {name}: no longer asked for")

    def ensure_token(self, mesh: Mesh) -> None:
        name = names.token_secret_name(mesh.name)
        if self.read("Secret", mesh.namespace, name) is None:
            secret = render_token_secret(mesh, secrets.token_urlsafe(32))
            if self.create("Secret", mesh.namespace, secret):
                self.event(ref(mesh), "Normal", "Create", f"create Secret {name}")

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

    def reconcile_all(self) -> int:
        """The periodic resync: every MonarchMesh in the cluster, whatever the watches said."""
        return self.resync(names.PLURAL, self.reconcile)


def ref(mesh: Mesh) -> Obj:
    """What :meth:`~.kube.KubeObjects.event` and ``apply`` need of the mesh they are about."""
    return {"metadata": {"namespace": mesh.namespace, "name": mesh.name, "uid": mesh.uid}}


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
