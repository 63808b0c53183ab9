"""Names of the Torchrun API (``torchrun.ai/v1alpha1``) and of the objects a TorchrunJob owns.

A job ``J`` owns: the indexed ``batch/v1`` Job ``J`` (its pods are ``J-<rank>-<suffix>`` with
hostname ``J-<rank>``), the headless Service ``J`` (so ``J-<rank>.J.<ns>.svc.cluster.local``
resolves), the PVCs ``J-workspace``, ``J-datasets``, ``J-checkpoints``, and for multi-node
``etcd-v2`` rendezvous without an endpoint the Deployment and headless Service ``J-etcd`` (its
pod's hostname is ``etcd``, so ``etcd.J-etcd.<ns>.svc.cluster.local`` resolves).
"""

from __future__ import annotations

GROUP = "torchrun.ai"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
JOB_KIND, JOB_PLURAL = "TorchrunJob", "torchrunjobs"
QUEUE_KIND, QUEUE_PLURAL = "TorchrunQueue", "torchrunqueues"

#: on every object a job owns, and its pods (the design's ``kubectl get pods -l torchrun-job-name=J``)
JOB_LABEL = "torchrun-job-name"
QUEUE_LABEL = "torchrun.ai/queue"
ROLE_LABEL = "torchrun.ai/role"  # worker, etcd
#: on KAI Queues we create (cluster-scoped, so no owner reference): ``<namespace>.<queue>``
KAI_OWNER_LABEL = "torchrun.ai/torchrunqueue"

#: on the batch Job: the queue's spec when the job was created (JSON). Later passes use it, so
#: a queue edited or deleted under a running job changes nothing for that job.
QUEUE_SNAPSHOT_ANNOTATION = "torchrun.ai/queue-spec"

KAI_GROUP, KAI_VERSION, KAI_PLURAL, KAI_KIND = "scheduling.run.ai", "v2", "queues", "Queue"
KAI_QUEUE_LABEL = "kai.scheduler/queue"
KAI_MIN_MEMBER = "kai.scheduler/batch-min-member"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"

RDZV_PORT = 29500
ETCD_PORT = 2379
WORKER_CONTAINER = "trainer"
DEFAULT_WORKING_DIR = "/app"
DATASETS_MOUNT = "/datasets"
CHECKPOINTS_MOUNT = "/checkpoints"
SHM_MOUNT = "/dev/shm"


def service_name(job: str) -> str:
    return job


def pvc_name(job: str, volume: str) -> str:
    """``volume`` is ``workspace``, ``datasets`` or ``checkpoints``."""
    return f"{job}-{volume}"


def etcd_name(job: str) -> str:
    return f"{job}-etcd"


def etcd_host(job: str, namespace: str) -> str:
    """The DNS name of the job's etcd: its pod (hostname ``etcd``) under the headless Service,
    a name that needs no cluster DNS for Services (k8s-testenv resolves only pods' names)."""
    return f"etcd.{etcd_name(job)}.{namespace}.svc.cluster.local"


def worker_host(job: str, namespace: str, rank: int = 0) -> str:
    """The DNS name of the worker of node rank ``rank`` (indexed Job hostname + Service)."""
    return f"{job}-{rank}.{service_name(job)}.{namespace}.svc.cluster.local"


def kai_owner(namespace: str, queue: str) -> str:
    return f"{namespace}.{queue}"
