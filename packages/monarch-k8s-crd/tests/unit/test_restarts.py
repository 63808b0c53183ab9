"""Which worker pods the operator deletes for a new IP (``operator/restarts.py``), as a pure
function of the pod as the API returns it and what the operator recorded on it."""

from __future__ import annotations

from typing import Any

from monarch_k8s import names
from monarch_k8s.operator.restarts import Fence, Mark, decide

OOM = {"exitCode": 137, "reason": "OOMKilled", "startedAt": "t0", "finishedAt": "t1"}


def container(name: str, *, restarts: int = 0, ready: bool = True, state: str = "running",
              last: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    now = {"running": {"startedAt": "t"}, "waiting": {"reason": "CrashLoopBackOff"},
           "terminated": {"exitCode": 1, "reason": "Error"}}[state]  # fmt: skip
    return {"name": name, "ready": ready, "restartCount": restarts, "state": {state: now},
            "lastState": {"terminated": last} if last else {}}  # fmt: skip


def pod(*containers: dict[str, Any], seen: str | None = None, owner: str = "mesh",
        phase: str = "Running", deleting: bool = False) -> dict[str, Any]:  # fmt: skip
    meta: dict[str, Any] = {
        "name": "mesh-1", "uid": "uid-1", "resourceVersion": "41",
        "ownerReferences": [{"kind": "StatefulSet", "name": owner, "controller": True}],
    }  # fmt: skip
    if seen is not None:
        meta["annotations"] = {names.READY_RESTARTS_ANNOTATION: seen}
    if deleting:
        meta["deletionTimestamp"] = "2026-12-01T12:00:00Z"
    status = {"phase": phase, "podIP": "10.0.0.7", "containerStatuses": list(containers)}
    return {"metadata": meta, "status": status}


def judge(p: dict[str, Any]) -> Fence | Mark | None:
    return decide(p, container="worker", statefulset="mesh")


def test_a_ready_worker_is_recorded_once_at_its_restart_count() -> None:
    assert judge(pod(container("worker"))) == Mark("mesh-1", "41", 0)
    assert judge(pod(container("worker"), seen="0")) is None
    assert judge(pod(container("worker", ready=False))) is None  # not yet: nothing attached it
    assert judge(pod(container("worker"), seen="garbled")) == Mark("mesh-1", "41", 0)


def test_a_worker_seen_ready_that_died_gets_its_pod_deleted_naming_ip_and_exit() -> None:
    # the process kubelet (and a kubelet in back-off) shows the dead run before the restart
    waiting = container("worker", ready=False, state="waiting", last=OOM)
    fence = judge(pod(waiting, seen="0"))
    assert fence == Fence("mesh-1", "uid-1", "10.0.0.7", "exit code 137, OOMKilled", "OOMKilled")
    assert "mesh-1 (IP 10.0.0.7)" in fence.message()
    assert "cannot attach" in fence.message()
    # restarted already, even Ready again at the same IP: the gateway cannot attach it either
    again = container("worker", restarts=1, last=OOM)
    assert isinstance(judge(pod(again, seen="0")), Fence)
    # a later record (Ready after an earlier crash before Ready) counts from there
    assert judge(pod(container("worker", restarts=2, last=OOM), seen="2")) is None
    assert isinstance(judge(pod(container("worker", restarts=3, last=OOM), seen="2")), Fence)
    # no lastState reported at all (a terminated run without details)
    gone = judge(pod(container("worker", ready=False, state="terminated"), seen="0"))
    assert isinstance(gone, Fence) and (gone.why, gone.reason) == ("exit code 1, Error", "Error")
    bare = container("worker", restarts=1, last={"exitCode": 3})
    assert judge(pod(bare, seen="0")).reason == "exit code 3"  # type: ignore[union-attr]


def test_a_worker_that_crashes_before_it_was_ever_ready_is_left_to_the_kubelets_back_off() -> None:
    # deleting it would churn pods without back-off and lose the restart count that diagnoses it
    looping = container("worker", restarts=5, ready=False, state="waiting", last=OOM)
    assert judge(pod(looping)) is None


def test_only_the_worker_container_counts_not_the_sync_agent_sidecar() -> None:
    agent = container("sync-agent", restarts=3, ready=False, state="waiting", last=OOM)
    assert judge(pod(container("worker"), agent, seen="0")) is None
    assert judge(pod(agent, container("worker"))) == Mark("mesh-1", "41", 0)


def test_pods_not_of_the_mesh_statefulset_or_on_their_way_out_are_left_alone() -> None:
    dead = container("worker", restarts=1, last=OOM)
    assert judge(pod(dead, seen="0", owner="other")) is None  # attach mode, someone else's
    assert judge(pod(dead, seen="0", deleting=True)) is None  # deleted already: no second time
    assert judge(pod(dead, seen="0", phase="Failed")) is None  # its controller replaces it
    # the recreated pod: no record, not Ready yet
    assert judge(pod(container("worker", ready=False))) is None
