"""The install manifests, the CRD and the Dockerfile agree with the code that uses them."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from monarch_k8s import names
from monarch_k8s.install import manifest_objects, manifests_dir
from monarch_k8s.operator.reconcile import KINDS
from monarch_k8s.operator.render import RenderOptions, parse_mesh, render_children
from monarch_k8s.torchrun.cache import FEEDER_ROLE_RULES
from monarch_k8s.torchrun.reconcile import KINDS as TORCHRUN_KINDS

DOCKERFILE = Path(__file__).parent.parent.parent / "Dockerfile"
MODULE_OWNERS = {"monarch_k8s": "monarch-k8s-crd", "monarch_gateway": "monarch-gateway"}


def by_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    return next(o for o in objects if o["kind"] == kind)


def test_the_kustomize_base_lists_every_manifest_file() -> None:
    kustomization = yaml.safe_load((manifests_dir() / "kustomization.yaml").read_text())
    files = {p.name for p in Path(str(manifests_dir())).glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files
    assert kustomization["namespace"] == names.OPERATOR_NAMESPACE


def test_the_crd_matches_the_names_and_upstream_rules() -> None:
    crd = by_kind(manifest_objects(), "CustomResourceDefinition")
    assert crd["metadata"]["name"] == f"{names.PLURAL}.{names.GROUP}"
    assert crd["spec"]["names"]["kind"] == names.KIND
    (version,) = crd["spec"]["versions"]
    assert version["name"] == names.VERSION and version["served"] and version["storage"]
    assert version["subresources"]["scale"]["specReplicasPath"] == ".spec.replicas"
    assert "status" in version["subresources"]
    schema = version["schema"]["openAPIV3Schema"]
    spec = schema["properties"]["spec"]["properties"]
    assert spec["replicas"]["minimum"] == 1
    assert spec["port"]["default"] == names.WORKER_PORT
    assert spec["podTemplate"]["x-kubernetes-preserve-unknown-fields"] is True
    assert spec["gateway"]["properties"]["port"]["default"] == names.GATEWAY_PORT
    (name_rule,) = schema["x-kubernetes-validations"]
    assert names.MESH_NAME_RE.pattern in name_rule["rule"] and "<= 63" in name_rule["rule"]
    status = schema["properties"]["status"]["properties"]
    assert {"replicas", "readyReplicas", "serviceName", "conditions", "gateway"} <= set(status)


def test_the_namespace_moves_everything_namespaced_and_the_binding_subject() -> None:
    objects = manifest_objects("ops", {"MONARCH_LISTEN_HOST": "podIP"})
    assert by_kind(objects, "Namespace")["metadata"]["name"] == "ops"
    assert by_kind(objects, "ServiceAccount")["metadata"]["namespace"] == "ops"
    assert by_kind(objects, "ClusterRoleBinding")["subjects"][0]["namespace"] == "ops"
    env = by_kind(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "MONARCH_LISTEN_HOST", "value": "podIP"} in env
    assert [e["name"] for e in env].count("MONARCH_LISTEN_HOST") == 1


def test_the_operator_role_covers_what_it_writes_and_nothing_it_does_not() -> None:
    rules = by_kind(manifest_objects(), "ClusterRole")["rules"]
    granted = {
        (group, resource, verb)
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    assert not any("*" in item for item in granted)
    assert not any(verb == "deletecollection" for _, _, verb in granted)
    deletable = {resource for _, resource, verb in granted if verb == "delete"}
    # only kinds stale_children may name, a TorchrunJob past its TTL, the KAI Queues of
    # deleted TorchrunQueues and worker pods restarted in place (operator/restarts.py); never
    # Secrets (a token) or anything else
    assert deletable == {"statefulsets", "deployments", "services", "serviceaccounts", "roles",
                         "rolebindings", "torchrunjobs", "queues", "pods"}  # fmt: skip
    assert ("", "pods", "delete") in granted and ("", "pods", "patch") in granted
    plural = {"StatefulSet": "statefulsets", "Deployment": "deployments", "Service": "services",
              "Secret": "secrets", "ServiceAccount": "serviceaccounts", "Role": "roles",
              "RoleBinding": "rolebindings"}  # fmt: skip
    for kind, api_version in KINDS.items():
        group = api_version.rpartition("/")[0]
        for verb in ("get", "create", "update", "patch"):
            assert (group, plural[kind], verb) in granted, (kind, verb)
    torchrun_plural = {"Service": "services", "PersistentVolumeClaim": "persistentvolumeclaims",
                       "Pod": "pods", "Secret": "secrets", "ConfigMap": "configmaps",
                       "Deployment": "deployments", "Job": "jobs",
                       "ServiceAccount": "serviceaccounts", "Role": "roles",
                       "RoleBinding": "rolebindings"}  # fmt: skip
    for kind, api_version in TORCHRUN_KINDS.items():  # what a TorchrunJob creates
        group = api_version.rpartition("/")[0]
        for verb in ("get", "create"):
            assert (group, torchrun_plural[kind], verb) in granted, (kind, verb)
    # it may grant the gateway only what it holds itself (RBAC escalation check)
    for verb in ("get", "list", "watch"):
        assert ("", "pods", verb) in granted
    for rule in FEEDER_ROLE_RULES:  # and the workspace cache likewise
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    assert (group, resource, verb) in granted, (resource, verb)
    assert ("", "secrets", "list") not in granted  # reads its own Secrets by name only


def python_modules(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "-m" and argv[0] == "python"]


def every_command() -> list[list[str]]:
    """The operator's command and every command the operator puts in a pod."""
    operator = by_kind(manifest_objects(), "Deployment")["spec"]["template"]["spec"]
    commands = [c["command"] for c in operator["containers"]]
    mesh = parse_mesh({"metadata": {"name": "m", "namespace": "n"}, "spec": {
        "replicas": 1, "gateway": {"enabled": True}, "sync": {"enabled": True},
        "podTemplate": {"containers": [{"name": "w"}]}}})  # fmt: skip
    for obj in render_children(mesh, now=datetime.now(UTC), opts=RenderOptions()):
        template = obj.get("spec", {}).get("template", {}).get("spec", {})
        commands += [c["command"] for c in template.get("containers", [])]
    return commands


def dockerfile() -> tuple[list[str], str]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    cmd = next(ln for ln in lines if ln.startswith("CMD "))
    installs = " ".join(ln for ln in lines if ln.startswith("RUN pip install"))
    return json.loads(cmd.removeprefix("CMD ")), installs


def test_the_dockerfile_runs_the_operator_as_the_manifests_do_and_installs_every_entry_point() -> (
    None
):
    cmd, installs = dockerfile()
    commands = every_command()
    assert cmd == commands[0] == ["python", "-m", "monarch_k8s.operator"]
    installed = {Path(w.strip("\"'").split("[")[0]).name for w in shlex.split(installs)[2:]}
    modules = {m for argv in commands for m in python_modules(argv)}
    assert modules == {"monarch_k8s.operator", "monarch_k8s.run"}
    for module in modules:
        assert MODULE_OWNERS[module.split(".")[0]] in installed, module
        assert importlib.util.find_spec(module) is not None, module
    assert "monarch-gateway" in installed  # what monarch_k8s.run starts
    assert "monarch-k8s-crd[operator]" in installs  # kopf
