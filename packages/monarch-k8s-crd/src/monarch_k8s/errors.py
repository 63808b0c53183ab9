"""Typed errors of :class:`~monarch_k8s.job.KubernetesJob`: each names what was wrong and what
to do about it."""

from __future__ import annotations

from monarch_proxy import AuthenticationError, WorkerLostError

__all__ = [
    "AuthenticationError",
    "InvalidJobError",
    "KubernetesJobError",
    "MeshNotReadyError",
    "OperatorNotInstalledError",
    "WorkerLostError",
    "WorkerPodLostError",
]

#: how to install the CRD and the operator: the kustomize base shipped in this package
INSTALL_COMMAND = (
    "kubectl apply --server-side -k "
    "\"$(python -c 'from monarch_k8s.install import manifests_dir; print(manifests_dir())')\""
)


class KubernetesJobError(Exception):
    """Base of KubernetesJob's own errors."""


class InvalidJobError(KubernetesJobError, ValueError):
    """The arguments cannot make a MonarchMesh (a bad name, both compute and selector, ...)."""


class OperatorNotInstalledError(KubernetesJobError):
    """The cluster does not know MonarchMesh, or no operator acts on it."""


class MeshNotReadyError(KubernetesJobError, TimeoutError):
    """The mesh did not come up in time; ``pods`` maps each pod not ready to the reason."""

    def __init__(self, message: str, pods: dict[str, str]) -> None:
        super().__init__(message)
        self.pods = pods


class WorkerPodLostError(WorkerLostError):
    """A worker pod went away; ``pod`` and ``reason`` are what Kubernetes knows about it
    (``OOMKilled``, ``Evicted``, ``Preempted``, ``NodeLost``, ``Deleted`` ...)."""

    def __init__(self, message: str, pod: str, reason: str) -> None:
        super().__init__(message)
        self.pod = pod
        self.reason = reason
