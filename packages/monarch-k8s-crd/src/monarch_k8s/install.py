"""Install the CRD and the operator from Python, from the same manifests as ``kubectl apply -k``.

    from monarch_k8s.install import apply_crds, install_operator
    apply_crds(api_client)                                  # the MonarchMesh CRD, Established
    install_operator(api_client, "monarch-system", image="registry/monarch:tag")

Objects are sent with server-side apply (field manager ``monarch-install``), so running it
again updates in place. The namespace is rewritten as kustomize's ``namespace:`` would.
"""

from __future__ import annotations

import time
from importlib import resources
from typing import Any

import yaml
from kubernetes import client, dynamic

from monarch_k8s import names

__all__ = ["apply_crds", "install_operator", "manifest_objects", "manifests_dir"]

Obj = dict[str, Any]
FILES = ("namespace.yaml", "crd.yaml", "torchrun-crds.yaml", "rbac.yaml", "operator.yaml")
CLUSTER_KINDS = {"Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"}


def manifests_dir() -> Any:
    """The kustomize base shipped in the wheel (``kubectl apply -k`` this folder)."""
    return resources.files("monarch_k8s") / "manifests"


def manifest_objects(
    namespace: str = names.OPERATOR_NAMESPACE, env: dict[str, str] | None = None
) -> list[Obj]:
    """The base's objects, moved to ``namespace``, with the operator's ``env`` overridden."""
    objects: list[Obj] = []
    for file in FILES:
        objects += [d for d in yaml.safe_load_all((manifests_dir() / file).read_text()) if d]
    for obj in objects:
        kind, meta = obj["kind"], obj["metadata"]
        if kind == "Namespace":
            meta["name"] = namespace
        elif kind not in CLUSTER_KINDS:
            meta["namespace"] = namespace
        for subject in obj.get("subjects", []):
            subject["namespace"] = namespace
        if kind == "Deployment" and env:
            container = obj["spec"]["template"]["spec"]["containers"][0]
            rest = [e for e in container.get("env", []) if e["name"] not in env]
            container["env"] = rest + [{"name": k, "value": v} for k, v in env.items()]
            if "MONARCH_IMAGE" in env:
                container["image"] = env["MONARCH_IMAGE"]
    return objects


def _apply(api_client: client.ApiClient, obj: Obj) -> None:
    dyn = dynamic.DynamicClient(api_client)
    resource = dyn.resources.get(api_version=obj["apiVersion"], kind=obj["kind"])
    namespace = obj["metadata"].get("namespace") if resource.namespaced else None
    dyn.server_side_apply(
        resource,
        body=obj,
        namespace=namespace,
        field_manager="monarch-install",
        force_conflicts=True,
    )


def apply_crds(api_client: client.ApiClient, *, timeout_s: float = 60.0) -> None:
    """Apply the CRDs (MonarchMesh, TorchrunQueue, TorchrunJob) and wait until the API server serves it."""
    crds = [o for o in manifest_objects() if o["kind"] == "CustomResourceDefinition"]
    for crd in crds:
        _apply(api_client, crd)
    ext = client.ApiextensionsV1Api(api_client)
    deadline = time.monotonic() + timeout_s
    for crd in crds:
        while True:
            status = ext.read_custom_resource_definition(crd["metadata"]["name"]).status
            conditions = status.conditions if status is not None else None
            if any(c.type == "Established" and c.status == "True" for c in conditions or []):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"CRD {crd['metadata']['name']} not Established in {timeout_s}s")
            time.sleep(0.2)


def install_operator(
    api_client: client.ApiClient,
    namespace: str = names.OPERATOR_NAMESPACE,
    *,
    image: str | None = None,
    listen_host: str | None = None,
    resync_seconds: float | None = None,
) -> None:
    """Apply the CRD, the operator's RBAC and its Deployment in ``namespace``.

    ``listen_host="podIP"`` is for clusters whose pods share one network namespace (the
    process kubelet of k8s-testenv); ``image`` is the operator's, gateway's and agents' image.
    """
    env: dict[str, str] = {}
    if image:
        env["MONARCH_IMAGE"] = image
    if listen_host:
        env["MONARCH_LISTEN_HOST"] = listen_host
    if resync_seconds is not None:
        env["MONARCH_RESYNC_SECONDS"] = str(resync_seconds)
    apply_crds(api_client)
    for obj in manifest_objects(namespace, env):
        if obj["kind"] != "CustomResourceDefinition":
            _apply(api_client, obj)
