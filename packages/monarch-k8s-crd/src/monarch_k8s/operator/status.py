"""``status`` as upstream writes it (replicas, readyReplicas, serviceName, a ``Ready`` condition
with reasons ``AllReady``/``Waiting``), plus where the gateway is and why a mesh is not ready
(``Suspended``, ``Idle``, ``InvalidSpec``). Pure: ``now`` is an argument.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from monarch_k8s import names
from monarch_k8s.operator.render import Mesh, desired_replicas

__all__ = ["Observed", "condition", "render_status"]

Obj = dict[str, Any]


@dataclass(frozen=True)
class Observed:
    """What the cluster reports for a mesh's children (absent ones as None/0)."""

    replicas: int = 0
    ready_replicas: int = 0
    gateway_ready: bool = False


def render_status(
    mesh: Mesh, observed: Observed, *, now: datetime, previous: list[Obj] | None = None
) -> Obj:
    """``status`` as upstream writes it, plus where the gateway is and whether it is ready."""
    status: Obj = {
        "replicas": observed.replicas,
        "readyReplicas": observed.ready_replicas,
        "observedGeneration": mesh.generation,
    }
    if mesh.worker_selector is None:
        svc = names.worker_service_name(mesh.name)
        status["serviceName"] = f"{svc}.{mesh.namespace}.svc.cluster.local"
    if mesh.gateway is not None:
        status["gateway"] = {
            "serviceName": names.gateway_name(mesh.name),
            "port": mesh.gateway.port,
            "tokenSecret": names.token_secret_name(mesh.name),
            "ready": observed.gateway_ready,
        }
    wanted = desired_replicas(mesh, now)
    if mesh.suspend:
        ready, reason, message = False, "Suspended", "spec.suspend is true: no workers run"
    elif mesh.worker_selector is None and wanted == 0:
        idle = f"idle for more than {mesh.idle_timeout_s}s"
        ready, reason, message = False, "Idle", f"{idle}: scaled to zero until used again"
    else:
        expected = mesh.replicas if mesh.worker_selector is None else None
        workers_ok = observed.ready_replicas == expected or (
            expected is None and observed.ready_replicas > 0
        )
        gateway_ok = mesh.gateway is None or observed.gateway_ready
        ready = workers_ok and gateway_ok
        reason = "AllReady" if ready else "Waiting"
        message = (
            f"{observed.ready_replicas}/{expected if expected is not None else '?'} workers "
            f"ready" + ("" if mesh.gateway is None else f", gateway ready: {gateway_ok}")
        )
    status["conditions"] = [condition("Ready", ready, reason, message, now, previous or [])]
    return status


def condition(
    kind: str, ok: bool, reason: str, message: str, now: datetime, previous: list[Obj]
) -> Obj:
    value = "True" if ok else "False"
    old = next((c for c in previous if c.get("type") == kind), None)
    changed = old is None or old.get("status") != value
    stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "type": kind,
        "status": value,
        "reason": reason,
        "message": message,
        "lastTransitionTime": stamp
        if changed or old is None
        else old.get("lastTransitionTime", stamp),
    }
