"""Reading worker pods: progress while waiting, why a pod is not ready, why a worker was lost.

Pure functions over pods and events as the API server's JSON (dicts), so they are tested as
plain functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from monarch_k8s import names

__all__ = ["Progress", "lost_reason", "not_ready_reasons", "progress"]

#: DisruptionTarget condition reasons (upstream pod disruption conditions) -> what we report
_DISRUPTIONS = {
    "PreemptionByScheduler": "Preempted",
    "PreemptionByKubeScheduler": "Preempted",
    "DeletionByTaintManager": "NodeLost",
    "DeletionByPodGC": "NodeLost",
    "TerminationByKubelet": "Evicted",
    "EvictionByEvictionAPI": "Evicted",
}


@dataclass(frozen=True)
class Progress:
    pods: int
    scheduled: int
    running: int
    ready: int

    def describe(self, replicas: int) -> str:
        return (
            f"{self.scheduled}/{replicas} pods scheduled, {self.running}/{replicas} running, "
            f"{self.ready}/{replicas} ready"
        )


def _conditions(pod: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in (pod.get("status") or {}).get("conditions") or []}


def progress(pods: list[dict[str, Any]]) -> Progress:
    scheduled = running = ready = 0
    for pod in pods:
        cond = _conditions(pod)
        scheduled += cond.get("PodScheduled", {}).get("status") == "True"
        running += (pod.get("status") or {}).get("phase") == "Running"
        ready += cond.get("Ready", {}).get("status") == "True"
    return Progress(len(pods), scheduled, running, ready)


def _events_of(name: str, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    mine = [e for e in events if (e.get("involvedObject") or {}).get("name") == name]
    return sorted(mine, key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "")


def _container_problem(pod: dict[str, Any]) -> str | None:
    statuses = (pod.get("status") or {}).get("initContainerStatuses") or []
    statuses += (pod.get("status") or {}).get("containerStatuses") or []
    for status in statuses:
        waiting = (status.get("state") or {}).get("waiting")
        if waiting and waiting.get("reason") not in (None, "ContainerCreating", "PodInitializing"):
            text = f"container {status['name']}: {waiting['reason']}"
            last = (status.get("lastState") or {}).get("terminated")
            if last:
                text += f" (last exit {last.get('exitCode')}: {last.get('reason') or 'Error'})"
            if waiting.get("message"):
                text += f": {waiting['message']}"
            return text
        terminated = (status.get("state") or {}).get("terminated")
        if terminated and terminated.get("exitCode"):
            return (
                f"container {status['name']} exited {terminated['exitCode']}"
                f" ({terminated.get('reason') or 'Error'})"
            )
    return None


def not_ready_reasons(
    pods: list[dict[str, Any]],
    events: list[dict[str, Any]],
    replicas: int | None = None,
    owner: str | None = None,
) -> dict[str, str]:
    """Each pod that is not Ready -> why (unschedulable, image pull, crash loop, last warning);
    pods that do not exist are explained by the last warning on ``owner`` (the StatefulSet)."""
    reasons: dict[str, str] = {}
    for pod in pods:
        name = pod["metadata"]["name"]
        cond = _conditions(pod)
        if cond.get("Ready", {}).get("status") == "True":
            continue
        scheduled = cond.get("PodScheduled", {})
        warnings = [e for e in _events_of(name, events) if e.get("type") == "Warning"]
        if scheduled.get("status") == "False":
            why = f"{scheduled.get('reason', 'Unschedulable')}: {scheduled.get('message', '')}"
        else:
            why = _container_problem(pod) or (
                f"{warnings[-1].get('reason')}: {warnings[-1].get('message')}"
                if warnings
                else f"phase {(pod.get('status') or {}).get('phase', 'Pending')}"
            )
        if warnings and warnings[-1].get("message", "") not in why:
            why += f" (last event {warnings[-1].get('reason')}: {warnings[-1].get('message')})"
        reasons[name] = why.strip()
    if replicas is not None and len(pods) < replicas:
        why = f"only {len(pods)} of {replicas} pods exist"
        warnings = [e for e in _events_of(owner or "", events) if e.get("type") == "Warning"]
        if warnings:
            why += f" ({warnings[-1].get('reason')}: {warnings[-1].get('message')})"
        reasons["(missing)"] = why
    return reasons


def lost_reason(pod: dict[str, Any] | None, events: list[dict[str, Any]], name: str) -> str:
    """Why worker pod ``name`` went away, as Kubernetes knows it: ``OOMKilled``, ``Evicted``,
    ``Preempted``, ``NodeLost``, ``Deleted``, or a container's termination reason."""
    if pod is not None:
        status = pod.get("status") or {}
        if status.get("reason") in ("Evicted", "Preempting", "NodeLost", "Terminated"):
            return f"{status['reason']}: {status.get('message', '')}".rstrip(": ")
        target = _conditions(pod).get("DisruptionTarget")
        if target and target.get("status") == "True":
            return _DISRUPTIONS.get(target.get("reason", ""), target.get("reason", "Disrupted"))
        for cs in status.get("containerStatuses") or []:
            for state in (cs.get("state") or {}, cs.get("lastState") or {}):
                term = state.get("terminated")
                if term and term.get("reason") not in (None, "Completed"):
                    return str(term["reason"])
        if (pod.get("metadata") or {}).get("deletionTimestamp"):
            return "Deleted"
    for event in reversed(_events_of(name, events)):
        if event.get("reason") == names.RESTARTED_WORKER_REPLACED:
            # the operator deleted it for a new IP after its worker died: say why that died
            annotations = (event.get("metadata") or {}).get("annotations") or {}
            return str(annotations.get(names.EXIT_REASON_ANNOTATION) or "Restarted")
    for event in reversed(_events_of(name, events)):
        reason = event.get("reason", "")
        if reason in ("Evicted", "Preempted", "NodeNotReady", "OOMKilling", "Killing"):
            return {
                "Killing": "Deleted",
                "NodeNotReady": "NodeLost",
                "OOMKilling": "OOMKilled",
            }.get(reason, reason)
    return "Deleted" if pod is None else "Unknown"
