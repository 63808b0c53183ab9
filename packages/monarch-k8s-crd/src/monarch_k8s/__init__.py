"""monarch-k8s-crd: the MonarchMesh CRD, its operator, and ``KubernetesJob``.

``KubernetesJob`` is imported lazily, so the operator image need not load the laptop side.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from monarch_k8s.errors import (
        InvalidJobError,
        KubernetesJobError,
        MeshNotReadyError,
        OperatorNotInstalledError,
        WorkerPodLostError,
    )
    from monarch_k8s.job import KubernetesJob
    from monarch_k8s.spec import MeshSpec

__version__ = "0.1.0"

_LAZY = {
    "KubernetesJob": "monarch_k8s.job",
    "MeshSpec": "monarch_k8s.spec",
    "InvalidJobError": "monarch_k8s.errors",
    "KubernetesJobError": "monarch_k8s.errors",
    "MeshNotReadyError": "monarch_k8s.errors",
    "OperatorNotInstalledError": "monarch_k8s.errors",
    "WorkerPodLostError": "monarch_k8s.errors",
}

__all__ = [
    "InvalidJobError",
    "KubernetesJob",
    "KubernetesJobError",
    "MeshNotReadyError",
    "MeshSpec",
    "OperatorNotInstalledError",
    "WorkerPodLostError",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'monarch_k8s' has no attribute {name!r}")
