"""The generated task, per mode, round-trips through SkyPilot's own parser and validator.

Nothing is faked: ``sky.Task.from_yaml_config`` and ``validate()`` are SkyPilot's (they run
offline for resources that need no catalog lookup). Secrets are random per launch, so the
snapshot shows their names with the values replaced.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest
import sky
import yaml

from monarch_skypilot import InvalidJobError, TaskSpec, build_task
from monarch_skypilot.task import node_command, split_nodes

SNAPSHOTS = Path(__file__).parent / "snapshots"
SECRETS = {
    "MONARCH_GATEWAY_TOKEN": "t",
    "MONARCH_SKYPILOT_TLS_CERT": "c",
    "MONARCH_SKYPILOT_TLS_KEY": "k",
}


def candidates() -> list[Any]:
    # no region, accelerator or spot: those make validate() fetch SkyPilot's catalog (network)
    return [sky.Resources(infra="aws"), sky.Resources(infra="gcp")]


def snapshot(name: str, config: dict[str, Any]) -> None:
    shown = dict(config)
    shown["secrets"] = {k: "<redacted>" for k in shown.get("secrets") or {}}
    text = yaml.safe_dump(shown, sort_keys=True)
    path = SNAPSHOTS / f"{name}.yaml"
    if os.environ.get("UPDATE_SNAPSHOTS"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert text == path.read_text(), f"{name}: UPDATE_SNAPSHOTS=1 rewrites {path}"


@pytest.mark.parametrize("mode", ["gateway", "direct"])
def test_task_round_trips_through_skypilot_and_matches_its_snapshot(mode: str) -> None:
    spec = TaskSpec(meshes={"trainers": 2, "eval": 1}, mode=mode, setup_commands="pip install x")  # type: ignore[arg-type]
    config = build_task(spec, candidates(), secrets=SECRETS if mode == "gateway" else None)
    task = sky.Task.from_yaml_config(copy.deepcopy(config))  # it consumes its argument
    task.validate()
    assert task.num_nodes == 3
    assert [str(r.cloud) for r in task.resources] == ["AWS", "GCP"]  # failover, in order
    port = "8443" if mode == "gateway" else "22222"
    assert all(r.ports == [port] for r in task.resources)  # one port opened, per mode
    again = task.to_yaml_config()
    again.pop("_user_specified_yaml", None)
    assert again == config
    snapshot(f"task-{mode}", config)


def test_batch_task_runs_the_client_script_on_the_head() -> None:
    spec = TaskSpec(meshes={"hosts": 2}, mode="direct", batch_script="train.py", setup_commands=":")
    config = build_task(spec, sky.Resources(infra="aws"), image_id=None)
    sky.Task.from_yaml_config(copy.deepcopy(config)).validate()
    assert "--batch-script train.py" in config["run"]
    snapshot("task-batch", config)


def test_run_reads_skypilot_node_rank_and_ips_and_starts_the_module() -> None:
    run = node_command(TaskSpec(meshes={"a": 1}, python_exe="/opt/py bin/python"))
    assert run.startswith("'/opt/py bin/python' -u -m monarch_skypilot.node ")
    assert '--rank "$SKYPILOT_NODE_RANK" --ips "$SKYPILOT_NODE_IPS"' in run
    assert " -c " not in run  # a module entry point, no inline Python


def test_use_spot_reaches_every_candidate() -> None:
    config = build_task(TaskSpec(meshes={"a": 1}), candidates(), use_spot=True, image_id=None)
    assert [r["use_spot"] for r in config["resources"]["ordered"]] == [True, True]


def test_default_setup_pins_this_clients_monarch_version() -> None:
    config = build_task(TaskSpec(meshes={"a": 1}), sky.Resources(infra="aws"))
    assert "torchmonarch==0.7.0" in config["setup"] and "monarch-skypilot[node]" in config["setup"]
    assert (
        str(config["resources"]["image_id"]).count("docker:pytorch/pytorch") == 1
    )  # design default


def test_nodes_are_cut_into_meshes_in_order_head_first() -> None:
    ips = ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    assert split_nodes({"trainers": 2, "eval": 1}, ips) == {
        "trainers": ["10.0.0.1", "10.0.0.2"],
        "eval": ["10.0.0.3"],
    }


@pytest.mark.parametrize("meshes", [{}, {"a": 0}, {"bad name": 1}])
def test_bad_meshes_are_refused_naming_the_fix(meshes: dict[str, int]) -> None:
    with pytest.raises(InvalidJobError, match="mesh"):
        TaskSpec(meshes=meshes)
