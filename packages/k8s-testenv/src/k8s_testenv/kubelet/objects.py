"""What the kubelet reads besides pods: ConfigMaps and Secrets (kept by a watch), claims and
volumes, and service-account tokens from the TokenRequest API.

:class:`ApiSources` is the one object the volume layer (:mod:`k8s_testenv.kubelet.mounts`)
talks to. ConfigMaps and Secrets of every namespace are cached by list+watch, as the kubelet's
watch-based manager does, so volumes follow updates within moments and refreshing a volume costs
no request; a cache miss still asks the API server, so an object created a moment ago is found.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import Any

from k8s_testenv.kubelet.api import ApiError, RestClient
from k8s_testenv.kubelet.volumes import TokenSpec, VolumeError

__all__ = ["ApiSources", "list_watch"]

log = logging.getLogger("k8s_testenv.kubelet")
Obj = dict[str, Any]


def list_watch(
    client: RestClient,
    path: str,
    stop: threading.Event,
    *,
    on_list: Callable[[Iterable[Obj]], None],
    on_event: Callable[[str, Obj], None],
    **query: str,
) -> None:
    """List ``path``, then watch it from that version, until ``stop``; list again on errors.

    ``on_list`` gets every object of a (re)list; ``on_event`` each ADDED/MODIFIED/DELETED.
    """
    while not stop.is_set():
        try:
            listing = client.get(path, **query)
            on_list(listing.get("items", []))
            version = listing["metadata"]["resourceVersion"]
            for event in client.watch(
                path,
                **query,
                resourceVersion=version,
                allowWatchBookmarks="true",
                timeoutSeconds="240",
            ):
                if stop.is_set():
                    return
                kind = event.get("type", "")
                if kind == "ERROR":
                    break  # typically 410 Gone: list again
                if kind != "BOOKMARK":
                    on_event(kind, event.get("object", {}))
        except Exception as exc:  # the API server may be restarting; list again
            if not stop.is_set():
                log.warning("watch of %s failed: %s", path, exc)
                stop.wait(0.5)


def _key(obj: Mapping[str, Any]) -> tuple[str, str]:
    return obj["metadata"].get("namespace", ""), obj["metadata"]["name"]


class ApiSources:
    """The API objects volumes are made from (see :class:`~k8s_testenv.kubelet.mounts.Sources`)."""

    KINDS = {"configmap": "configmaps", "secret": "secrets"}

    def __init__(self, client: RestClient) -> None:
        self.client = client
        self._cache: dict[str, dict[tuple[str, str], Obj]] = {k: {} for k in self.KINDS}
        self._lock = threading.Lock()
        #: bumped on every change seen, so waiting volumes retry at once
        self.generation = 0

    def start(self, stop: threading.Event) -> None:
        """Start one list+watch thread per kind."""
        for kind, plural in self.KINDS.items():

            def relist(items: Iterable[Obj], kind: str = kind) -> None:
                with self._lock:
                    self._cache[kind] = {_key(o): o for o in items}
                    self.generation += 1

            def change(event: str, obj: Obj, kind: str = kind) -> None:
                with self._lock:
                    if event == "DELETED":
                        self._cache[kind].pop(_key(obj), None)
                    else:
                        self._cache[kind][_key(obj)] = obj
                    self.generation += 1

            thread = threading.Thread(
                target=list_watch,
                args=(self.client, f"/api/v1/{plural}", stop),
                kwargs={"on_list": relist, "on_event": change},
                daemon=True,
                name=f"watch-{plural}",
            )
            thread.start()

    def object(self, kind: str, namespace: str, name: str) -> Obj | None:
        """A ConfigMap or Secret (``kind`` ``configmap``/``secret``), or None if it is absent."""
        with self._lock:
            obj = self._cache[kind].get((namespace, name))
        if obj is not None:
            return obj
        return self._get(f"/api/v1/namespaces/{namespace}/{self.KINDS[kind]}/{name}")

    def claim(self, namespace: str, name: str) -> tuple[Obj | None, Obj | None]:
        """A PersistentVolumeClaim and the PersistentVolume it is bound to (None if absent)."""
        pvc = self._get(f"/api/v1/namespaces/{namespace}/persistentvolumeclaims/{name}")
        volume = (pvc or {}).get("spec", {}).get("volumeName")
        return pvc, self._get(f"/api/v1/persistentvolumes/{volume}") if volume else None

    def token(self, pod: Mapping[str, Any], spec: TokenSpec) -> tuple[str, float]:
        """A service-account token bound to ``pod`` (TokenRequest API) and when it expires."""
        meta = pod["metadata"]
        account = pod["spec"].get("serviceAccountName") or "default"
        request: dict[str, Any] = {
            "expirationSeconds": spec.expiration_seconds,
            "boundObjectRef": {
                "apiVersion": "v1",
                "kind": "Pod",
                "name": meta["name"],
                "uid": meta["uid"],
            },
        }
        if spec.audience:
            request["audiences"] = [spec.audience]
        path = f"/api/v1/namespaces/{meta['namespace']}/serviceaccounts/{account}/token"
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": request}
        try:
            status = self.client.request("POST", path, body)["status"]
        except ApiError as exc:
            raise VolumeError(_message(exc)) from None
        expires = datetime.fromisoformat(status["expirationTimestamp"].replace("Z", "+00:00"))
        return str(status["token"]), expires.timestamp()

    def _get(self, path: str) -> Obj | None:
        try:
            return self.client.get(path)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise VolumeError(_message(exc)) from None


def _message(exc: ApiError) -> str:
    """The ``message`` of an API ``Status`` body, as client-go errors print it."""
    try:
        return str(json.loads(exc.body)["message"])
    except (ValueError, KeyError, TypeError):
        return str(exc)
