"""What every reconciler of the operator (MonarchMesh, Torchrun) does with the API server:
objects as plain dicts through the dynamic client (the typed client validates bodies and
would refuse e.g. ``nvidia.com/gpu: 4`` in a user template), one lock per reconciled object,
and Events."""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime
from typing import Any, ClassVar

from kubernetes import client, dynamic
from kubernetes.client.exceptions import ApiException

__all__ = ["KubeObjects"]

logger = logging.getLogger("monarch_k8s.operator")
Obj = dict[str, Any]


class KubeObjects:
    #: kind -> apiVersion of what the subclass reads and writes
    KINDS: ClassVar[dict[str, str]] = {}
    #: ``source.component`` of its Events
    COMPONENT: ClassVar[str] = "monarch-operator"

    def __init__(self, api_client: client.ApiClient) -> None:
        self.api_client = api_client
        self.core = client.CoreV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self.dynamic = dynamic.DynamicClient(api_client)
        self._resources: dict[str, Any] = {}
        self._guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}  # per object; a handful of bytes each

    def _resource(self, kind: str) -> Any:
        if kind not in self._resources:
            api_version = self.KINDS[kind]
            self._resources[kind] = self.dynamic.resources.get(api_version=api_version, kind=kind)
        return self._resources[kind]

    def read(self, kind: str, namespace: str, name: str) -> Obj | None:
        try:
            found = self.dynamic.get(self._resource(kind), name=name, namespace=namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return dict(found.to_dict())

    def _lock_for(self, key: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())

    def post_event(self, involved: Obj, kind: str, reason: str, message: str) -> None:
        """An Event about ``involved`` ({apiVersion, kind, name, namespace, uid}); a courtesy:
        never fails the caller."""
        now = datetime.now(UTC).isoformat()
        event = {
            "metadata": {
                "generateName": f"{involved['name']}.",
                "namespace": involved["namespace"],
            },
            "involvedObject": involved,
            "type": kind,
            "reason": reason,
            "message": message[:1000],
            "source": {"component": self.COMPONENT},
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            self.core.create_namespaced_event(involved["namespace"], event)  # type: ignore[arg-type]
        except ApiException as exc:
            logger.warning("could not post event %s: %s", reason, exc.reason)
