"""TorchrunQueue and TorchrunJob on k8s-testenv's real control plane, served by the operator
running as a pod from the install manifests. Workers are real ``torchrun`` processes (torch
from PyPI, gloo on CPU) started by the process kubelet. One operator install for the module;
each test has its own namespace; jobs run one at a time (pods share the host's network, so
each job also gets its own rendezvous port).
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import kubernetes.client as k8s
import pytest
import yaml
from k8s_testenv.testing import wait_until
from kubernetes.client.exceptions import ApiException

from monarch_k8s.testing import operator_pod, pod_ready
from monarch_k8s.torchrun import names

OPERATOR_NS = "monarch-system"
EXAMPLES = Path(__file__).parents[4] / "examples"
DESIGN = EXAMPLES / "torchrun_design_examples.yaml"
CPU = EXAMPLES / "torchrun_cpu"


@pytest.fixture
def operator(k8s_cluster: Any, monarch_operator: Any) -> Any:
    """The cluster, with the operator installed once per session (``conftest.py``)."""
    return k8s_cluster


def custom(api: Any) -> k8s.CustomObjectsApi:
    return k8s.CustomObjectsApi(api)


def get(api: Any, ns: str, plural: str, name: str) -> dict[str, Any]:
    return custom(api).get_namespaced_custom_object(  # type: ignore[no-any-return]
        names.GROUP, names.VERSION, ns, plural, name
    )


def create(api: Any, ns: str, kind: str, name: str, spec: dict[str, Any]) -> None:
    plural = names.JOB_PLURAL if kind == names.JOB_KIND else names.QUEUE_PLURAL
    body = {"apiVersion": names.API_VERSION, "kind": kind, "metadata": {"name": name}, "spec": spec}
    custom(api).create_namespaced_custom_object(names.GROUP, names.VERSION, ns, plural, body)


def patch_job(api: Any, ns: str, name: str, spec: dict[str, Any]) -> None:
    custom(api).patch_namespaced_custom_object(
        names.GROUP, names.VERSION, ns, names.JOB_PLURAL, name, {"spec": spec}
    )


def phase(api: Any, ns: str, name: str) -> str | None:
    return (get(api, ns, names.JOB_PLURAL, name).get("status") or {}).get("phase")


def wait_phase(api: Any, ns: str, name: str, want: str, timeout: float = 240) -> dict[str, Any]:
    def reached() -> bool:
        now = phase(api, ns, name)
        if now in ("Succeeded", "Failed") and now != want:
            status = get(api, ns, names.JOB_PLURAL, name)["status"]
            raise AssertionError(f"{name} ended {now}, not {want}: {status}")
        return now == want

    wait_until(reached, timeout=timeout, what=f"TorchrunJob {name} {want}", interval=0.5)
    return get(api, ns, names.JOB_PLURAL, name)


def events(api: Any, ns: str, name: str) -> list[Any]:
    found = k8s.CoreV1Api(api).list_namespaced_event(
        ns, field_selector=f"involvedObject.name={name}"
    )
    return [e for e in found.items if e.involved_object.kind == names.JOB_KIND]


def cpu_queue(api: Any, ns: str) -> None:
    spec = yaml.safe_load((CPU / "queue.yaml").read_text())["spec"]
    spec["podDefaults"] = {"workingDir": str(CPU)}  # train.py is there
    create(api, ns, names.QUEUE_KIND, "cpu", spec)


def cpu_job(port: int, **spec: Any) -> dict[str, Any]:
    base = yaml.safe_load((CPU / "job.yaml").read_text())["spec"]
    base["distributed"]["port"] = port
    return {**base, **spec}


def worker_logs(api: Any, ns: str, job: str) -> str:
    core = k8s.CoreV1Api(api)
    pods = core.list_namespaced_pod(ns, label_selector=f"{names.JOB_LABEL}={job}").items
    return "\n".join(core.read_namespaced_pod_log(p.metadata.name, ns) for p in pods)


def last_step(api: Any, ns: str, job: str) -> int:
    return max(
        (int(s) for s in re.findall(r"step (\d+) loss", worker_logs(api, ns, job))), default=0
    )


def kubectl(cluster: Any, *args: str, stdin: str | None = None) -> tuple[int, str]:
    result = cluster.kubectl(*args, input=stdin.encode() if stdin is not None else None)
    return result.returncode, (result.stdout + result.stderr).decode()


def test_design_examples_apply_unchanged_and_queues_map_to_kai(
    operator: Any, k8s_api: Any, k8s_namespace: str
) -> None:
    ns = k8s_namespace
    rc, out = kubectl(operator, "apply", "-n", ns, "-f", str(DESIGN))
    assert rc == 0, out
    kai_crd = f"{names.KAI_PLURAL}.{names.KAI_GROUP}"

    def ready(queue: str) -> tuple[str, str] | None:
        status = get(k8s_api, ns, names.QUEUE_PLURAL, queue).get("status") or {}
        cond = next((c for c in status.get("conditions") or [] if c["type"] == "Ready"), None)
        return (cond["status"], cond["reason"]) if cond else None

    # no KAI here: a clear condition, not a crash; queues without kaiQueue are Ready
    wait_until(lambda: ready("gpu-training-queue") == ("False", "KaiSchedulerNotInstalled"),
             timeout=60, what="the KAI condition")  # fmt: skip
    wait_until(lambda: ready("dev-queue") == ("True", "Ready"), timeout=60, what="dev-queue Ready")
    # 16 GPUs on 8-GPU nodes: 2 pods of 8 processes, admitted whole; 96 CPUs a pod do not fit
    # k8s-testenv's 32-CPU nodes, so the job waits, Queued, with its objects made
    job = wait_phase(k8s_api, ns, "training-job", "Queued", timeout=90)
    assert (job["status"]["numNodes"], job["status"]["procsPerNode"]) == (2, 8)
    batch = k8s.BatchV1Api(k8s_api).read_namespaced_job("training-job", ns)
    assert batch.metadata.annotations[names.KAI_MIN_MEMBER] == "2"
    assert batch.metadata.labels[names.KAI_QUEUE_LABEL] == "gpu-training"
    pod = batch.spec.template.spec
    assert pod.scheduler_name == "kai-scheduler" and pod.priority_class_name == "gpu-priority"
    assert pod.containers[0].resources.requests["nvidia.com/gpu"] == "8"
    claims = {c.metadata.name: c.spec.resources.requests["storage"] for c in
              k8s.CoreV1Api(k8s_api).list_namespaced_persistent_volume_claim(ns).items}  # fmt: skip
    assert claims == {"training-job-workspace": str(160 * 2**30),
                      "training-job-checkpoints": str(800 * 2**30),
                      "vit-training-workspace": str(320 * 2**30)}  # fmt: skip
    # etcd-v2: the operator runs an etcd for the job (its own Deployment and Service)
    etcd = k8s.AppsV1Api(k8s_api).read_namespaced_deployment("training-job-etcd", ns)
    assert "--enable-v2" in etcd.spec.template.spec.containers[0].command
    rc, out = kubectl(operator, "get", "torchrunjobs", "-n", ns)
    assert re.search(r"NAME\s+QUEUE\s+GPUS\s+NODES\s+PHASE\s+WORKERS\s+AGE", out), out
    assert re.search(r"vit-training\s+h100-training\s+32\s+4\s+Queued\s+0/4", out), out

    # the KAI scheduler's Queue CRD appears: the queue is created and the queue becomes Ready
    kai = {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
           "metadata": {"name": kai_crd}, "spec": {
               "group": names.KAI_GROUP, "scope": "Cluster",
               "names": {"kind": "Queue", "plural": "queues", "singular": "queue", "listKind": "QueueList"},
               "versions": [{"name": "v2", "served": True, "storage": True, "schema": {
                   "openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}}}]}}  # fmt: skip
    ext = k8s.ApiextensionsV1Api(k8s_api)
    ext.create_custom_resource_definition(kai)
    try:
        wait_until(lambda: ready("gpu-training-queue") == ("True", "Ready"), timeout=60,
                 what="gpu-training-queue Ready with KAI")  # fmt: skip
        made = custom(k8s_api).get_cluster_custom_object(
            names.KAI_GROUP, names.KAI_VERSION, names.KAI_PLURAL, "gpu-training"
        )
        assert made["spec"]["parentQueue"] == "default"
        custom(k8s_api).patch_namespaced_custom_object(
            names.GROUP, names.VERSION, ns, names.QUEUE_PLURAL, "gpu-training-queue",
            {"spec": {"parentKaiQueue": "research"}},
        )  # fmt: skip

        def parent() -> str:
            got = custom(k8s_api).get_cluster_custom_object(
                names.KAI_GROUP, names.KAI_VERSION, names.KAI_PLURAL, "gpu-training"
            )
            return str(got["spec"].get("parentQueue"))

        wait_until(lambda: parent() == "research", timeout=60, what="the KAI parent followed")
        status = get(k8s_api, ns, names.QUEUE_PLURAL, "gpu-training-queue")["status"]
        assert (status["jobs"], status["activeJobs"]) == (1, 1)
        # the TorchrunQueue goes: so does its (cluster-scoped) KAI Queue
        rc, out = kubectl(operator, "delete", "-n", ns, "-f", str(DESIGN))
        assert rc == 0, out

        def kai_gone() -> bool:
            try:
                custom(k8s_api).get_cluster_custom_object(
                    names.KAI_GROUP, names.KAI_VERSION, names.KAI_PLURAL, "gpu-training"
                )
            except ApiException as exc:
                return exc.status == 404
            return False

        wait_until(kai_gone, timeout=60, what="the KAI Queue pruned")
    finally:
        ext.delete_custom_resource_definition(kai_crd)


BAD_SPECS = [
    ({"numGPUs": 0}, "spec.numGPUs"),
    ({"numGPUs": 1, "command": ""}, "spec.command"),
    ({"numGPUs": 1, "command": "   "}, "spec.command"),
    ({"numGPUs": 1, "distributed": {"rdzvBackend": "zookeeper"}}, "rdzvBackend"),
    ({"numGPUs": 8, "numNodes": 1}, "not both"),
    ({}, "spec.numGPUs"),
]


def test_bad_inputs_are_refused_or_fail_with_a_reason(
    operator: Any, k8s_api: Any, k8s_namespace: str
) -> None:
    ns = k8s_namespace
    for spec, says in BAD_SPECS:  # what the schema can say, it says at once
        doc = {"apiVersion": names.API_VERSION, "kind": names.JOB_KIND, "metadata": {"name": "bad"},
               "spec": {"jobQueue": "q", "command": "python train.py", **spec}}  # fmt: skip
        rc, out = kubectl(operator, "apply", "-n", ns, "-f", "-", stdin=yaml.safe_dump(doc))
        assert rc != 0 and says in out, (spec, out)
    create(k8s_api, ns, names.QUEUE_KIND, "small",
           {"image": "i", "nodeResources": {"gpus": 8, "maxNodes": 2}})  # fmt: skip
    # what it cannot: the job ends Failed, with a reason and a Warning Event saying what to do
    cases = {
        "noqueue": ({"jobQueue": "nope", "numGPUs": 1}, "QueueNotFound", "no TorchrunQueue"),
        "toobig": ({"jobQueue": "small", "numGPUs": 64}, "TooManyGPUs", "ask for fewer"),
    }
    for name, (spec, _, _) in cases.items():
        create(k8s_api, ns, names.JOB_KIND, name, {"command": "python train.py", **spec})
    for name, (_, reason, says) in cases.items():
        status = wait_phase(k8s_api, ns, name, "Failed", timeout=60)["status"]
        assert status["reason"] == reason and says in status["message"], status
        warnings = [e for e in events(k8s_api, ns, name) if e.type == "Warning"]
        assert any(e.reason == reason and says in e.message for e in warnings), warnings
    assert not k8s.BatchV1Api(k8s_api).list_namespaced_job(ns).items  # nothing ran
    # a queue whose quantity does not parse: not Valid, and a job on it fails saying why
    create(k8s_api, ns, names.QUEUE_KIND, "typo",
           {"image": "i", "nodeResources": {"gpus": 1, "memory": "lots"}})  # fmt: skip
    create(k8s_api, ns, names.JOB_KIND, "ontypo",
           {"jobQueue": "typo", "numGPUs": 1, "command": "python train.py"})  # fmt: skip
    status = wait_phase(k8s_api, ns, "ontypo", "Failed", timeout=60)["status"]
    assert status["reason"] == "QueueInvalid" and "nodeResources.memory" in status["message"]
    valid = next(c for c in get(k8s_api, ns, names.QUEUE_PLURAL, "typo")["status"]["conditions"]
                 if c["type"] == "Valid")  # fmt: skip
    assert (valid["status"], valid["reason"]) == ("False", "InvalidQuantity")
    # what the operator reads of a job cannot change under it
    with pytest.raises(ApiException) as refused:
        patch_job(k8s_api, ns, "toobig", {"numGPUs": 8})
    assert "spec.numGPUs is immutable" in str(refused.value.body)


def test_two_nodes_two_procs_train_to_succeeded_across_an_operator_restart(
    operator: Any, k8s_api: Any, k8s_namespace: str
) -> None:
    ns = k8s_namespace
    cpu_queue(k8s_api, ns)
    create(
        k8s_api,
        ns,
        names.JOB_KIND,
        "tiny",
        cpu_job(29511, command="python train.py --steps 40 --step-seconds 0.2"),
    )
    running = wait_phase(k8s_api, ns, "tiny", "Running")["status"]
    assert running["workers"]["ready"] == 2 and running["startTime"]
    # its queue is deleted and the operator dies mid-run: the replacement picks the job up
    # where it is, with the queue as the job was created with it
    custom(k8s_api).delete_namespaced_custom_object(
        names.GROUP, names.VERSION, ns, names.QUEUE_PLURAL, "cpu"
    )
    old = operator_pod(k8s_api, OPERATOR_NS)
    k8s.CoreV1Api(k8s_api).delete_namespaced_pod(
        old.metadata.name, OPERATOR_NS, grace_period_seconds=0
    )
    done = wait_phase(k8s_api, ns, "tiny", "Succeeded")["status"]
    new = operator_pod(k8s_api, OPERATOR_NS)
    assert new is not None and new.metadata.uid != old.metadata.uid and pod_ready(new)
    assert done["completionTime"] >= done["startTime"]
    assert done["workers"]["succeeded"] == 2
    logs = worker_logs(k8s_api, ns, "tiny")
    assert len(re.findall(r"rank \d/4 starting at step 0", logs)) == 4, logs  # 2 x 2 processes
    losses = [float(x) for x in re.findall(r"step \d+ loss ([\d.]+)", logs)]
    assert len(losses) == 40 and losses[-1] < losses[0] / 10, losses  # it learned
    reasons = [e.reason for e in events(k8s_api, ns, "tiny")]
    # an Event for each transition, and for each object made
    for reason in ("WorkersPending", "WorkersReady", "Completed", "Create"):
        assert reason in reasons, reasons


def test_suspend_mid_run_stops_the_workers_and_resume_continues_from_the_checkpoint(
    operator: Any, k8s_api: Any, k8s_namespace: str
) -> None:
    ns = k8s_namespace
    core = k8s.CoreV1Api(k8s_api)
    cpu_queue(k8s_api, ns)
    create(k8s_api, ns, names.JOB_KIND, "pausable",
           cpu_job(29512, command="python train.py --steps 24 --step-seconds 0.4",
                   procsPerNode=1))  # fmt: skip
    wait_phase(k8s_api, ns, "pausable", "Running")
    wait_until(lambda: last_step(k8s_api, ns, "pausable") >= 4, timeout=120, what="four steps")
    patch_job(k8s_api, ns, "pausable", {"suspend": True})
    wait_phase(k8s_api, ns, "pausable", "Suspended", timeout=60)
    selector = f"{names.JOB_LABEL}=pausable"
    wait_until(lambda: not core.list_namespaced_pod(ns, label_selector=selector).items,
             timeout=60, what="the workers stopped")  # fmt: skip
    assert core.read_namespaced_persistent_volume_claim("pausable-checkpoints", ns)
    patch_job(k8s_api, ns, "pausable", {"suspend": False})
    wait_phase(k8s_api, ns, "pausable", "Succeeded", timeout=300)
    logs = worker_logs(k8s_api, ns, "pausable")  # the pods of the resumed run
    resumed = [int(s) for s in re.findall(r"rank \d/2 starting at step (\d+)", logs)]
    assert len(resumed) == 2 and min(resumed) >= 4, logs
    assert "step 24 loss" in logs
    reasons = [e.reason for e in events(k8s_api, ns, "pausable")]
    assert {"Suspend", "Suspended", "Resume"} <= set(reasons), reasons


def test_failing_script_exhausts_its_backoff_a_deadline_ends_a_long_run_and_ttl_removes_it(
    operator: Any, k8s_api: Any, k8s_namespace: str
) -> None:
    ns = k8s_namespace
    cpu_queue(k8s_api, ns)
    spec = cpu_job(29513, command="python -c 'raise SystemExit(3)'", numNodes=1, procsPerNode=1,
                   backoffLimit=1)  # fmt: skip
    create(k8s_api, ns, names.JOB_KIND, "broken", spec)
    late = cpu_job(29517, command="python train.py --steps 1000 --step-seconds 1", numNodes=1,
                   procsPerNode=1, activeDeadlineSeconds=5, ttlSecondsAfterFinished=10)  # fmt: skip
    create(k8s_api, ns, names.JOB_KIND, "late", late)
    late_status = wait_phase(k8s_api, ns, "late", "Failed")["status"]  # first: its TTL runs
    assert late_status["reason"] == "DeadlineExceeded", late_status
    status = wait_phase(k8s_api, ns, "broken", "Failed")["status"]
    assert status["reason"] == "BackoffLimitExceeded", status
    assert "spec.backoffLimit=1" in status["message"]
    assert status["workers"]["failed"] == 2  # the first try and one retry
    assert any(e.type == "Warning" and e.reason == "BackoffLimitExceeded"
               for e in events(k8s_api, ns, "broken"))  # fmt: skip

    # ten seconds after it finished, the late job is deleted, with what it owned
    def gone() -> bool:
        try:
            get(k8s_api, ns, names.JOB_PLURAL, "late")
        except ApiException as exc:
            return exc.status == 404
        return False

    wait_until(gone, timeout=60, what="the TorchrunJob deleted by its TTL")
    batch = k8s.BatchV1Api(k8s_api)
    names_left = lambda: {j.metadata.name for j in batch.list_namespaced_job(ns).items}  # noqa: E731
    wait_until(lambda: names_left() == {"broken"}, timeout=60, what="its Job collected")
    time.sleep(6)  # three resync periods later nothing came back
    assert gone() and names_left() == {"broken"}
    selector = f"{names.JOB_LABEL}=late"
    assert not k8s.CoreV1Api(k8s_api).list_namespaced_pod(ns, label_selector=selector).items
    assert get(k8s_api, ns, names.JOB_PLURAL, "broken")  # no TTL reached: kept


def test_static_rendezvous_resolves_worker_zero_through_the_headless_service(
    operator: Any, k8s_api: Any, k8s_namespace: str
) -> None:
    ns = k8s_namespace
    cpu_queue(k8s_api, ns)
    spec = cpu_job(29515, command="python train.py --steps 3", procsPerNode=1,
                   distributed={"backend": "gloo", "rdzvBackend": "static", "port": 29515})  # fmt: skip
    create(k8s_api, ns, names.JOB_KIND, "fixed", spec)
    wait_phase(k8s_api, ns, "fixed", "Succeeded")
    logs = worker_logs(k8s_api, ns, "fixed")
    assert len(re.findall(r"rank \d/2 starting at step 0", logs)) == 2, logs
    service = k8s.CoreV1Api(k8s_api).read_namespaced_service("fixed", ns)
    assert service.spec.cluster_ip == "None"


def test_an_elastic_job_trains_on_the_nodes_it_gets(
    operator: Any, k8s_api: Any, k8s_namespace: str
) -> None:
    ns = k8s_namespace
    cpu_queue(k8s_api, ns)
    spec = cpu_job(29518, command="python train.py --steps 3", procsPerNode=1, minNodes=1,
                   maxNodes=2)  # fmt: skip
    del spec["numNodes"]
    create(k8s_api, ns, names.JOB_KIND, "stretchy", spec)
    done = wait_phase(k8s_api, ns, "stretchy", "Succeeded")["status"]
    assert (done["minNodes"], done["numNodes"]) == (1, 2)
    batch = k8s.BatchV1Api(k8s_api).read_namespaced_job("stretchy", ns)
    assert "--nnodes=1:2" in batch.spec.template.spec.containers[0].command[-1]
    logs = worker_logs(k8s_api, ns, "stretchy")
    assert re.search(r"rank 0/[12] starting at step 0", logs), logs
    assert "step 3 loss" in logs
