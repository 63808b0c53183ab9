"""TorchrunQueue and TorchrunJob bodies in, typed settings out: parsing, the per-job overrides
of queue settings, and the GPU distribution rule. Pure: no I/O, no clock.

**The GPU distribution rule** (``numGPUs`` on a queue of ``G`` GPUs per node; torchrun runs the
same number of processes on every node, one per GPU):

1. ``numGPUs <= G``: one node with ``numGPUs`` processes (one node is fastest).
2. otherwise the fewest nodes ``n >= ceil(numGPUs / G)`` that split ``numGPUs`` evenly, each
   node running ``numGPUs / n`` processes; the remainder is spread, not left on a partial last
   node (``12`` on 8-GPU nodes: 2 x 6, not 8 + 4, which torchrun cannot express).
3. a queue that caps its nodes (``nodeResources.maxNodes``) rejects a job needing more
   (``numGPUs > G * maxNodes``, or no even split within the cap): ``TooManyGPUs``.

``numNodes`` asks for whole nodes instead: ``G`` processes each (``procsPerNode`` overrides,
and is how CPU-only queues, ``G = 0``, say how many). ``minNodes``/``maxNodes`` make the job
elastic: up to ``maxNodes`` pods, torchrun ``--nnodes=min:max``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from kubernetes.utils import parse_quantity

from monarch_k8s.torchrun import names

__all__ = [
    "Job",
    "JobSpecError",
    "Layout",
    "NodeResources",
    "Queue",
    "Storage",
    "VolumeSpec",
    "distribute",
    "merge",
    "parse_job",
    "parse_queue",
    "queue_problem",
]

Obj = dict[str, Any]
RDZV_BACKENDS = ("c10d", "etcd-v2", "static")
#: the queue settings a job may override (deep-merged over the queue's)
OVERRIDABLE = ("image", "storage", "scheduling", "podDefaults", "kueueQueue")


class JobSpecError(ValueError):
    """A spec the API server accepted that the operator cannot run. ``reason`` is the
    condition/Event reason; the message says which field to change and how."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class NodeResources:
    gpus: int = 0
    cpus: Any = None  # a quantity (96, "500m") or None
    memory: str | None = None
    gpu_type: str | None = None
    max_nodes: int | None = None


@dataclass(frozen=True)
class VolumeSpec:
    enabled: bool = False
    size_per_gpu: str = "1Gi"
    storage_class: str | None = None
    persistent: bool = False  # no owner reference: outlives the job (checkpoints)


@dataclass(frozen=True)
class Storage:
    workspace: VolumeSpec = VolumeSpec()
    datasets: VolumeSpec = VolumeSpec()
    checkpoints: VolumeSpec = VolumeSpec()
    shm_size_per_gpu: str | None = None


@dataclass(frozen=True)
class Queue:
    name: str
    namespace: str
    uid: str
    generation: int
    kai_queue: str | None
    parent_kai_queue: str | None
    node: NodeResources
    spec: Obj  # the raw spec, for the job's overrides


@dataclass(frozen=True)
class Layout:
    """Pods (one per node) and torchrun processes per pod."""

    nodes: int  # pods the Job runs (maxNodes when elastic)
    procs_per_node: int
    min_nodes: int
    gpus_per_node: int  # the nvidia.com/gpu each pod requests

    @property
    def elastic(self) -> bool:
        return self.min_nodes != self.nodes

    @property
    def total_procs(self) -> int:
        return self.nodes * self.procs_per_node

    @property
    def standalone(self) -> bool:
        """One node, not elastic: ``torchrun --standalone``, no rendezvous server."""
        return self.nodes == 1 and not self.elastic


@dataclass(frozen=True)
class Job:
    name: str
    namespace: str
    uid: str
    generation: int
    queue_name: str
    command: str
    setup_command: str | None
    backend: str
    rdzv_backend: str
    rdzv_endpoint: str | None
    port: int
    suspend: bool
    ttl_s: int | None
    backoff_limit: int
    restart_policy: str
    deadline_s: int | None
    image: str
    layout: Layout
    node: NodeResources
    storage: Storage
    scheduling: Obj
    pod_defaults: Obj
    env: list[Obj]
    labels: dict[str, str]
    annotations: dict[str, str]
    kai_queue: str | None
    kueue_queue: str | None
    workspace: Obj  # spec.workspace, read by workspace.py only
    created: datetime | None = None
    status: Obj = field(default_factory=dict)
    queue_spec: Obj = field(default_factory=dict)  # as the job was created with it

    @property
    def working_dir(self) -> str:
        return str(self.pod_defaults.get("workingDir") or names.DEFAULT_WORKING_DIR)

    @property
    def rdzv_id(self) -> str:
        """torchrun's ``--rdzv-id``: every pod of the job, every attempt, meets under it."""
        return self.uid or self.name


