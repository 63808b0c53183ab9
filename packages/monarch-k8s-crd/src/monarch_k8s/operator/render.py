"""MonarchMesh in, desired child objects out: the operator's decisions, without I/O.

Theory of operation: the kopf handlers (``handlers.py``) read a MonarchMesh, call
:func:`parse_mesh`, then :func:`render_children` for the objects that should exist, and hand
each to :func:`~.plan.plan_update` beside what the cluster holds; :mod:`.status` says
what ``status`` reports. Nothing here reads a clock, a
random source or the API server: ``now`` and the gateway token are arguments.

Wire compatibility with upstream's operator (meta-pytorch/monarch-kubernetes): the headless
Service ``<name>-svc`` and the StatefulSet ``<name>`` (Parallel, upstream's two labels on
everything and as selector, the port named ``monarch``), ``status.serviceName`` as the
Service's FQDN, a ``Ready`` condition with reasons ``AllReady``/``Waiting``, and the SHA-256 of
the desired pod template in an annotation: the StatefulSet template is rewritten only when that
hash changes, so a webhook that mutates the live template causes no fight. ``spec.podTemplate``
is a PodTemplateSpec (``{metadata, spec}``), or a bare PodSpec (``{containers: ...}``) as in
upstream's DDP example.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from monarch_k8s import names

__all__ = [
    "GatewaySpec",
    "Mesh",
    "MeshSpecError",
    "RenderOptions",
    "activity_to_mark",
    "desired_replicas",
    "digest",
    "needs_token",
    "parse_mesh",
    "render_children",
    "render_token_secret",
    "selector_string",
    "stale_children",
]

Obj = dict[str, Any]

#: the gateway image runs these modules (the Dockerfile installs their packages)
RUN_MODULE = "monarch_k8s.run"
SYNC_VOLUME = "monarch-sync"
SYNC_ROOT = f"{names.SYNC_MOUNT}/root"  # the agent's versions; the live tree is ROOT/current
MEMBERS_FILE = f"{names.SYNC_MOUNT}/members.json"  # kept by the gateway for its agent


class MeshSpecError(ValueError):
    """A MonarchMesh the API server accepted but the operator cannot render; the message
    names the field and what to write instead."""


@dataclass(frozen=True)
class GatewaySpec:
    port: int = names.GATEWAY_PORT
    service_type: str = "ClusterIP"
    resources: Obj = field(default_factory=dict)
    args: tuple[str, ...] = ()


@dataclass(frozen=True)
class Mesh:
    name: str
    namespace: str
    uid: str
    generation: int
    replicas: int | None  # None only in attach mode
    port: int
    template: Obj  # a PodTemplateSpec: {"metadata": ..., "spec": ...}
    gateway: GatewaySpec | None
    sync: bool
    suspend: bool
    worker_selector: str | None  # attach mode: a label selector string
    idle_timeout_s: int | None
    labels: dict[str, str]
    annotations: dict[str, str]
    created: datetime | None


@dataclass(frozen=True)
class RenderOptions:
    """Settings of the operator's install (not of one mesh)."""

    image: str = "ghcr.io/monarch-anywhere/monarch:latest"  # gateway and sync agent image
    #: where the gateway listens: all addresses in a real cluster (port-forward dials the
    #: pod's loopback); ``podIP`` where pods share one network namespace (k8s-testenv's
    #: process kubelet), where two gateways on 0.0.0.0 would collide
    listen_host: str = "0.0.0.0"
    #: ``HYPERACTOR_MESH_ATTACH_CONFIG_TIMEOUT`` of the gateway (Monarch's default: 1 min). An
    #: attach waits this long for every worker's reply to the config push, which takes tens of
    #: milliseconds (32 workers on 2 busy cores: attached 0.05 s after Ready, README figures);
    #: it bounds the gateway's one vain attempt at a worker restarted at its old address
    #: (monarch-gateway's README), during which no other replacement is taken in.
    attach_timeout: str = "15s"

    @property
    def gateway_host(self) -> str:
        return "$(POD_IP)" if self.listen_host == "podIP" else self.listen_host


