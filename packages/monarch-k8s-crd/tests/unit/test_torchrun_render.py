"""A TorchrunJob's objects and status as plain functions: torchrun's flags, the Job (gang
annotations, Kueue label, suspend, backoff, deadline), storage, and phases with reasons."""

from __future__ import annotations

import shlex
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from monarch_k8s.torchrun import names
from monarch_k8s.torchrun.etcd import WAIT_FOR_ETCD, EtcdState, etcd_state
from monarch_k8s.torchrun.objects import Options
from monarch_k8s.torchrun.render import render_children, render_job, torchrun_argv
from monarch_k8s.torchrun.spec import JobSpecError, parse_job, parse_queue
from monarch_k8s.torchrun.status import (
    PHASES,
    JobObserved,
    job_status,
    spec_error_status,
    ttl_expired,
)

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
QUEUE = {
    "kaiQueue": "gpu-training",
    "kueueQueue": "team-a",
    "image": "img",
    "nodeResources": {"gpus": 8, "cpus": 96, "memory": "512Gi"},
    "storage": {
        "shmSizePerGPU": "8Gi",
        "workspace": {"enabled": True, "sizePerGPU": "10Gi"},
        "checkpoints": {"enabled": True, "sizePerGPU": "50Gi", "persistent": True},
    },
    "scheduling": {"scheduler": "kai-scheduler", "priorityClassName": "gpu-priority"},
}


def make(spec: dict[str, Any], queue: dict[str, Any] = QUEUE, status: Any = None) -> Any:
    q = parse_queue({"metadata": {"name": "q", "namespace": "ns"}, "spec": queue})
    body = {"metadata": {"name": "j", "namespace": "ns", "uid": "u1", "generation": 1},
            "spec": {"jobQueue": "q", "command": "python train.py --epochs 3", **spec},
            "status": status or {}}  # fmt: skip
    return parse_job(body, q)


def test_multi_node_argv() -> None:
    argv = torchrun_argv(make({"numGPUs": 16}))
    assert argv[:2] == ["torchrun", "--nproc-per-node=8"]
    assert "--nnodes=2" in argv and "--node-rank=$(JOB_COMPLETION_INDEX)" in argv
    assert "--rdzv-backend=c10d" in argv and "--rdzv-id=u1" in argv
    assert "--rdzv-endpoint=j-0.j.ns.svc.cluster.local:29500" in argv
    assert argv[-4:] == ["--no-python", "/bin/sh", "-c", "python train.py --epochs 3"]


def test_single_node_is_standalone_and_elastic_is_a_range() -> None:
    single = torchrun_argv(make({"numGPUs": 4}))
    assert "--standalone" in single and not any(a.startswith("--rdzv") for a in single)
    elastic = torchrun_argv(make({"minNodes": 1, "maxNodes": 3}))
    assert "--nnodes=1:3" in elastic and "--standalone" not in elastic


def test_etcd_v2_gets_an_etcd_unless_an_endpoint_is_given_or_one_node_needs_none() -> None:
    job = make({"numGPUs": 16, "distributed": {"rdzvBackend": "etcd-v2"}})
    children = {(o["kind"], o["metadata"]["name"]): o for o in render_children(job, Options())}
    deployment, service = children["Deployment", "j-etcd"], children["Service", "j-etcd"]
    # the etcd pod's own DNS name (hostname under the headless Service): no Service DNS needed
    pod = deployment["spec"]["template"]["spec"]
    assert (pod["hostname"], pod["subdomain"]) == ("etcd", "j-etcd")
    assert service["spec"]["clusterIP"] == "None"
    etcd = pod["containers"][0]
    assert "--advertise-client-urls=http://etcd.j-etcd.ns.svc.cluster.local:2379" in etcd["command"]
    assert etcd["readinessProbe"]["httpGet"]["path"] == "/health"
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}  # never two members
    assert "--rdzv-endpoint=etcd.j-etcd.ns.svc.cluster.local:2379" in torchrun_argv(job)
    # workers wait for it (torch's etcd-v2 backend fails at its first refused connection), at
    # every start, and reopen the job's rendezvous if an earlier attempt closed it
    step = shlex.join(["python", "-c", WAIT_FOR_ETCD, "http://etcd.j-etcd.ns.svc.cluster.local:2379",
                       "/torch/elastic/rendezvous/u1"])  # fmt: skip
    trainer = render_job(job, Options(), suspend=False)["spec"]["template"]["spec"]["containers"][0]
    assert trainer["command"][-1].startswith(f"{step} && exec torchrun ")
    for spec in ({"numGPUs": 16, "distributed": {"rdzvBackend": "etcd-v2", "rdzvEndpoint": "e:1"}},
                 {"numGPUs": 4, "distributed": {"rdzvBackend": "etcd-v2"}}):  # fmt: skip
        other = make(spec)
        assert not any(o["kind"] == "Deployment" for o in render_children(other, Options()))
        trainer = render_job(other, Options(), suspend=False)["spec"]["template"]["spec"]
        assert trainer["containers"][0]["command"][-1].startswith("exec torchrun ")


