"""etcd-v2 rendezvous end to end: the operator (one install per session, ``conftest.py``) runs
the job's etcd (k8s-testenv's ``etcd-v2``: etcd 3.5 with ``--enable-v2``), the workers wait
for it, and 2 nodes x 2 gloo processes meet through it (torch's etcd-v2 backend,
``python-etcd``) and train the tiny model to ``Succeeded``; then the etcd goes.

The reopening of a rendezvous a failed attempt closed is run against the same etcd binary and
torch's own etcd-v2 rendezvous, without a cluster: as a job it needs a backoff retry whose
timing 2 loaded cores stretch (the other node's old agent can close the retried round too).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes.client as k8s
import pytest
import yaml
from k8s_testenv.build import ensure_binaries
from k8s_testenv.procs import free_port, log_tail, spawn, stop_groups
from k8s_testenv.testing import wait_until
from kubernetes.client.exceptions import ApiException
from torch.distributed.elastic.rendezvous import RendezvousClosedError, RendezvousParameters
from torch.distributed.elastic.rendezvous.registry import get_rendezvous_handler

from monarch_k8s.torchrun import names
from monarch_k8s.torchrun.etcd import TORCH_RDZV_KEY, WAIT_FOR_ETCD

CPU = Path(__file__).parents[4] / "examples" / "torchrun_cpu"


def create(api: Any, ns: str, doc: dict[str, Any], **spec: Any) -> None:
    plural = names.JOB_PLURAL if doc["kind"] == names.JOB_KIND else names.QUEUE_PLURAL
    body = {**doc, "spec": {**doc["spec"], **spec}}
    k8s.CustomObjectsApi(api).create_namespaced_custom_object(
        names.GROUP, names.VERSION, ns, plural, body
    )


def status(api: Any, ns: str) -> dict[str, Any]:
    job: Any = k8s.CustomObjectsApi(api).get_namespaced_custom_object(
        names.GROUP, names.VERSION, ns, names.JOB_PLURAL, "tiny"
    )
    return dict(job.get("status") or {})


def gone(read: Any, *args: Any) -> bool:
    try:
        read(*args)
    except ApiException as exc:
        return exc.status == 404
    return False


def pods_report(core: Any, ns: str) -> str:
    """Each of the job's pods (its etcd too): phase, restarts, why not running, log tail."""
    lines = []
    for pod in core.list_namespaced_pod(ns, label_selector=f"{names.JOB_LABEL}=tiny").items:
        states = pod.status.container_statuses or []
        waiting = [s.state.waiting.reason for s in states if s.state and s.state.waiting]
        restarts = sum(s.restart_count for s in states)
        try:
            log = core.read_namespaced_pod_log(pod.metadata.name, ns, tail_lines=8)
        except ApiException as exc:
            log = f"<no log: {exc.reason}>"
        lines.append(f"--- {pod.metadata.name} {pod.status.phase} restarts={restarts} {waiting}")
        lines.append(log)
    return "\n".join(lines)


def etcd_restarts(core: Any, ns: str) -> int:
    selector = f"{names.JOB_LABEL}=tiny,{names.ROLE_LABEL}=etcd"
    pods = core.list_namespaced_pod(ns, label_selector=selector).items
    return sum(s.restart_count for p in pods for s in p.status.container_statuses or [])


COMMAND = "python train.py --steps 40"