def parse_mesh(body: Obj) -> Mesh:
    meta, spec = body.get("metadata", {}), body.get("spec") or {}
    name = str(meta.get("name", ""))
    if not names.MESH_NAME_RE.match(name) or len(name) > 63:
        raise MeshSpecError(f"metadata.name {name!r} must match {names.MESH_NAME_RE.pattern}")
    selector = spec.get("workerSelector")
    replicas = spec.get("replicas")
    if selector is None and (not isinstance(replicas, int) or replicas < 1):
        raise MeshSpecError(f"spec.replicas must be an integer >= 1, got {replicas!r}")
    gateway = spec.get("gateway") or {}
    sync = spec.get("sync") or {}
    gateway_on = bool(gateway.get("enabled", bool(gateway))) or selector is not None
    created = meta.get("creationTimestamp")
    return Mesh(
        name=name,
        namespace=str(meta.get("namespace", "default")),
        uid=str(meta.get("uid", "")),
        generation=int(meta.get("generation", 0)),
        replicas=replicas,
        port=int(spec.get("port", names.WORKER_PORT)),
        template=pod_template(spec.get("podTemplate") or {}),
        gateway=GatewaySpec(
            port=int(gateway.get("port", names.GATEWAY_PORT)),
            service_type=str(gateway.get("serviceType", "ClusterIP")),
            resources=dict(gateway.get("resources") or {}),
            args=tuple(str(a) for a in gateway.get("args") or ()),
        )
        if gateway_on
        else None,
        sync=bool(sync.get("enabled", bool(sync))),
        suspend=bool(spec.get("suspend", False)),
        worker_selector=selector_string(selector) if selector is not None else None,
        idle_timeout_s=spec.get("idleTimeoutSeconds"),
        labels=dict(meta.get("labels") or {}),
        annotations=dict(meta.get("annotations") or {}),
        created=parse_time(created) if isinstance(created, str) else created,
    )


def parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def pod_template(raw: Obj) -> Obj:
    """A PodTemplateSpec from either shape upstream accepted (template, or bare PodSpec)."""
    if "spec" in raw or "metadata" in raw:
        return {"metadata": dict(raw.get("metadata") or {}), "spec": dict(raw.get("spec") or {})}
    return {"metadata": {}, "spec": dict(raw)}


def selector_string(selector: Obj | str) -> str:
    """A LabelSelector (matchLabels, matchExpressions) as the ``-l`` string the API takes."""
    if isinstance(selector, str):
        return selector
    parts = [f"{k}={v}" for k, v in sorted((selector.get("matchLabels") or {}).items())]
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op in ("In", "NotIn"):
            parts.append(f"{key} {op.lower()} ({','.join(values)})")
        elif op == "Exists":
            parts.append(key)
        elif op == "DoesNotExist":
            parts.append(f"!{key}")
        else:
            raise MeshSpecError(f"spec.workerSelector: unknown operator {op!r}")
    if not parts:
        raise MeshSpecError("spec.workerSelector selects every pod; give matchLabels")
    return ",".join(parts)


def desired_replicas(mesh: Mesh, now: datetime) -> int:
    """Workers to run now: none while suspended or idle past ``idleTimeoutSeconds``."""
    if mesh.suspend or mesh.replicas is None:
        return 0
    return 0 if is_idle(mesh, now) else mesh.replicas


def is_idle(mesh: Mesh, now: datetime) -> bool:
    """No use marked (the ``last-activity`` annotation, else creation) for the idle timeout."""
    if not mesh.idle_timeout_s:
        return False
    raw = mesh.annotations.get(names.ACTIVITY_ANNOTATION)
    last = parse_time(raw) if raw else mesh.created
    if last is None:
        return False
    return (now - last).total_seconds() > mesh.idle_timeout_s