def test_job_gang_storage_and_lifecycle_fields() -> None:
    job = make({"numGPUs": 16, "backoffLimit": 2, "activeDeadlineSeconds": 60,
                "restartPolicy": "OnFailure"})  # fmt: skip
    batch = render_job(job, Options(), suspend=False)
    meta, spec = batch["metadata"], batch["spec"]
    assert meta["annotations"][names.KAI_MIN_MEMBER] == "2"  # admitted whole
    assert meta["labels"][names.KUEUE_QUEUE_LABEL] == "team-a"
    assert meta["labels"][names.KAI_QUEUE_LABEL] == "gpu-training"
    assert (spec["completions"], spec["parallelism"], spec["completionMode"]) == (2, 2, "Indexed")
    assert (spec["backoffLimit"], spec["activeDeadlineSeconds"]) == (2, 60)
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "OnFailure" and pod["subdomain"] == "j"
    assert pod["schedulerName"] == "kai-scheduler"
    assert pod["priorityClassName"] == "gpu-priority"
    container = pod["containers"][0]
    assert container["resources"]["requests"] == {
        "cpu": "96000m", "memory": str(512 * 2**30), "nvidia.com/gpu": "8"}  # fmt: skip
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["shm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": str(64 * 2**30)}
    assert volumes["workspace"]["persistentVolumeClaim"]["claimName"] == "j-workspace"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts == {"shm": "/dev/shm", "workspace": "/app", "checkpoints": "/checkpoints"}
    claims = {o["metadata"]["name"]: o for o in render_children(job, Options())
              if o["kind"] == "PersistentVolumeClaim"}  # fmt: skip
    assert claims["j-workspace"]["spec"]["resources"]["requests"]["storage"] == str(160 * 2**30)
    assert "ownerReferences" in claims["j-workspace"]["metadata"]
    assert "ownerReferences" not in claims["j-checkpoints"]["metadata"]  # persistent


def test_partial_node_takes_its_share_of_cpu_and_memory() -> None:
    requests = render_job(make({"numGPUs": 12}), Options(), suspend=False)["spec"]["template"][
        "spec"
    ]["containers"][0]["resources"]["requests"]
    assert requests == {"cpu": "72000m", "memory": str(384 * 2**30), "nvidia.com/gpu": "6"}


def batch_job(**status: Any) -> dict[str, Any]:
    conditions = status.pop("conditions", [])
    return {"spec": status.pop("spec", {}), "status": {**status, "conditions": conditions}}


@pytest.mark.parametrize(
    ("spec", "seen", "phase", "reason"),
    [
        ({}, JobObserved(), "Pending", "Creating"),
        (
            {},
            JobObserved(workspace_ready=False, workspace_message="w"),
            "Syncing",
            "WorkspaceSyncing",
        ),
        (
            {},
            JobObserved(batch_job=batch_job(spec={"suspend": True})),
            "Queued",
            "AwaitingAdmission",
        ),
        ({}, JobObserved(batch_job=batch_job(active=2, ready=1)), "Queued", "WorkersPending"),
        ({}, JobObserved(batch_job=batch_job(active=2, ready=2)), "Running", "WorkersReady"),
        (
            {},
            JobObserved(batch_job=batch_job(active=2, ready=2), etcd=EtcdState(True)),
            "Running",
            "WorkersReady",
        ),
        (  # ready workers without their etcd are waiting, not running
            {},
            JobObserved(batch_job=batch_job(active=2, ready=2), etcd=EtcdState(False)),
            "Queued",
            "EtcdStarting",
        ),
        (  # a failing etcd is what the user must hear about, before workers pending
            {},
            JobObserved(batch_job=batch_job(active=2, ready=0), etcd=EtcdState(False, True)),
            "Queued",
            "EtcdFailing",
        ),
        ({"suspend": True}, JobObserved(batch_job=batch_job()), "Suspended", "Suspended"),
        (
            {},
            JobObserved(
                batch_job=batch_job(
                    succeeded=2, conditions=[{"type": "Complete", "status": "True"}]
                )
            ),
            "Succeeded",
            "Completed",
        ),
        (
            {},
            JobObserved(
                batch_job=batch_job(
                    failed=3,
                    conditions=[
                        {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}
                    ],
                )
            ),
            "Failed",
            "BackoffLimitExceeded",
        ),
    ],
)
def test_phases(spec: dict[str, Any], seen: JobObserved, phase: str, reason: str) -> None:
    status = job_status(make({"numGPUs": 16, **spec}), seen, now=NOW)
    assert (status["phase"], status["reason"]) == (phase, reason)
    assert status["phase"] in PHASES
    types = {c["type"]: c["status"] for c in status["conditions"]}
    assert types["Running"] == ("True" if phase == "Running" else "False")
    if phase in ("Succeeded", "Failed"):
        assert status["completionTime"]
    if seen.etcd is None:
        assert "RendezvousReady" not in types
    else:
        assert types["RendezvousReady"] == ("True" if seen.etcd.ready else "False")


