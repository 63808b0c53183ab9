"""Dynamic provisioning: the kube-controller-manager's own host-path provisioner, kept in the
cluster's folder.

Upstream's provisioner (``pkg/volume/hostpath``, ``--enable-hostpath-provisioner``) always
creates ``/tmp/hostpath_pv/<uuid>`` (the path is hard-coded) and its deleter removes only paths
under ``/tmp/``. So the controller-manager and the kubelet each run in a mount namespace of
their own in which :data:`PROVISIONER_DIR` is a bind mount of ``<cluster folder>/pv``: PVs say
``/tmp/hostpath_pv/<uuid>``, the data lives in the cluster folder and goes with it. On the host
only the empty mount point ``/tmp/hostpath_pv`` is created (shared by all clusters). Without
mount namespaces the folders land in the real ``/tmp/hostpath_pv`` and
:func:`remove_provisioned` deletes them when the cluster stops.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from k8s_testenv.kubelet.api import ApiError, RestClient
from k8s_testenv.kubelet.network import sandbox_support

__all__ = [
    "DEFAULT_STORAGE_CLASS",
    "PROVISIONER_DIR",
    "create_default_class",
    "provisioner_prefix",
    "remove_provisioned",
]

PROVISIONER_DIR = "/tmp/hostpath_pv"
DEFAULT_STORAGE_CLASS: dict[str, Any] = {
    "apiVersion": "storage.k8s.io/v1",
    "kind": "StorageClass",
    "metadata": {
        "name": "standard",
        "annotations": {"storageclass.kubernetes.io/is-default-class": "true"},
    },
    "provisioner": "kubernetes.io/host-path",
    "reclaimPolicy": "Delete",
    "volumeBindingMode": "Immediate",
}
_SCRIPT = f'mkdir -p {PROVISIONER_DIR} && mount --bind "$0" {PROVISIONER_DIR} && exec "$@"'


def provisioner_prefix(pv_dir: Path) -> list[str]:
    """argv prefix that runs a command with :data:`PROVISIONER_DIR` bound to ``pv_dir`` (empty
    when mount namespaces are unavailable)."""
    flags = sandbox_support()
    if flags is None:
        return []
    pv_dir.mkdir(parents=True, exist_ok=True)
    return [*flags, "--", "/bin/sh", "-c", _SCRIPT, str(pv_dir)]


def create_default_class(rest: RestClient) -> None:
    """Create :data:`DEFAULT_STORAGE_CLASS` (an existing one is kept)."""
    try:
        rest.request("POST", "/apis/storage.k8s.io/v1/storageclasses", DEFAULT_STORAGE_CLASS)
    except ApiError as exc:
        if exc.status != 409:
            raise


def remove_provisioned(rest: RestClient) -> None:
    """Delete the host folders of provisioned PVs (only needed without mount namespaces)."""
    for pv in rest.get("/api/v1/persistentvolumes").get("items", []):
        path = (pv.get("spec", {}).get("hostPath") or {}).get("path", "")
        if path.startswith(PROVISIONER_DIR + "/") and ".." not in path.split("/"):
            shutil.rmtree(path, ignore_errors=True)
