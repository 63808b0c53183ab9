"""Why pods are not ready and why workers were lost, from pods and events as the API gives them."""

from __future__ import annotations

from typing import Any

from monarch_k8s import names
from monarch_k8s.pods import lost_reason, not_ready_reasons, progress


def pod(name: str, phase: str = "Pending", ready: bool = False, **status: Any) -> dict[str, Any]:
    conditions = [{"type": "PodScheduled", "status": "True"}]
    conditions.append({"type": "Ready", "status": "True" if ready else "False"})
    return {
        "metadata": {"name": name, "uid": f"uid-{name}"},
        "status": {"phase": phase, "conditions": conditions, **status},
    }


def event(name: str, reason: str, message: str, kind: str = "Warning") -> dict[str, Any]:
    return {
        "involvedObject": {"name": name, "uid": f"uid-{name}"},
        "type": kind,
        "reason": reason,
        "message": message,
        "lastTimestamp": "2026-01-01T00:00:00Z",
    }


def test_progress_counts_scheduled_running_and_ready() -> None:
    pods = [pod("a-0", "Running", True), pod("a-1", "Running"), pod("a-2")]
    now = progress(pods)
    assert (now.scheduled, now.running, now.ready) == (3, 2, 1)
    assert now.describe(4) == "3/4 pods scheduled, 2/4 running, 1/4 ready"


def test_not_ready_pods_are_named_with_their_reason() -> None:
    unschedulable = pod("m-0")
    unschedulable["status"]["conditions"][0] = {
        "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
        "message": "0/1 nodes are available: 1 Insufficient nvidia.com/gpu.",
    }  # fmt: skip
    pulling = pod("m-1", containerStatuses=[{
        "name": "worker", "state": {"waiting": {"reason": "ImagePullBackOff",
                                               "message": "Back-off pulling image \"nope\""}},
    }])  # fmt: skip
    crashing = pod("m-2", "Running", containerStatuses=[{
        "name": "worker", "state": {"waiting": {"reason": "CrashLoopBackOff"}},
        "lastState": {"terminated": {"exitCode": 1, "reason": "Error"}},
    }])  # fmt: skip
    fine = pod("m-3", "Running", True)
    reasons = not_ready_reasons(
        [unschedulable, pulling, crashing, fine],
        [
            event("m-2", "BackOff", "Back-off restarting failed container worker"),
            event("m", "FailedCreate", 'serviceaccount "x" not found'),
        ],
        replicas=5,
        owner="m",
    )
    assert reasons["m-0"].startswith("Unschedulable: 0/1 nodes are available")
    assert "ImagePullBackOff" in reasons["m-1"] and "nope" in reasons["m-1"]
    assert "CrashLoopBackOff (last exit 1: Error)" in reasons["m-2"]
    assert "Back-off restarting" in reasons["m-2"]
    assert "m-3" not in reasons
    assert reasons["(missing)"] == (
        'only 4 of 5 pods exist (FailedCreate: serviceaccount "x" not found)'
    )


def test_lost_workers_get_the_reason_kubernetes_knows() -> None:
    oom = pod("w-0", "Running", containerStatuses=[{
        "name": "worker", "state": {"waiting": {"reason": "CrashLoopBackOff"}},
        "lastState": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}},
    }])  # fmt: skip
    assert lost_reason(oom, [], "w-0") == "OOMKilled"
    evicted = pod("w-1", "Failed", reason="Evicted", message="The node was low on memory.")
    assert lost_reason(evicted, [], "w-1") == "Evicted: The node was low on memory."
    preempted = pod("w-2", "Running")
    preempted["status"]["conditions"].append(
        {"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler"}
    )
    assert lost_reason(preempted, [], "w-2") == "Preempted"
    gone = pod("w-3", "Running")
    gone["status"]["conditions"].append(
        {"type": "DisruptionTarget", "status": "True", "reason": "DeletionByTaintManager"}
    )
    assert lost_reason(gone, [], "w-3") == "NodeLost"
    assert (
        lost_reason(None, [event("w-4", "Killing", "Stopping container worker", "Normal")], "w-4")
        == "Deleted"
    )
    assert lost_reason(None, [event("w-5", "Preempted", "by p")], "w-5") == "Preempted"
    assert lost_reason(None, [], "w-6") == "Deleted"


def test_a_worker_whose_pod_the_operator_replaced_after_an_oom_kill_is_lost_to_oomkilled() -> None:
    """The operator deletes a pod whose worker restarted in place (operator/restarts.py); the
    kubelet's later Killing must not hide why the worker died."""
    replaced = event("w-7", names.RESTARTED_WORKER_REPLACED, "delete pod w-7 (IP ...)")
    replaced["metadata"] = {"annotations": {names.EXIT_REASON_ANNOTATION: "OOMKilled"}}
    killing = event("w-7", "Killing", "Stopping container sync-agent", "Normal")
    killing["lastTimestamp"] = "2026-01-01T00:00:01Z"
    assert lost_reason(None, [replaced, killing], "w-7") == "OOMKilled"
