"""Small builders shared by the job's renderers (and :mod:`.workspace`): owner references,
metadata, PVCs, and the settings of the operator's install."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from typing import Any

from kubernetes.utils import parse_quantity

from monarch_k8s.torchrun import names
from monarch_k8s.torchrun.spec import Job, VolumeSpec

__all__ = ["Options", "job_labels", "metadata", "owner_reference", "pvc", "scale_quantity"]

Obj = dict[str, Any]


@dataclass(frozen=True)
class Options:
    """Settings of the operator's install (environment of its pod), not of one job."""

    image: str = "ghcr.io/monarch-anywhere/monarch:latest"  # sync agents and other helpers
    etcd_image: str = "quay.io/coreos/etcd:v3.5.21"  # etcd-v2 rendezvous (needs --enable-v2)
    etcd_command: tuple[str, ...] = ("etcd",)
    listen_host: str = "0.0.0.0"  # "podIP" where pods share a network namespace


def owner_reference(job: Job) -> Obj:
    return {
        "apiVersion": names.API_VERSION,
        "kind": names.JOB_KIND,
        "name": job.name,
        "uid": job.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def job_labels(job: Job, role: str = "worker") -> dict[str, str]:
    return {names.JOB_LABEL: job.name, names.ROLE_LABEL: role}


def metadata(job: Job, name: str, labels: dict[str, str], *, owned: bool = True) -> Obj:
    meta: Obj = {"name": name, "namespace": job.namespace, "labels": labels}
    if owned:
        meta["ownerReferences"] = [owner_reference(job)]
    return meta


def scale_quantity(quantity: Any, factor: int | Fraction, *, memory: bool) -> str:
    """``quantity`` x ``factor`` as a Kubernetes quantity (bytes, or millicores), rounded down."""
    factor = Fraction(factor)
    value = Decimal(parse_quantity(quantity)) * factor.numerator / factor.denominator
    if memory:
        return str(int(value))
    return f"{int(value * 1000)}m"


def pvc(job: Job, volume: str, spec: VolumeSpec) -> Obj:
    """The claim ``<job>-<volume>``, ``sizePerGPU`` x the job's GPUs (processes on CPU queues).
    Read-write-many: the workers of a multi-node job mount it on several nodes."""
    body: Obj = {
        "accessModes": ["ReadWriteMany"],
        "resources": {
            "requests": {
                "storage": scale_quantity(spec.size_per_gpu, job.layout.total_procs, memory=True)
            }
        },
    }
    if spec.storage_class:
        body["storageClassName"] = spec.storage_class
    labels = {**job_labels(job, volume), names.QUEUE_LABEL: job.queue_name}
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": metadata(
            job, names.pvc_name(job.name, volume), labels, owned=not spec.persistent
        ),
        "spec": body,
    }
