"""What to send for a desired child given the live one: create, replace, scale or nothing.

Workloads carry the SHA-256 of their desired pod template (upstream's annotation); the live
template may differ (a mutating webhook rewrote it) without a fight, since only a new hash
means a new spec. Other children carry the hash of the whole desired object.
"""

from __future__ import annotations

import copy
from enum import Enum
from typing import Any

from monarch_k8s import names
from monarch_k8s.operator.render import digest

__all__ = ["Action", "plan_update"]

Obj = dict[str, Any]


class Action(Enum):
    CREATE = "create"
    REPLACE = "replace"  # the desired object, over the live one's resourceVersion
    SCALE = "scale"  # only spec.replicas differs (the template hash is unchanged)
    NONE = "none"


def plan_update(desired: Obj, live: Obj | None) -> tuple[Action, Obj]:
    """What to send for ``desired`` given the ``live`` object (None: missing).

    Workloads compare the template hash, then replicas: a template rewritten by a webhook
    keeps the hash we wrote, so it is left alone. Other objects carry the hash of the whole
    desired object. Server-filled fields (a Service's clusterIP) are kept on replace.
    """
    kind = desired["kind"]
    want = desired["metadata"].setdefault("annotations", {})
    workload = kind in ("StatefulSet", "Deployment")
    if kind == "Deployment":
        want[names.TEMPLATE_HASH_ANNOTATION] = digest(desired["spec"]["template"])
    elif not workload:
        want.pop(names.APPLIED_HASH_ANNOTATION, None)
        want[names.APPLIED_HASH_ANNOTATION] = digest(desired)
    if live is None:
        return Action.CREATE, desired
    have = (live.get("metadata") or {}).get("annotations") or {}
    key = names.TEMPLATE_HASH_ANNOTATION if workload else names.APPLIED_HASH_ANNOTATION
    if have.get(key) != want[key]:
        return Action.REPLACE, with_live_fields(desired, live)
    if workload and (live.get("spec") or {}).get("replicas") != desired["spec"]["replicas"]:
        return Action.SCALE, {"spec": {"replicas": desired["spec"]["replicas"]}}
    return Action.NONE, desired


def with_live_fields(desired: Obj, live: Obj) -> Obj:
    body = copy.deepcopy(desired)
    body["metadata"]["resourceVersion"] = live["metadata"]["resourceVersion"]
    if desired["kind"] == "Service":
        for key in ("clusterIP", "clusterIPs", "ipFamilies", "ipFamilyPolicy"):
            if key in (live.get("spec") or {}):
                body["spec"][key] = live["spec"][key]
    return body