def test_two_nodes_rendezvous_through_the_jobs_etcd_and_train(
    k8s_api: Any, k8s_cluster: Any, monarch_operator: Any, k8s_namespace: str
) -> None:
    ns, core, apps = k8s_namespace, k8s.CoreV1Api(k8s_api), k8s.AppsV1Api(k8s_api)
    queue = yaml.safe_load((CPU / "queue.yaml").read_text())
    create(k8s_api, ns, queue, podDefaults={"workingDir": str(CPU)})  # train.py is there
    job = yaml.safe_load((CPU / "job.yaml").read_text())
    distributed = {"backend": "gloo", "rdzvBackend": "etcd-v2", "port": 29521}
    create(k8s_api, ns, job, command=COMMAND, distributed=distributed, backoffLimit=1)
    # `kubectl torchrun logs -f` from the start: it follows the workers (not the etcd pod, which
    # carries the job's label too and has no trainer container) until the job is done
    follow = subprocess.Popen(
        [str(k8s_cluster.kubectl_path), "torchrun", "-n", ns, "logs", "-f", "tiny"],
        env=k8s_cluster.kubectl_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip

    def finished() -> str | None:
        # an etcd that cannot start (its command missing: see conftest.py) fails here at once;
        # the workers would wait for it until the timeout
        assert etcd_restarts(core, ns) < 2, f"the job's etcd keeps failing\n{pods_report(core, ns)}"
        phase = status(k8s_api, ns).get("phase")
        return phase if phase in ("Succeeded", "Failed") else None

    try:  # ~30 s on 2 cores; bounded below pytest's 300 s so the report below is printed
        done = wait_until(finished, timeout=200, what="tiny finished", interval=0.5)
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {status(k8s_api, ns)}\n{pods_report(core, ns)}") from exc
    assert done == "Succeeded", f"{status(k8s_api, ns)}\n{pods_report(core, ns)}"
    try:
        followed, follow_err = follow.communicate(timeout=60)
    finally:
        follow.kill()
    assert follow.returncode == 0, follow_err
    assert "no logs" not in follow_err, follow_err
    for r in range(4):
        assert f"rank {r}/4 starting at step 0" in followed, followed
    assert {line.split("]")[0] for line in followed.splitlines()} == {"[rank 0", "[rank 1"}
    assert status(k8s_api, ns)["workers"] == {**status(k8s_api, ns)["workers"], "succeeded": 2}
    # the operator watched its etcd: the job's RendezvousReady condition saw it serve
    rendezvous = [c for c in status(k8s_api, ns)["conditions"] if c["type"] == "RendezvousReady"]
    assert [(c["status"], c["reason"]) for c in rendezvous] == [("True", "EtcdReady")], rendezvous
    pods = core.list_namespaced_pod(ns, label_selector=f"{names.JOB_LABEL}=tiny").items
    workers = [p for p in pods if p.metadata.labels[names.ROLE_LABEL] == "worker"]
    assert sorted(p.status.phase for p in workers) == ["Succeeded", "Succeeded"]
    endpoint = f"--rdzv-endpoint=etcd.tiny-etcd.{ns}.svc.cluster.local:2379"
    assert all(endpoint in p.spec.containers[0].command[-1] for p in workers)
    logs = "\n".join(core.read_namespaced_pod_log(p.metadata.name, ns) for p in workers)
    assert logs.count("etcd is ready") == 2, logs  # each worker waited for the etcd
    assert len(re.findall(r"rank \d/4 starting at step 0", logs)) == 4, logs  # 2 x 2 processes
    losses = [float(x) for x in re.findall(r"step \d+ loss ([\d.]+)", logs)]
    assert len(losses) == 40 and losses[-1] < losses[0] / 10, losses  # it learned
    # the finished job keeps its status and logs, not its etcd
    wait_until(lambda: gone(apps.read_namespaced_deployment, "tiny-etcd", ns), timeout=60,
             what="the etcd Deployment deleted")  # fmt: skip
    assert gone(core.read_namespaced_service, "tiny-etcd", ns)
    events = core.list_namespaced_event(ns, field_selector="involvedObject.name=tiny").items
    said = [e.message for e in events if e.reason == "Delete"]
    assert "the job finished: deleted Deployment tiny-etcd" in said, said


def test_the_wait_step_reopens_a_rendezvous_torchrun_closed_and_keeps_an_open_one(
    tmp_path: Path,
) -> None:
    port, peer = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "etcd.log"
    etcd = spawn([str(ensure_binaries().etcd_v2), "--enable-v2", f"--data-dir={tmp_path / 'data'}",
                  f"--listen-client-urls={url}", f"--advertise-client-urls={url}",
                  f"--listen-peer-urls=http://127.0.0.1:{peer}"], log=log, tie_to_parent=True)  # fmt: skip
    # the worker's first step, as rendered (with this Python: the image's has torch too)
    step = [sys.executable, "-c", WAIT_FOR_ETCD, url, f"{TORCH_RDZV_KEY}/u1"]
    params = RendezvousParameters("etcd-v2", f"127.0.0.1:{port}", "u1", 1, 1, last_call_timeout=1)
    try:
        ran = subprocess.run(step, capture_output=True, text=True, timeout=60)
        assert ran.returncode == 0 and "etcd is ready" in ran.stdout, (ran, log_tail(log))
        get_rendezvous_handler(params).shutdown()  # as torchrun's agent when its workers fail
        with pytest.raises(RendezvousClosedError):  # a retried node could never join
            get_rendezvous_handler(params).next_rendezvous()
        ran = subprocess.run(step, capture_output=True, text=True, timeout=60)
        assert "dropped the rendezvous an earlier attempt closed" in ran.stdout, ran
        handler = get_rendezvous_handler(params)
        met = handler.next_rendezvous()  # the retry meets
        assert (met.rank, met.world_size) == (0, 1)
        ran = subprocess.run(step, capture_output=True, text=True, timeout=60)
        assert ran.returncode == 0 and "dropped" not in ran.stdout, ran  # a live round stays
        assert not handler.is_closed()
        handler.shutdown()
    finally:
        stop_groups([etcd], grace=5)