def activity_to_mark(mesh: Mesh, sessions: int | None, now: datetime) -> str | None:
    """The ``last-activity`` value to write when the gateway has clients (``/healthz``
    ``sessions``), or None: written at most every quarter of the timeout (and 5 s), so marking
    use costs one patch now and then, not one per pass; but always once the mark is half the
    timeout old, so a pass never finds a mesh with clients idle (a 2 s timeout and a 5 s
    throttle once scaled such a mesh away)."""
    if not mesh.idle_timeout_s or not sessions:
        return None
    raw = mesh.annotations.get(names.ACTIVITY_ANNOTATION)
    last = parse_time(raw) if raw else None
    every = min(max(5.0, mesh.idle_timeout_s / 4), mesh.idle_timeout_s / 2)
    if last is not None and (now - last).total_seconds() < every:
        return None
    return now.strftime("%Y-%m-%dT%H:%M:%SZ")


def digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def owner_reference(mesh: Mesh) -> Obj:
    return {
        "apiVersion": f"{names.GROUP}/{names.VERSION}",
        "kind": names.KIND,
        "name": mesh.name,
        "uid": mesh.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def metadata(mesh: Mesh, name: str, labels: dict[str, str], **extra: Any) -> Obj:
    return {
        "name": name,
        "namespace": mesh.namespace,
        "labels": labels,
        "ownerReferences": [owner_reference(mesh)],
        **extra,
    }


def env_var(name: str, value: str) -> Obj:
    return {"name": name, "value": value}


POD_IP_ENV = {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}


def token_env(mesh: Mesh, var: str) -> Obj:
    ref = {"name": names.token_secret_name(mesh.name), "key": names.TOKEN_KEY}
    return {"name": var, "valueFrom": {"secretKeyRef": ref}}


def with_env(container: Obj, *env: Obj) -> None:
    """Prepend ``env`` to a container's (ours first, so ``$(POD_IP)`` expands in theirs)."""
    ours = {e["name"] for e in env}
    container["env"] = [*env, *(e for e in container.get("env") or [] if e["name"] not in ours)]


def sync_agent_container(mesh: Mesh, opts: RenderOptions, *, members: bool) -> Obj:
    argv = ["python", "-m", RUN_MODULE, "sync-agent", "--listen", f"$(POD_IP):{names.SYNC_PORT}"]
    argv += ["--root", SYNC_ROOT]
    if members:
        argv += ["--members-file", MEMBERS_FILE]
    return {
        "name": "sync-agent",
        "image": opts.image,
        "command": argv,
        "env": [POD_IP_ENV, token_env(mesh, "MONARCH_SYNC_TOKEN")],
        "ports": [{"name": "sync", "containerPort": names.SYNC_PORT}],
        "volumeMounts": [{"name": SYNC_VOLUME, "mountPath": names.SYNC_MOUNT}],
    }


def add_sync(pod_spec: Obj, main: Obj, mesh: Mesh, opts: RenderOptions, *, members: bool) -> None:
    """The agent beside ``main``, sharing an emptyDir; ``main`` imports from its live tree."""
    live = f"{SYNC_ROOT}/current"
    old_path = next((e for e in main.get("env") or [] if e["name"] == "PYTHONPATH"), None)
    python_path = live + (f":{old_path['value']}" if old_path and "value" in old_path else "")
    with_env(main, env_var("MONARCH_SYNC_ROOT", live), env_var("PYTHONPATH", python_path))
    main.setdefault("volumeMounts", []).append({"name": SYNC_VOLUME, "mountPath": names.SYNC_MOUNT})
    pod_spec.setdefault("volumes", []).append({"name": SYNC_VOLUME, "emptyDir": {}})
    pod_spec["containers"].append(sync_agent_container(mesh, opts, members=members))


def worker_pod_template(mesh: Mesh, opts: RenderOptions) -> Obj:
    """The user's template with upstream's labels, the port, and the bootstrap if needed."""
    template = copy.deepcopy(mesh.template)
    meta, spec = template["metadata"], template["spec"]
    meta["labels"] = {**(meta.get("labels") or {}), **names.worker_labels(mesh.name)}
    containers = spec.get("containers") or []
    if not containers:
        raise MeshSpecError("spec.podTemplate has no containers; give at least one")
    main = containers[0]
    if not main.get("command"):
        if not main.get("args"):
            # Nothing says how to start the worker: ours is told how (the process kubelet of
            # k8s-testenv ignores images altogether, so the command must be there).
            address = f"tcp://$(POD_IP):{mesh.port}"
            main["command"] = ["python", "-m", RUN_MODULE, "worker", address]
        # With args and no command the user starts the worker through the image, as in
        # Kubernetes (and upstream's operator): the args go to its ENTRYPOINT, or are the
        # command line if it has none; the bootstrap would drop them, so it stays out.
        # Ready once it listens: the gateway attaches to Ready pods only
        main.setdefault("readinessProbe", {"tcpSocket": {"port": mesh.port}, "periodSeconds": 1})
    with_env(main, POD_IP_ENV)
    ports = main.setdefault("ports", [])
    if not any(p.get("containerPort") == mesh.port for p in ports):
        ports.append({"name": names.PORT_NAME, "containerPort": mesh.port})
    if mesh.sync:
        add_sync(spec, main, mesh, opts, members=False)
    return template


def render_worker_service(mesh: Mesh) -> Obj:
    labels = names.worker_labels(mesh.name)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(mesh, names.worker_service_name(mesh.name), labels),
        "spec": {
            "clusterIP": "None",
            "selector": labels,
            "ports": [{"name": names.PORT_NAME, "port": mesh.port}],
        },
    }


