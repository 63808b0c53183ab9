"""The etcd a TorchrunJob with ``etcd-v2`` rendezvous meets through, when it gives no
``rdzvEndpoint``: a single-member etcd with the v2 API (etcd 3.5; 3.6 removed it), owned by
the job, and the step each worker runs before torchrun to wait for it. Pure, like
:mod:`.render`.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Any

from monarch_k8s.torchrun import names
from monarch_k8s.torchrun.objects import Options, job_labels, metadata
from monarch_k8s.torchrun.spec import Job

__all__ = ["EtcdState", "etcd_state", "render_etcd", "runs_etcd", "wait_for_etcd"]

Obj = dict[str, Any]
ETCD_DATA = "/var/lib/etcd"
#: a worker's first step: wait until the job's etcd answers (torch's etcd-v2 backend gives
#: up at its first refused connection), then drop the job's rendezvous if an earlier attempt
#: closed it (torchrun closes it when its workers fail, and a closed one refuses every node,
#: so a retried pod could never join). Compare-and-delete: only the closed version goes.
WAIT_FOR_ETCD = """\
import base64, json, pickle, sys, time, urllib.error, urllib.request as http
etcd, key = sys.argv[1], sys.argv[2]
print("waiting for etcd at", etcd, flush=True)
start = said = time.monotonic()
while True:
    try:
        with http.urlopen(etcd + "/health", timeout=2) as answer:
            if b'"health":"true"' in answer.read():
                break
    except OSError:
        pass
    if time.monotonic() - said >= 30:  # the job's status says why (its RendezvousReady condition)
        said = time.monotonic()
        print(f"still waiting for etcd after {said - start:.0f} s: see kubectl describe "
              "torchrunjob", flush=True)
    time.sleep(0.5)
try:
    with http.urlopen(etcd + "/v2/keys" + key, timeout=10) as answer:
        node = json.load(answer)["node"]
except urllib.error.HTTPError as error:
    if error.code != 404:
        raise
    node = None
if node and pickle.loads(base64.b64decode(node["value"])).closed:
    gone = f"{etcd}/v2/keys{key}?prevIndex={node['modifiedIndex']}"
    try:
        http.urlopen(http.Request(gone, method="DELETE"), timeout=10).close()
        print("dropped the rendezvous an earlier attempt closed", flush=True)
    except urllib.error.HTTPError as error:
        if error.code not in (404, 412):  # gone or changed: another worker dropped it
            raise
print("etcd is ready", flush=True)
"""
#: where torch's etcd-v2 backend keeps a rendezvous (``etcd_rendezvous_backend.create_backend``)
TORCH_RDZV_KEY = "/torch/elastic/rendezvous"


@dataclass(frozen=True)
class EtcdState:
    """Whether the job's etcd serves, and if not why, for the job's ``RendezvousReady``
    condition: ``failing`` when its container crashed or cannot start (a Warning, the workers
    would wait forever), not when it is merely starting."""

    ready: bool
    failing: bool = False
    message: str = "the job's etcd serves"


def etcd_state(pods: list[Obj]) -> EtcdState:
    """The etcd's state from its pods (as the API serializes them)."""
    if not pods:
        return EtcdState(False, message="the job's etcd has no pod yet")
    for pod in pods:
        conditions = (pod.get("status") or {}).get("conditions") or []
        if any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions):
            return EtcdState(True)
    pod = pods[0]
    name = pod["metadata"]["name"]
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    etcd = next((c for c in statuses if c.get("name") == "etcd"), None)
    if etcd is None:
        phase = (pod.get("status") or {}).get("phase") or "Pending"
        return EtcdState(False, message=f"the job's etcd (pod {name}) is {phase}")
    waiting = (etcd.get("state") or {}).get("waiting") or {}
    last = (etcd.get("lastState") or {}).get("terminated") or {}
    restarts = int(etcd.get("restartCount") or 0)
    reason = str(waiting.get("reason") or "")
    if restarts == 0 and reason in ("", "ContainerCreating", "PodInitializing"):
        return EtcdState(False, message=f"the job's etcd (pod {name}) is starting")
    said = [f"the job's etcd (pod {name}) does not serve: {reason or 'not ready'}"]
    if restarts:
        said.append(f"after {restarts} restart{'s' if restarts > 1 else ''}")
    if last:
        said.append(f"last exit {last.get('exitCode')} ({last.get('reason') or 'Error'})")
        if last.get("message"):
            said.append(str(last["message"]).strip()[-300:])
    if waiting.get("message"):
        said.append(str(waiting["message"]).strip()[-300:])
    said.append(f"the workers wait for it: kubectl logs {name} -n {pod['metadata']['namespace']}")
    return EtcdState(False, failing=True, message="; ".join(said))


def runs_etcd(job: Job) -> bool:
    """Whether the operator runs an etcd for the job: ``etcd-v2`` rendezvous across nodes,
    without an ``rdzvEndpoint``."""
    return job.rdzv_backend == "etcd-v2" and not job.rdzv_endpoint and not job.layout.standalone


def wait_for_etcd(job: Job) -> str:
    """The shell step that starts a worker: wait until the job's etcd answers ``/health``, and
    reopen a rendezvous an earlier attempt closed. Run with the worker's Python (the image has
    it and torch, as torchrun does), before torchrun each time the container starts (an
    ``OnFailure`` restart in place too, which an init container would not see)."""
    etcd = f"http://{names.etcd_host(job.name, job.namespace)}:{names.ETCD_PORT}"
    return shlex.join(["python", "-c", WAIT_FOR_ETCD, etcd, f"{TORCH_RDZV_KEY}/{job.rdzv_id}"])


def render_etcd(job: Job, opts: Options) -> list[Obj]:
    """A single-member etcd with the v2 API for ``etcd-v2`` rendezvous, owned by the job (and
    deleted once it finishes: :mod:`.reconcile`). Its pod is ``etcd`` under the headless Service
    ``J-etcd``: workers reach it at :func:`names.etcd_host`, listed (as DNS lists pods) once
    ``/health`` answers; the data is an ``emptyDir``, and ``Recreate`` never runs two."""
    name, labels = names.etcd_name(job.name), job_labels(job, "etcd")
    port = names.ETCD_PORT
    host = "$(POD_IP)" if opts.listen_host == "podIP" else "0.0.0.0"
    argv = [*opts.etcd_command, "--enable-v2", f"--data-dir={ETCD_DATA}", f"--name={name}"]
    argv += [f"--listen-client-urls=http://{host}:{port}"]
    argv += [f"--advertise-client-urls=http://{names.etcd_host(job.name, job.namespace)}:{port}"]
    argv += [f"--listen-peer-urls=http://{host}:{port + 1}"]  # one member: no peer dials it
    pod_ip = {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
    health = {"httpGet": {"path": "/health", "port": "client"}, "periodSeconds": 2}
    container = {"name": "etcd", "image": opts.etcd_image, "command": argv, "env": [pod_ip],
                 "ports": [{"name": "client", "containerPort": port}],
                 "readinessProbe": health,
                 "volumeMounts": [{"name": "data", "mountPath": ETCD_DATA}]}  # fmt: skip
    pod = {"hostname": "etcd", "subdomain": name, "containers": [container],
           "volumes": [{"name": "data", "emptyDir": {}}]}  # fmt: skip
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(job, name, labels),
        "spec": {
            "replicas": 1,
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": pod},
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(job, name, labels),
        "spec": {
            "clusterIP": "None",
            "selector": labels,
            "ports": [{"name": "client", "port": port}],
        },
    }
    return [deployment, service]
