"""Environment, command line, hostname and probe rules, on plain pod dicts."""

from __future__ import annotations

from typing import Any

import pytest
from k8s_testenv.kubelet.network import IpPool
from k8s_testenv.kubelet.podspec import (
    ConfigError,
    PodNetwork,
    apply_liveness_result,
    apply_probe_result,
    build_env,
    command_line,
    expand,
    hostname_of,
    probe_due,
    render_hosts,
    resolve_port,
)
from k8s_testenv.kubelet.status import ContainerRecord, State

NET = PodNetwork(pod_ip="127.10.0.7", host_ip="127.0.0.1", node_name="node-0")


def pod(**spec: Any) -> dict[str, Any]:
    return {
        "metadata": {
            "name": "job-abc",
            "namespace": "team",
            "uid": "u-1",
            "labels": {"app": "x"},
            "annotations": {"batch.kubernetes.io/job-completion-index": "3"},
        },
        "spec": {"nodeName": "node-0", "serviceAccountName": "default", **spec},
    }


def no_lookup(kind: str, namespace: str, name: str) -> None:
    return None


def test_downward_api_fields_resolve_from_the_pod_and_the_kubelet() -> None:
    fields = {
        "POD_NAME": "metadata.name",
        "POD_NAMESPACE": "metadata.namespace",
        "POD_IP": "status.podIP",
        "NODE": "spec.nodeName",
        "JOB_COMPLETION_INDEX": "metadata.annotations['batch.kubernetes.io/job-completion-index']",
        "APP": "metadata.labels['app']",
    }
    container = {
        "name": "c",
        "env": [
            {"name": k, "valueFrom": {"fieldRef": {"fieldPath": v}}} for k, v in fields.items()
        ],
    }
    env = build_env(pod(), container, NET, base={}, lookup=no_lookup)
    assert {k: env[k] for k in fields} == {
        "POD_NAME": "job-abc",
        "POD_NAMESPACE": "team",
        "POD_IP": "127.10.0.7",
        "NODE": "node-0",
        "JOB_COMPLETION_INDEX": "3",
        "APP": "x",
    }
    assert env["HOSTNAME"] == "job-abc"


def test_env_values_expand_earlier_variables_and_escape_dollars() -> None:
    container = {
        "name": "c",
        "env": [
            {"name": "A", "value": "one"},
            {"name": "B", "value": "$(A)-two-$(MISSING)-$$(A)"},
        ],
    }
    env = build_env(pod(), container, NET, base={"PATH": "/bin"}, lookup=no_lookup)
    assert env["B"] == "one-two-$(MISSING)-$(A)"
    assert env["PATH"] == "/bin"


def test_config_map_and_secret_references_use_the_lookup() -> None:
    data = {
        ("configmap", "team", "cfg"): {"mode": "fast"},
        ("secret", "team", "s"): {"pw": "hunter2"},
    }
    container = {
        "name": "c",
        "envFrom": [{"configMapRef": {"name": "cfg"}, "prefix": "CFG_"}],
        "env": [{"name": "PW", "valueFrom": {"secretKeyRef": {"name": "s", "key": "pw"}}}],
    }
    env = build_env(pod(), container, NET, base={}, lookup=lambda k, ns, n: data.get((k, ns, n)))
    assert (env["CFG_mode"], env["PW"]) == ("fast", "hunter2")


def test_missing_secret_key_is_a_config_error_unless_optional() -> None:
    ref = {"name": "s", "key": "nope"}
    container = {"name": "c", "env": [{"name": "X", "valueFrom": {"secretKeyRef": ref}}]}
    with pytest.raises(ConfigError):
        build_env(pod(), container, NET, base={}, lookup=no_lookup)
    ref["optional"] = True  # type: ignore[assignment]
    assert "X" not in build_env(pod(), container, NET, base={}, lookup=no_lookup)


def test_resource_field_ref_rounds_up_like_the_kubelet() -> None:
    container = {
        "name": "c",
        "resources": {"limits": {"cpu": "1500m", "memory": "1Gi"}},
        "env": [
            {"name": "CPUS", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}},
            {
                "name": "MEM_MI",
                "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}},
            },
        ],
    }
    env = build_env(pod(), container, NET, base={}, lookup=no_lookup)
    assert (env["CPUS"], env["MEM_MI"]) == ("2", "1024")


def test_command_and_args_are_expanded_and_a_command_is_required() -> None:
    argv = command_line(
        {"name": "c", "command": ["echo"], "args": ["$(WHO)", "$$HOME"]}, {"WHO": "me"}
    )
    assert argv == ["echo", "me", "$HOME"]
    with pytest.raises(ConfigError, match="no command"):
        command_line({"name": "c", "image": "nginx"}, {})


def test_statefulset_pod_hostname_and_fqdn() -> None:
    assert hostname_of(pod(hostname="web-0", subdomain="web")) == (
        "web-0",
        "web-0.web.team.svc.cluster.local",
    )
    assert hostname_of(pod()) == ("job-abc", "job-abc")
    hosts = render_hosts({"127.10.0.2": ("web-0", "web-0.web.team.svc.cluster.local")})
    assert "127.10.0.2\tweb-0.web.team.svc.cluster.local web-0\n" in hosts
    assert hosts.startswith("127.0.0.1\tlocalhost\n")


def test_probe_ports_may_be_named() -> None:
    container = {"ports": [{"name": "http", "containerPort": 8080}]}
    assert resolve_port(container, "http") == 8080
    assert resolve_port(container, 81) == 81
    with pytest.raises(ConfigError):
        resolve_port(container, "grpc")


def test_probe_waits_for_initial_delay_then_runs_every_period() -> None:
    probe = {"initialDelaySeconds": 2, "periodSeconds": 5}
    record = ContainerRecord("c", state=State.RUNNING, started_at=100.0)
    assert not probe_due(probe, record, last=None, now=101.0)
    assert probe_due(probe, record, last=None, now=102.0)
    assert not probe_due(probe, record, last=102.0, now=106.0)
    assert probe_due(probe, record, last=102.0, now=107.0)


def test_readiness_honours_success_and_failure_thresholds() -> None:
    probe = {"successThreshold": 2, "failureThreshold": 2}
    record = ContainerRecord("c", state=State.RUNNING)
    apply_probe_result(record, probe, True)
    assert not record.ready
    apply_probe_result(record, probe, True)
    assert record.ready
    apply_probe_result(record, probe, False)
    assert record.ready
    apply_probe_result(record, probe, False)
    assert not record.ready


def test_liveness_kills_only_after_consecutive_failures() -> None:
    probe = {"failureThreshold": 2}
    record = ContainerRecord("c", state=State.RUNNING)
    assert [apply_liveness_result(record, probe, ok) for ok in (False, True, False, False)] == [
        False,
        False,
        False,
        True,
    ]


def test_expand_leaves_unknown_references_alone() -> None:
    assert expand("$(A)$(B)", {"A": "x"}) == "x$(B)"


def test_ip_pool_hands_out_fresh_addresses_first_and_reuses_released_ones_when_exhausted() -> None:
    pool = IpPool()
    first, second = pool.allocate(), pool.allocate()
    assert first != second and first.startswith("127.10.")
    pool.release(first)
    assert pool.allocate() not in (first, second)  # a recreated pod gets a new IP
    small = IpPool("127.10.0.0/30")  # two hosts
    a, b = small.allocate(), small.allocate()
    assert a != b
    small.release(a)
    assert small.allocate() == a
