"""Worker containers restarted in place: their pod is deleted so that it comes back at a new IP.

torchmonarch 0.7 cannot attach a second worker process at an address that a client process
(the gateway, or a controller pod attaching itself) attached before: the client's channel and
message numbering for that address belong to the dead process (monarch-gateway's README,
"Workers that come and go"). A container that crashes or is OOM-killed is restarted by the
kubelet in its pod, which keeps its IP, so without help the mesh never becomes whole again.
Deleting such a pod makes its StatefulSet recreate it, and a new pod gets a new IP (real CNIs
and k8s-testenv allocate round-robin).

Only a worker container seen Ready is a candidate (something may have attached it): the
operator records the container's ``restartCount`` on the pod when it sees it Ready
(:data:`~monarch_k8s.names.READY_RESTARTS_ANNOTATION`), and deletes the pod once that container
has died since (not running, or restarted). A worker that crashes before it ever listens stays
with the kubelet's crash-loop back-off (deleting it would only churn pods and reset the restart
count that diagnoses it). The decision is :func:`decide`, pure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from monarch_k8s import names

__all__ = ["Fence", "Mark", "decide"]

Obj = dict[str, Any]


@dataclass(frozen=True)
class Mark:
    """Record that the worker container was seen Ready at ``restarts`` restarts."""

    pod: str
    resource_version: str
    restarts: int


@dataclass(frozen=True)
class Fence:
    """Delete this pod (``uid``, so never a newer one of the name): its worker, seen Ready,
    died and is (or will be) restarted at ``ip``."""

    pod: str
    uid: str
    ip: str
    why: str  # the last termination, as Kubernetes reports it
    reason: str  # its reason alone (``OOMKilled``), for whoever explains the loss

    def message(self) -> str:
        return (
            f"delete pod {self.pod} (IP {self.ip}): its worker container restarted in place "
            f"({self.why}); Monarch cannot attach a new worker process at an address it "
            "attached before, so the pod is recreated to get a new IP"
        )


def decide(pod: Obj, *, container: str, statefulset: str) -> Fence | Mark | None:
    """What to do about one pod (as the API returns it, camelCase) of the StatefulSet
    ``statefulset``, whose worker container is named ``container``."""
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    owners = meta.get("ownerReferences") or []
    ours = any(
        o.get("kind") == "StatefulSet" and o.get("name") == statefulset and o.get("controller")
        for o in owners
    )
    if (
        not ours
        or meta.get("deletionTimestamp")
        or status.get("phase") not in ("Pending", "Running")
    ):
        return None
    worker = next(
        (c for c in status.get("containerStatuses") or [] if c.get("name") == container), None
    )
    if worker is None:
        return None
    restarts = int(worker.get("restartCount") or 0)
    seen = ready_restarts(meta)
    state = worker.get("state") or {}
    if seen is not None and (restarts > seen or "running" not in state):
        ip = str(status.get("podIP") or "")
        last = state.get("terminated") or (worker.get("lastState") or {}).get("terminated") or {}
        reason = str(
            last.get("reason") or (f"exit code {last['exitCode']}" if last else "Restarted")
        )
        return Fence(meta["name"], meta.get("uid", ""), ip, why=termination(last), reason=reason)
    if worker.get("ready") and seen != restarts:
        return Mark(pod=meta["name"], resource_version=meta.get("resourceVersion", ""),
                    restarts=restarts)  # fmt: skip
    return None


def ready_restarts(meta: Obj) -> int | None:
    raw = (meta.get("annotations") or {}).get(names.READY_RESTARTS_ANNOTATION)
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        return None  # not ours to make sense of: recorded anew when next seen Ready


def termination(terminated: Obj) -> str:
    """``exit code 137, OOMKilled``, as far as Kubernetes says."""
    if not terminated:
        return "exit not reported"
    parts = [f"exit code {terminated.get('exitCode', '?')}"]
    if terminated.get("reason"):
        parts.append(str(terminated["reason"]))
    if terminated.get("signal"):
        parts.append(f"signal {terminated['signal']}")
    return ", ".join(parts)