def etcd_pod(*, ready: bool = False, phase: str = "Running", **container: Any) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": phase}
    status["conditions"] = [{"type": "Ready", "status": "True" if ready else "False"}]
    if container:
        status["containerStatuses"] = [{"name": "etcd", **container}]
    return {"metadata": {"name": "tiny-etcd-x1", "namespace": "ns"}, "status": status}


def test_etcd_state_tells_starting_from_failing_and_says_why() -> None:
    assert etcd_state([]) == EtcdState(False, message="the job's etcd has no pod yet")
    assert etcd_state([etcd_pod(), etcd_pod(ready=True)]).ready
    assert etcd_state([etcd_pod(phase="Pending")]).message.endswith("is Pending")
    starting = etcd_state([etcd_pod(restartCount=0, state={"running": {}})])
    assert (starting.ready, starting.failing) == (False, False)
    creating = etcd_pod(restartCount=0, state={"waiting": {"reason": "ContainerCreating"}})
    assert not etcd_state([creating]).failing
    # the etcd's command not on PATH: exec fails, the kubelet backs off (what CI once hit)
    crashing = etcd_pod(
        restartCount=3,
        state={"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s"}},
        lastState={"terminated": {"exitCode": 127, "reason": "Error",
                                  "message": "exec: etcd: not found\n"}},
    )  # fmt: skip
    state = etcd_state([crashing])
    assert (state.ready, state.failing) == (False, True)
    for said in ("CrashLoopBackOff", "3 restarts", "last exit 127 (Error)",
                 "exec: etcd: not found", "back-off 40s", "kubectl logs tiny-etcd-x1 -n ns"):  # fmt: skip
        assert said in state.message, (said, state.message)
    unpullable = etcd_pod(restartCount=0, state={"waiting": {"reason": "ImagePullBackOff"}})
    assert etcd_state([unpullable]).failing


def test_final_phase_sticks_and_ttl_counts_from_completion() -> None:
    done = {"phase": "Succeeded", "completionTime": "2026-12-01T11:59:00Z", "reason": "Completed"}
    job = make({"numGPUs": 16}, status=done)
    assert job_status(job, JobObserved(), now=NOW)["phase"] == "Succeeded"  # Job gone: still
    body = {"spec": {"ttlSecondsAfterFinished": 60}, "status": done}
    assert ttl_expired(body, NOW)
    assert not ttl_expired(body, NOW - timedelta(seconds=1))
    assert not ttl_expired({"spec": {}, "status": done}, NOW)


def test_spec_error_is_failed_with_its_reason() -> None:
    body = {"metadata": {"name": "j", "generation": 1}, "spec": {"jobQueue": "nope"}}
    status = spec_error_status(body, JobSpecError("QueueNotFound", "no queue"), now=NOW)
    assert (status["phase"], status["reason"]) == ("Failed", "QueueNotFound")
    assert {c["type"]: c["status"] for c in status["conditions"]} == {"Valid": "False",
                                                                      "Failed": "True"}  # fmt: skip


def test_the_job_carries_its_queue_as_created() -> None:
    import json

    batch = render_job(make({"numGPUs": 8}), Options(), suspend=False)
    snapshot = json.loads(batch["metadata"]["annotations"][names.QUEUE_SNAPSHOT_ANNOTATION])
    assert snapshot == QUEUE


def test_a_queue_quantity_that_does_not_parse_fails_the_job() -> None:
    bad = {**QUEUE, "nodeResources": {"gpus": 8, "memory": "lots"}}
    with pytest.raises(JobSpecError) as err:
        make({"numGPUs": 8}, queue=bad)
    assert err.value.reason == "QueueInvalid" and "nodeResources.memory" in str(err.value)
    with pytest.raises(JobSpecError) as err:
        make({"numGPUs": 8, "storage": {"workspace": {"sizePerGPU": "big"}}})
    assert err.value.reason == "InvalidQuantity"
