"""Pure readings of a pod manifest: environment, command line, hostname and probes.

All functions take the pod as the JSON dict the API server returns and never do I/O. Values
that live in other objects (ConfigMaps, Secrets) come through a ``lookup`` callable, so the
resolution rules can be tested without a cluster.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from k8s_testenv.kubelet.status import ContainerRecord

__all__ = [
    "ConfigError",
    "PodNetwork",
    "apply_liveness_result",
    "apply_probe_result",
    "build_env",
    "command_line",
    "expand",
    "field_ref",
    "hostname_of",
    "probe_due",
    "quantity",
    "render_hosts",
    "resolve_port",
    "resource_field",
]

Lookup = Callable[[str, str, str], Mapping[str, str] | None]
"""``lookup(kind, namespace, name)`` returns a ConfigMap's or Secret's decoded data."""

_VAR = re.compile(r"\$\$|\$\(([-._a-zA-Z][-._a-zA-Z0-9]*)\)")


class ConfigError(ValueError):
    """The container cannot be started as specified (the kubelet's CreateContainerConfigError)."""


@dataclass(frozen=True)
class PodNetwork:
    """Addresses the kubelet gave the pod and its node."""

    pod_ip: str
    host_ip: str
    node_name: str


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion: defined names are replaced, ``$$`` escapes a ``$``."""

    def sub(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env.get(name, match.group(0))

    return _VAR.sub(sub, text)


_FIELD_PATH = re.compile(r"metadata\.(labels|annotations)\['([^']+)'\]")


def field_ref(pod: Mapping[str, Any], path: str, net: PodNetwork) -> str:
    """Value of a downward-API ``fieldRef.fieldPath``."""
    meta = pod.get("metadata", {})
    spec = pod.get("spec", {})
    simple = {
        "metadata.name": meta.get("name", ""),
        "metadata.namespace": meta.get("namespace", ""),
        "metadata.uid": meta.get("uid", ""),
        "spec.nodeName": spec.get("nodeName") or net.node_name,
        "spec.serviceAccountName": spec.get("serviceAccountName", ""),
        "status.podIP": net.pod_ip,
        "status.podIPs": net.pod_ip,
        "status.hostIP": net.host_ip,
        "status.hostIPs": net.host_ip,
    }
    if path in simple:
        return str(simple[path])
    match = _FIELD_PATH.fullmatch(path)
    if match:
        return str(meta.get(match.group(1), {}).get(match.group(2), ""))
    raise ConfigError(f"unsupported fieldRef.fieldPath {path!r}")


_SUFFIX = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9}


def quantity(text: str) -> float:
    """A resource quantity (``64Mi``, ``500m``, ``1G``) as a number."""
    if text.endswith("m"):
        return float(text[:-1]) / 1000
    for suffix, factor in _SUFFIX.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def resource_field(container: Mapping[str, Any], ref: Mapping[str, Any]) -> str:
    """Value of a ``resourceFieldRef`` (0 when the resource is not set)."""
    kind, _, name = ref["resource"].partition(".")
    value = container.get("resources", {}).get(kind, {}).get(name)
    if value is None:
        return "0"
    divisor = quantity(str(ref.get("divisor", "1")))
    return str(math.ceil(quantity(str(value)) / divisor))


def build_env(
    pod: Mapping[str, Any],
    container: Mapping[str, Any],
    net: PodNetwork,
    *,
    base: Mapping[str, str],
    lookup: Lookup,
) -> dict[str, str]:
    """The process environment: ``base``, then ``envFrom``, then ``env`` in order.

    Later ``env`` entries may refer to earlier ones with ``$(NAME)``, as in Kubernetes.
    """
    namespace = pod.get("metadata", {}).get("namespace", "default")
    env = dict(base)
    env["HOSTNAME"] = hostname_of(pod)[0]
    for source in container.get("envFrom", []):
        prefix = source.get("prefix", "")
        for kind, key in (("configmap", "configMapRef"), ("secret", "secretRef")):
            if key in source:
                ref = source[key]
                data = lookup(kind, namespace, ref["name"])
                if data is None and not ref.get("optional"):
                    raise ConfigError(f"{kind} {ref['name']!r} not found")
                env.update({prefix + k: v for k, v in (data or {}).items()})
    for item in container.get("env", []):
        name = item["name"]
        if "value" in item or "valueFrom" not in item:
            env[name] = expand(str(item.get("value", "")), env)
            continue
        source = item["valueFrom"]
        if "fieldRef" in source:
            env[name] = field_ref(pod, source["fieldRef"]["fieldPath"], net)
        elif "resourceFieldRef" in source:
            env[name] = resource_field(container, source["resourceFieldRef"])
        else:
            kind, key = (
                ("configmap", "configMapKeyRef")
                if "configMapKeyRef" in source
                else ("secret", "secretKeyRef")
            )
            ref = source[key]
            data = lookup(kind, namespace, ref["name"]) or {}
            if ref["key"] in data:
                env[name] = data[ref["key"]]
            elif not ref.get("optional"):
                raise ConfigError(f"{kind} {ref['name']!r} has no key {ref['key']!r}")
    return env


def command_line(container: Mapping[str, Any], env: Mapping[str, str]) -> list[str]:
    """``command`` + ``args`` with ``$(VAR)`` expanded. There is no image entrypoint to use."""
    argv = [*container.get("command", []), *container.get("args", [])]
    if not container.get("command"):
        raise ConfigError(
            f"container {container.get('name')!r} has no command; the process kubelet "
            "runs commands, not images"
        )
    return [expand(str(arg), env) for arg in argv]


def hostname_of(pod: Mapping[str, Any]) -> tuple[str, str]:
    """(hostname, fully qualified name) as Kubernetes DNS would give them."""
    meta = pod.get("metadata", {})
    spec = pod.get("spec", {})
    host = (spec.get("hostname") or meta.get("name", "pod"))[:63]
    subdomain = spec.get("subdomain")
    if subdomain:
        return host, f"{host}.{subdomain}.{meta.get('namespace', 'default')}.svc.cluster.local"
    return host, host


def render_hosts(entries: Mapping[str, tuple[str, str]]) -> str:
    """An /etc/hosts body mapping each pod IP to its hostname and FQDN."""
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    for ip, (host, fqdn) in sorted(entries.items()):
        lines.append(f"{ip}\t{fqdn} {host}" if fqdn != host else f"{ip}\t{host}")
    return "\n".join(lines) + "\n"


def resolve_port(container: Mapping[str, Any], port: int | str) -> int:
    """A probe port, which may name one of the container's ports."""
    if isinstance(port, int) or str(port).isdigit():
        return int(port)
    for item in container.get("ports", []):
        if item.get("name") == port:
            return int(item["containerPort"])
    raise ConfigError(f"no container port named {port!r}")


def probe_due(
    probe: Mapping[str, Any], record: ContainerRecord, *, last: float | None, now: float
) -> bool:
    """Whether a probe should run now, given the container start and the previous probe."""
    if record.started_at is None:
        return False
    if now < record.started_at + float(probe.get("initialDelaySeconds", 0)):
        return False
    return last is None or now >= last + float(probe.get("periodSeconds", 10))


def apply_probe_result(record: ContainerRecord, probe: Mapping[str, Any], ok: bool) -> None:
    """Update ``record.ready`` from one readiness probe outcome with the probe's thresholds."""
    if ok:
        record.probe_successes += 1
        record.probe_failures = 0
        if record.probe_successes >= int(probe.get("successThreshold", 1)):
            record.ready = True
    else:
        record.probe_failures += 1
        record.probe_successes = 0
        if record.probe_failures >= int(probe.get("failureThreshold", 3)):
            record.ready = False


def apply_liveness_result(record: ContainerRecord, probe: Mapping[str, Any], ok: bool) -> bool:
    """Count one liveness probe outcome; True when the container must be killed."""
    record.liveness_failures = 0 if ok else record.liveness_failures + 1
    return record.liveness_failures >= int(probe.get("failureThreshold", 3))
