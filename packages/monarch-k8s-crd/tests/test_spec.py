"""kubetorch's Compute (real objects), dicts and MeshSpec become one MonarchMesh."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import kubetorch as kt
import pytest

from monarch_k8s.errors import InvalidJobError
from monarch_k8s.spec import (
    QUEUE_LABEL,
    MeshSpec,
    SetupStep,
    attach_manifest,
    check_name,
    mesh_manifest,
    setup_files,
    to_spec,
)


def test_a_kubetorch_compute_becomes_a_monarchmesh_with_only_what_the_user_asked(
    tmp_path: Path,
) -> None:
    (tmp_path / "conf.yaml").write_text("lr: 0.1\n")
    image = (
        kt.Image(image_id="ghcr.io/me/train:1")
        .pip_install(["numpy==2.1", "einops"])
        .set_env_vars({"HF_HOME": "/cache"})
        .run_bash("echo ready > marker")
        .copy(str(tmp_path / "conf.yaml"), "conf/conf.yaml")
    )
    compute = kt.Compute(
        gpus=2, cpus="8", memory="64Gi", replicas=4, image=image,
        env_vars={"WANDB_MODE": "offline"}, node_selector={"pool": "a100"},
        tolerations=[{"key": "spot", "operator": "Exists"}], labels={"team": "llm"},
        annotations={"owner": "me"}, queue_name="research", priority_class_name="high",
        service_account_name="trainer", shared_memory_limit="8Gi",
    )  # fmt: skip
    spec = to_spec(compute)
    assert spec.replicas == 4 and spec.gpus == 2 and spec.cpus == "8" and spec.memory == "64Gi"
    assert spec.env == {"WANDB_MODE": "offline"}  # kubetorch's KT_LOG_LEVEL is not carried over
    assert spec.labels == {"team": "llm"} and spec.queue_name == "research"
    assert spec.setup == (
        SetupStep("pip", ("numpy==2.1",)),  # kubetorch keeps one step per requirement
        SetupStep("pip", ("einops",)),
        SetupStep("env", ("HF_HOME=/cache",)),
        SetupStep("bash", ("echo ready > marker",)),
        SetupStep("copy", (str(tmp_path / "conf.yaml"), "conf/conf.yaml")),
    )
    data, files = setup_files(spec)
    body = mesh_manifest("llm", "ml", spec, files_configmap="llm-setup-files", files=files)
    assert body["apiVersion"] == "monarch.pytorch.org/v1alpha1" and body["kind"] == "MonarchMesh"
    assert body["metadata"]["labels"][QUEUE_LABEL] == "research"  # Kueue admits by this label
    mesh = body["spec"]
    assert mesh["replicas"] == 4 and mesh["port"] == 26600
    assert mesh["gateway"] == {"enabled": True} and mesh["sync"] == {"enabled": True}
    template = mesh["podTemplate"]
    assert template["metadata"] == {
        "labels": {"team": "llm", QUEUE_LABEL: "research"},
        "annotations": {"owner": "me"},
    }
    pod = template["spec"]
    worker = pod["containers"][0]
    assert "command" not in worker  # the operator injects the worker bootstrap
    assert worker["image"] == "ghcr.io/me/train:1"
    assert worker["resources"] == {
        "requests": {"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": 2},
        "limits": {"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": 2},
    }
    env = {e["name"]: e["value"] for e in worker["env"]}
    assert env["WANDB_MODE"] == "offline" and env["HF_HOME"] == "/cache"
    assert env["PYTHONPATH"].startswith("/opt/monarch-setup/")
    assert pod["nodeSelector"] == {"pool": "a100"}
    assert {"key": "spot", "operator": "Exists"} in pod["tolerations"]
    assert pod["priorityClassName"] == "high" and pod["serviceAccountName"] == "trainer"
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}} in pod["volumes"]
    # The image steps run in an init container, keyed by a hash of the plan (the cache key).
    (init,) = pod["initContainers"]
    assert init["command"] == ["python", "-m", "monarch_k8s.bootstrap"]
    plan = json.loads(init["env"][0]["value"])
    assert [s["kind"] for s in plan["steps"]] == ["pip", "pip", "bash"]
    assert plan["files"] == [{"key": "f0", "dest": "conf/conf.yaml"}]
    assert base64.b64decode(data["f0"]) == b"lr: 0.1\n"
    assert (
        env["PYTHONPATH"]
        == f"/opt/monarch-setup/{plan['hash']}/site:/opt/monarch-setup/{plan['hash']}/files"
    )


def test_a_cpu_compute_drops_kubetorchs_gpu_tolerations_and_steps_nothing() -> None:
    body = mesh_manifest("cpu", "default", to_spec(kt.Compute(cpus="1", replicas=2)))
    pod = body["spec"]["podTemplate"]["spec"]
    assert "tolerations" not in pod and "initContainers" not in pod and "volumes" not in pod
    assert "serviceAccountName" not in pod  # kubetorch's own account is not assumed here
    assert body["spec"]["replicas"] == 2


def test_a_dict_and_a_meshspec_need_no_kubetorch() -> None:
    spec = to_spec({"replicas": 2, "cpus": "1", "command": ["python", "-m", "w"]})
    assert spec == MeshSpec(replicas=2, cpus="1", command=["python", "-m", "w"])
    pod = mesh_manifest("a", "ns", spec)["spec"]["podTemplate"]["spec"]
    assert pod["containers"][0]["command"] == ["python", "-m", "w"]
    with pytest.raises(InvalidJobError, match="unknown keys \\['gpu'\\]"):
        to_spec({"gpu": 1})
    with pytest.raises(InvalidJobError, match="not int"):
        to_spec(3)


@pytest.mark.parametrize("name", ["Trainers", "my-mesh", "1mesh", "a" * 64, ""])
def test_bad_names_are_refused_with_the_rule(name: str) -> None:
    with pytest.raises(InvalidJobError, match="lowercase letters and digits"):
        check_name(name)


def test_zero_replicas_and_an_empty_selector_are_refused() -> None:
    with pytest.raises(InvalidJobError, match="at least 1"):
        mesh_manifest("a", "ns", MeshSpec(replicas=0))
    with pytest.raises(InvalidJobError, match="at least one label"):
        attach_manifest("a", "ns", {})


def test_attach_mode_makes_a_gateway_and_no_workers() -> None:
    spec = attach_manifest("pre", "ns", {"app": "mine"})["spec"]
    assert spec["workerSelector"] == {"matchLabels": {"app": "mine"}}
    assert "replicas" not in spec and "podTemplate" not in spec


def test_an_image_step_that_needs_a_build_is_refused() -> None:
    image = kt.Image(image_id="x")
    image._dockerfile_contents.append("WORKDIR /app")
    with pytest.raises(InvalidJobError, match="build the image"):
        to_spec(kt.Compute(cpus="1", image=image))


def test_copy_sources_too_big_for_a_configmap_point_to_sync_dirs(tmp_path: Path) -> None:
    (tmp_path / "big.bin").write_bytes(b"x" * (1 << 20))
    spec = MeshSpec(setup=(SetupStep("copy", (str(tmp_path), "data")),))
    with pytest.raises(InvalidJobError, match="sync_dirs"):
        setup_files(spec)
