"""What every reconciler of the operator (MonarchMesh, Torchrun) does with the API server:
objects as plain dicts through the dynamic client (the typed client validates bodies and
would refuse e.g. ``nvidia.com/gpu: 4`` in a user template), create-or-replace of children as
:func:`~.plan.plan_update` says, its own custom objects and their ``status``, one pass at a
time per reconciled object, and Events."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, ClassVar

from kubernetes import client, dynamic
from kubernetes.client.exceptions import ApiException

from monarch_k8s.operator.plan import Action, plan_update

__all__ = ["KubeObjects", "api_message"]

logger = logging.getLogger("monarch_k8s.operator")
Obj = dict[str, Any]
MERGE_PATCH = "application/merge-patch+json"


class KubeObjects:
    #: kind -> apiVersion of what the subclass reads and writes
    KINDS: ClassVar[dict[str, str]] = {}
    #: kinds created once and never replaced (a live one is left as it is)
    CREATE_ONCE: ClassVar[frozenset[str]] = frozenset()
    #: group, version and default kind of the custom objects the subclass reconciles
    GROUP: ClassVar[str] = ""
    VERSION: ClassVar[str] = ""
    KIND: ClassVar[str] = ""
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

    def spec_error(self, child: str, message: str) -> Exception:
        """The subclass's error for a child (``"<kind> <name>"``) the API server refuses as
        invalid (400, 422, saying ``message``): what the user's spec makes cannot be created."""
        return ValueError(f"{child} refused: {message}")

    # -- children, as plain dicts ---------------------------------------------------------
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

    def create(self, kind: str, namespace: str, body: Obj) -> bool:
        """False when one of that name exists already (created meanwhile)."""
        try:
            self.dynamic.create(self._resource(kind), body=body, namespace=namespace)
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise
        return True

    def merge_patch(self, kind: str, namespace: str, name: str, body: Obj) -> None:
        self.dynamic.patch(
            self._resource(kind), body=body, name=name, namespace=namespace,
            content_type=MERGE_PATCH,
        )  # fmt: skip

    def delete(self, kind: str, namespace: str, name: str) -> None:
        """Delete if there; one already gone is no error."""
        try:
            self.dynamic.delete(self._resource(kind), name=name, namespace=namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise

    def apply(self, owner: Obj, desired: Obj) -> Action:
        """Create ``desired`` if missing, else replace or scale it as :func:`plan_update`
        says (a kind in :attr:`CREATE_ONCE` is left as it is); an Event on ``owner`` (a body
        with ``metadata``) for each change. Creates that race and replaces over a stale
        ``resourceVersion`` answer 409: left to the next pass (``NONE``). A body the API
        server refuses as invalid raises :meth:`spec_error`."""
        meta = desired["metadata"]
        kind, namespace, name = desired["kind"], meta["namespace"], meta["name"]
        live = self.read(kind, namespace, name)
        if live is not None and kind in self.CREATE_ONCE:
            return Action.NONE
        action, body = plan_update(desired, live)
        resource = self._resource(kind)
        try:
            if action is Action.CREATE:
                self.dynamic.create(resource, body=body, namespace=namespace)
            elif action is Action.REPLACE:
                self.dynamic.replace(resource, body=body, name=name, namespace=namespace)
            elif action is Action.SCALE:
                self.merge_patch(kind, namespace, name, body)
        except ApiException as exc:
            if exc.status == 409:  # created meanwhile, or changed under us: next pass
                logger.info("%s %s/%s changed meanwhile; next pass", kind, namespace, name)
                return Action.NONE
            if exc.status in (400, 422):  # what the user's spec makes is invalid
                raise self.spec_error(f"{kind} {name}", api_message(exc)) from exc
            raise
        if action is not Action.NONE:
            verb = action.value
            self.event(owner, "Normal", verb.capitalize(), f"{verb} {kind} {name}")
        return action

    # -- the reconciled custom objects ----------------------------------------------------
    def get_custom(self, plural: str, namespace: str, name: str) -> Obj | None:
        """One of the subclass's custom objects; None when there is none."""
        try:
            return self.custom.get_namespaced_custom_object(  # type: ignore[return-value]
                self.GROUP, self.VERSION, namespace, plural, name
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def patch_status(self, body: Obj, plural: str, status: Obj) -> None:
        meta = body["metadata"]
        try:
            self.custom.patch_namespaced_custom_object_status(
                self.GROUP, self.VERSION, meta["namespace"], plural, meta["name"],
                {"status": status},
            )  # fmt: skip
        except ApiException as exc:
            if exc.status != 404:  # deleted meanwhile: nothing to report on
                raise

    @contextmanager
    def one_pass(self, plural: str, body: Obj) -> Iterator[Obj | None]:
        """Passes over one object run one at a time (kopf runs handlers of different
        resources, and the resync, in parallel), each on the object as it is once the
        previous pass is done, so two passes never race to create, or report one change
        twice. Yields the body to reconcile: read again when another pass ran meanwhile or
        only a name was given; None when it is gone."""
        meta = body.get("metadata") or {}
        lock = self._lock_for(f"{meta['namespace']}/{meta['name']}")
        waited = not lock.acquire(blocking=False)
        if waited:
            lock.acquire()
        try:
            if waited or "spec" not in body:
                yield self.get_custom(plural, meta["namespace"], meta["name"])
            else:
                yield body
        finally:
            lock.release()

    def resync(self, plural: str, each: Callable[[Obj], object]) -> int:
        """``each`` on every object of ``plural`` in the cluster, whatever the watches said;
        one that fails is logged and does not stop the others. How many passed."""
        listed: Obj = self.custom.list_cluster_custom_object(  # type: ignore[assignment]
            self.GROUP, self.VERSION, plural
        )
        done = 0
        for body in listed.get("items", []):
            try:
                each(body)
                done += 1
            except Exception:
                meta = body.get("metadata", {})
                logger.exception("resync of %s %s/%s failed", plural, meta.get("namespace"),
                                 meta.get("name"))  # fmt: skip
        return done

    def _lock_for(self, key: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())

    # -- Events ---------------------------------------------------------------------------
    def event(self, body: Obj, kind: str, reason: str, message: str) -> None:
        """An Event about one of the subclass's custom objects (``body``, or just its
        ``metadata``)."""
        meta = body["metadata"]
        involved = {
            "apiVersion": f"{self.GROUP}/{self.VERSION}",
            "kind": body.get("kind") or self.KIND,
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta.get("uid", ""),
        }
        self.post_event(involved, kind, reason, message)

    def post_event(
        self, involved: Obj, kind: str, reason: str, message: str,
        annotations: dict[str, str] | None = None,
    ) -> None:  # fmt: skip
        """An Event about ``involved`` ({apiVersion, kind, name, namespace, uid}); a courtesy:
        never fails the caller. ``annotations``: what a program reading it needs, as data."""
        now = datetime.now(UTC).isoformat()
        event = {
            "metadata": {
                "generateName": f"{involved['name']}.",
                "namespace": involved["namespace"],
                **({"annotations": annotations} if annotations else {}),
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


def api_message(exc: ApiException) -> str:
    """What the API server said (its Status ``message``), else the HTTP reason."""
    try:
        message = json.loads(exc.body or "{}").get("message")
    except (ValueError, AttributeError):
        message = None
    return str(message or exc.reason)
