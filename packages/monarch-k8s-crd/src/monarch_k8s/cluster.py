"""The Kubernetes calls KubernetesJob makes: clients, MonarchMesh objects, pods and events."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import kubernetes.client
import kubernetes.config
from kubernetes.client.exceptions import ApiException

from monarch_k8s.errors import INSTALL_COMMAND, OperatorNotInstalledError
from monarch_k8s.names import ACTIVITY_ANNOTATION, GROUP, PLURAL, VERSION

__all__ = ["MeshApi", "new_client_factory", "now_rfc3339"]


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def new_client_factory(
    api_client: kubernetes.client.ApiClient | None = None,
    kubeconfig: str | None = None,
    context: str | None = None,
) -> Any:
    """A function returning a fresh ``ApiClient`` on one configuration (in-cluster, a kubeconfig,
    or ``api_client``'s): fresh, because the stream helpers patch a client's ``request``."""
    if api_client is not None:
        configuration = api_client.configuration
    else:
        configuration = kubernetes.client.Configuration()
        try:
            kubernetes.config.load_kube_config(
                config_file=kubeconfig, context=context, client_configuration=configuration
            )
        except (kubernetes.config.ConfigException, FileNotFoundError, TypeError):
            kubernetes.config.load_incluster_config(client_configuration=configuration)
    return lambda: kubernetes.client.ApiClient(configuration=configuration)


def _is_missing_type(exc: ApiException) -> bool:
    """A 404 for a resource type the server does not know has no Status body naming an object."""
    try:
        details = json.loads(exc.body or "{}").get("details") or {}
    except ValueError:
        return True
    return not details.get("name")


class MeshApi:
    """MonarchMesh objects in one namespace, and the pods, events and secrets around them."""

    def __init__(self, api: kubernetes.client.ApiClient, namespace: str) -> None:
        self.namespace = namespace
        self.custom = kubernetes.client.CustomObjectsApi(api)
        self.core = kubernetes.client.CoreV1Api(api)
        self.serialize = api.sanitize_for_serialization

    def _not_installed(self, exc: ApiException) -> OperatorNotInstalledError:
        return OperatorNotInstalledError(
            f"the cluster has no MonarchMesh resource ({GROUP}/{VERSION}): install the CRD and "
            f"the operator with `{INSTALL_COMMAND}` (HTTP {exc.status})"
        )

    def get(self, name: str) -> dict[str, Any] | None:
        try:
            obj: Any = self.custom.get_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, name
            )
        except ApiException as exc:
            if exc.status == 404:
                if _is_missing_type(exc):
                    raise self._not_installed(exc) from None
                return None
            raise
        return dict(obj)

    def create(self, body: dict[str, Any]) -> dict[str, Any]:
        try:
            obj: Any = self.custom.create_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, body
            )
        except ApiException as exc:
            if exc.status == 404 and _is_missing_type(exc):
                raise self._not_installed(exc) from None
            raise
        return dict(obj)

    def patch(self, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        obj: Any = self.custom.patch_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, name, patch
        )
        return dict(obj)

    def touch(self, name: str) -> None:
        """Record activity now: the operator scales an idle mesh to zero and back up on this."""
        self.patch(name, {"metadata": {"annotations": {ACTIVITY_ANNOTATION: now_rfc3339()}}})

    def delete(self, name: str) -> bool:
        try:
            self.custom.delete_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, name, propagation_policy="Background"
            )
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def pods(self, selector: dict[str, str]) -> list[dict[str, Any]]:
        label = ",".join(f"{k}={v}" for k, v in sorted(selector.items()))
        items = self.core.list_namespaced_pod(self.namespace, label_selector=label).items
        return [self.serialize(p) for p in items]

    def events(self) -> list[dict[str, Any]]:
        items = self.core.list_namespaced_event(self.namespace).items
        return [self.serialize(e) for e in items]

    def service(self, name: str) -> dict[str, Any] | None:
        try:
            svc: dict[str, Any] = self.serialize(
                self.core.read_namespaced_service(name, self.namespace)
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return svc

    def secret_value(self, name: str, key: str) -> str | None:
        import base64

        try:
            secret = self.core.read_namespaced_secret(name, self.namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        value = (secret.data or {}).get(key)
        return base64.b64decode(value).decode() if value else None