def render_statefulset(mesh: Mesh, replicas: int, opts: RenderOptions) -> Obj:
    labels = names.worker_labels(mesh.name)
    template = worker_pod_template(mesh, opts)
    annotations = {**mesh.annotations, names.TEMPLATE_HASH_ANNOTATION: digest(template)}
    annotations.pop(names.ACTIVITY_ANNOTATION, None)  # changes often; means nothing here
    annotations.pop("kubectl.kubernetes.io/last-applied-configuration", None)
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": metadata(
            mesh, mesh.name, {**mesh.labels, **labels}, annotations=annotations
        ),  # MonarchMesh labels travel to the StatefulSet for Kueue, as upstream
        "spec": {
            "replicas": replicas,
            "serviceName": names.worker_service_name(mesh.name),
            "selector": {"matchLabels": labels},
            "podManagementPolicy": "Parallel",
            "template": template,
        },
    }


def gateway_labels(mesh: str) -> dict[str, str]:
    return {names.MESH_LABEL: mesh, names.APP_LABEL: names.GATEWAY_APP}


def render_gateway_deployment(mesh: Mesh, replicas: int, opts: RenderOptions) -> Obj:
    assert mesh.gateway is not None
    gw = mesh.gateway
    selector = mesh.worker_selector or selector_string(
        {"matchLabels": names.worker_labels(mesh.name)}
    )
    argv = ["python", "-m", RUN_MODULE, "gateway", "serve"]
    argv += ["--mesh-selector", f"{mesh.name}={mesh.namespace}/{selector}:{mesh.port}"]
    argv += ["--host", opts.gateway_host, "--port", str(gw.port)]
    env = [POD_IP_ENV, token_env(mesh, "MONARCH_GATEWAY_TOKEN")]
    env.append(env_var("HYPERACTOR_MESH_ATTACH_CONFIG_TIMEOUT", opts.attach_timeout))
    if mesh.replicas is not None and mesh.worker_selector is None:
        env.append(env_var("MONARCH_EXPECTED_WORKERS", str(mesh.replicas)))
    container: Obj = {
        "name": "gateway",
        "image": opts.image,
        "command": argv,
        "ports": [{"name": "gateway", "containerPort": gw.port}],
        "readinessProbe": {
            "httpGet": {"path": "/healthz", "port": gw.port},
            "periodSeconds": 2,
        },
        "env": env,
    }
    if gw.resources:
        container["resources"] = gw.resources
    labels = gateway_labels(mesh.name)
    spec: Obj = {"serviceAccountName": names.gateway_name(mesh.name), "containers": [container]}
    if mesh.sync:
        agent = f"$(POD_IP):{names.SYNC_PORT}"
        argv += ["--sync-agent", agent, "--sync-port", str(names.SYNC_PORT)]
        argv += ["--sync-members-file", MEMBERS_FILE]
        add_sync(spec, container, mesh, opts, members=True)
    argv += list(gw.args)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(mesh, names.gateway_name(mesh.name), labels),
        "spec": {
            "replicas": replicas,
            "strategy": {"type": "Recreate"},  # one gateway holds the mesh at a time
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": spec},
        },
    }