def merge(base: Obj, over: Obj) -> Obj:
    """``over`` deep-merged onto ``base`` (maps merge; anything else in ``over`` wins)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def distribute(num_gpus: int, gpus_per_node: int, max_nodes: int | None = None) -> tuple[int, int]:
    """(nodes, GPUs per node) for ``num_gpus`` by the rule in the module docstring."""
    if num_gpus < 1:
        raise JobSpecError("InvalidGPUs", f"spec.numGPUs must be at least 1, got {num_gpus}")
    if gpus_per_node < 1:
        raise JobSpecError(
            "QueueHasNoGPUs",
            "spec.numGPUs needs a queue with nodeResources.gpus >= 1; this queue has none: "
            "give spec.numNodes (and procsPerNode) instead, or use a GPU queue",
        )
    cap = max_nodes if max_nodes is not None else num_gpus
    if num_gpus > gpus_per_node * cap:
        raise JobSpecError(
            "TooManyGPUs",
            f"spec.numGPUs={num_gpus} exceeds what the queue's nodes can ever hold "
            f"({cap} nodes x {gpus_per_node} GPUs = {cap * gpus_per_node}): ask for fewer",
        )
    for nodes in range(math.ceil(num_gpus / gpus_per_node), cap + 1):
        if num_gpus % nodes == 0:
            return nodes, num_gpus // nodes
    raise JobSpecError(
        "TooManyGPUs",
        f"spec.numGPUs={num_gpus} cannot be split evenly over at most {cap} nodes of "
        f"{gpus_per_node} GPUs: ask for a multiple of a node count, e.g. "
        f"{gpus_per_node * (num_gpus // gpus_per_node)}",
    )


def _meta(body: Obj) -> tuple[str, str, str, int]:
    meta = body.get("metadata") or {}
    return (
        str(meta.get("name", "")),
        str(meta.get("namespace", "default")),
        str(meta.get("uid", "")),
        int(meta.get("generation", 0)),
    )


def _node_resources(raw: Obj) -> NodeResources:
    return NodeResources(
        gpus=int(raw.get("gpus") or 0),
        cpus=raw.get("cpus"),
        memory=raw.get("memory"),
        gpu_type=raw.get("gpuType"),
        max_nodes=raw.get("maxNodes"),
    )


def parse_queue(body: Obj) -> Queue:
    name, namespace, uid, generation = _meta(body)
    spec = body.get("spec") or {}
    return Queue(
        name=name,
        namespace=namespace,
        uid=uid,
        generation=generation,
        kai_queue=spec.get("kaiQueue"),
        parent_kai_queue=spec.get("parentKaiQueue"),
        node=_node_resources(spec.get("nodeResources") or {}),
        spec=spec,
    )


def _volume(raw: Obj | None, *, persistent_default: bool = False) -> VolumeSpec:
    raw = raw or {}
    return VolumeSpec(
        enabled=bool(raw.get("enabled", bool(raw))),
        size_per_gpu=str(raw.get("sizePerGPU", "1Gi")),
        storage_class=raw.get("storageClass"),
        persistent=bool(raw.get("persistent", persistent_default)),
    )


def parse_storage(raw: Obj) -> Storage:
    return Storage(
        workspace=_volume(raw.get("workspace")),
        datasets=_volume(raw.get("datasets")),
        checkpoints=_volume(raw.get("checkpoints")),
        shm_size_per_gpu=raw.get("shmSizePerGPU"),
    )


def layout(spec: Obj, node: NodeResources) -> Layout:
    """Nodes and processes per node from numGPUs, numNodes or minNodes/maxNodes."""
    procs = spec.get("procsPerNode")
    if spec.get("numGPUs") is not None:
        nodes, per_node = distribute(int(spec["numGPUs"]), node.gpus, node.max_nodes)
        return Layout(nodes, per_node, spec.get("minNodes") or nodes, per_node)
    nodes = spec.get("maxNodes") or spec.get("numNodes") or 1
    min_nodes = spec.get("minNodes") or nodes
    if min_nodes > nodes:
        raise JobSpecError("InvalidNodes", f"spec.minNodes={min_nodes} > maxNodes={nodes}")
    if node.max_nodes is not None and nodes > node.max_nodes:
        raise JobSpecError(
            "TooManyNodes",
            f"the job asks for {nodes} nodes; queue nodeResources.maxNodes is {node.max_nodes}",
        )
    gpus = node.gpus
    per_node = int(procs) if procs else max(gpus, 1)
    if gpus and per_node > gpus:
        raise JobSpecError(
            "TooManyGPUs",
            f"spec.procsPerNode={per_node} exceeds the queue's {gpus} GPUs per node",
        )
    return Layout(nodes, per_node, min_nodes, per_node if gpus else 0)


def parse_job(body: Obj, queue: Queue | None) -> Job:
    """The job's effective settings: its own spec over its queue's. Raises
    :class:`JobSpecError` for what the schema cannot say (an unknown queue, too many GPUs)."""
    name, namespace, uid, generation = _meta(body)
    spec = body.get("spec") or {}
    queue_name = str(spec.get("jobQueue", ""))
    if queue is None:
        raise JobSpecError(
            "QueueNotFound",
            f"spec.jobQueue: no TorchrunQueue {queue_name!r} in namespace {namespace}: "
            f"create it (kubectl get torchrunqueues lists those there) or name another",
        )
    command = str(spec.get("command") or "")
    if not command.strip():
        raise JobSpecError("EmptyCommand", "spec.command is empty: give the command to run")
    problem = queue_problem(queue)
    if problem is not None:
        raise JobSpecError("QueueInvalid", f"TorchrunQueue {queue.name}: {problem[1]}")
    effective = merge(
        {k: queue.spec[k] for k in OVERRIDABLE if k in queue.spec},
        {k: spec[k] for k in OVERRIDABLE if k in spec},
    )
    problem = quantity_problem(effective)
    if problem is not None:
        raise JobSpecError(*problem)
    distributed = spec.get("distributed") or {}
    rdzv = str(distributed.get("rdzvBackend", "c10d"))
    if rdzv not in RDZV_BACKENDS:
        raise JobSpecError(
            "UnknownRendezvousBackend",
            f"spec.distributed.rdzvBackend {rdzv!r} is not one of {', '.join(RDZV_BACKENDS)}",
        )
    shape = layout(spec, queue.node)
    if rdzv == "static" and shape.elastic:
        raise JobSpecError("StaticNotElastic", "static rendezvous cannot be elastic: use c10d")
    image = effective.get("image")
    if not image:
        raise JobSpecError("NoImage", "neither the job nor its queue gives spec.image")
    created = (body.get("metadata") or {}).get("creationTimestamp")
    return Job(
        name=name,
        namespace=namespace,
        uid=uid,
        generation=generation,
        queue_name=queue_name,
        command=command,
        setup_command=spec.get("setupCommand"),
        backend=str(distributed.get("backend", "nccl")),
        rdzv_backend=rdzv,
        rdzv_endpoint=distributed.get("rdzvEndpoint"),
        port=int(distributed.get("port", names.RDZV_PORT)),
        suspend=bool(spec.get("suspend", False)),
        ttl_s=spec.get("ttlSecondsAfterFinished"),
        backoff_limit=int(spec.get("backoffLimit", 3)),
        restart_policy=str(spec.get("restartPolicy", "Never")),
        deadline_s=spec.get("activeDeadlineSeconds"),
        image=str(image),
        layout=shape,
        node=queue.node,
        storage=parse_storage(effective.get("storage") or {}),
        scheduling=dict(effective.get("scheduling") or {}),
        pod_defaults=dict(effective.get("podDefaults") or {}),
        env=list(spec.get("env") or []),
        labels=dict(spec.get("labels") or {}),
        annotations=dict(spec.get("annotations") or {}),
        kai_queue=queue.kai_queue,
        kueue_queue=effective.get("kueueQueue"),
        workspace=dict(spec.get("workspace") or {}),
        created=parse_time(created) if isinstance(created, str) else created,
        status=dict(body.get("status") or {}),
        queue_spec=queue.spec,
    )


def quantity_problem(spec: Obj) -> tuple[str, str] | None:
    """A quantity in a queue's (or job's) ``nodeResources``/``storage`` that does not parse:
    (reason, message naming the field), or None."""
    node = spec.get("nodeResources") or {}
    storage = spec.get("storage") or {}
    fields = {"nodeResources.cpus": node.get("cpus"), "nodeResources.memory": node.get("memory"),
              "storage.shmSizePerGPU": storage.get("shmSizePerGPU")}  # fmt: skip
    for volume in ("workspace", "datasets", "checkpoints"):
        fields[f"storage.{volume}.sizePerGPU"] = (storage.get(volume) or {}).get("sizePerGPU")
    for name, value in fields.items():
        if value is None:
            continue
        try:
            parse_quantity(value)
        except ValueError:
            return "InvalidQuantity", f"spec.{name}: {value!r} is not a quantity (e.g. 8Gi, 500m)"
    return None


def queue_problem(queue: Queue) -> tuple[str, str] | None:
    """What makes a queue unusable that its schema cannot say."""
    return quantity_problem(queue.spec)


def parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))