def render_gateway_service(mesh: Mesh) -> Obj:
    assert mesh.gateway is not None
    labels = gateway_labels(mesh.name)
    port = mesh.gateway.port
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(mesh, names.gateway_name(mesh.name), labels),
        "spec": {
            "type": mesh.gateway.service_type,
            "selector": labels,
            "ports": [{"name": "gateway", "port": port, "targetPort": port}],
        },
    }


def render_gateway_rbac(mesh: Mesh) -> list[Obj]:
    """The gateway's own ServiceAccount, allowed only to read pods in its namespace."""
    name, labels = names.gateway_name(mesh.name), gateway_labels(mesh.name)
    rule = {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": metadata(mesh, name, labels)},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": metadata(mesh, name, labels),
            "rules": [rule],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": metadata(mesh, name, labels),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": mesh.namespace}],
        },
    ]


def render_token_secret(mesh: Mesh, token: str) -> Obj:
    """Created once, never updated: a new token would lock out connected clients."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": metadata(mesh, names.token_secret_name(mesh.name), gateway_labels(mesh.name)),
        "type": "Opaque",
        "stringData": {names.TOKEN_KEY: token},
    }


def render_children(mesh: Mesh, *, now: datetime, opts: RenderOptions) -> list[Obj]:
    """Every child but the token Secret, in creation order (RBAC before the gateway)."""
    replicas = desired_replicas(mesh, now)
    children: list[Obj] = []
    if mesh.worker_selector is None:
        children += [render_worker_service(mesh), render_statefulset(mesh, replicas, opts)]
    if mesh.gateway is not None:
        attach_active = mesh.worker_selector is not None and not mesh.suspend
        gateway_replicas = 1 if replicas > 0 or attach_active else 0
        children += render_gateway_rbac(mesh)
        children += [
            render_gateway_deployment(mesh, gateway_replicas, opts),
            render_gateway_service(mesh),
        ]
    return children


def stale_children(mesh: Mesh, desired: list[Obj]) -> list[tuple[str, str]]:
    """(kind, name) of children this mesh may have made that its spec no longer asks for (the
    gateway turned off, attach mode turned on); the caller deletes those it owns."""
    possible = [("Service", names.worker_service_name(mesh.name)), ("StatefulSet", mesh.name)]
    gateway = names.gateway_name(mesh.name)
    possible += [(kind, gateway) for kind in GATEWAY_KINDS]
    wanted = {(o["kind"], o["metadata"]["name"]) for o in desired}
    return [child for child in possible if child not in wanted]


GATEWAY_KINDS = ("Deployment", "Service", "RoleBinding", "Role", "ServiceAccount")


def needs_token(mesh: Mesh) -> bool:
    return mesh.gateway is not None or mesh.sync
