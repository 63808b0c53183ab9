"""TorchrunJob settings as plain functions: the GPU distribution rule (a table), layouts from
numNodes and elastic ranges, queue overrides, and what fails with which reason."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from monarch_k8s.torchrun.spec import (
    JobSpecError,
    distribute,
    merge,
    parse_job,
    parse_queue,
)

EXAMPLES = Path(__file__).parents[4] / "examples" / "torchrun_design_examples.yaml"


def queue(spec: dict[str, Any], name: str = "q") -> Any:
    return parse_queue({"metadata": {"name": name, "namespace": "ns"}, "spec": spec})


def job(spec: dict[str, Any], q: Any) -> Any:
    body = {"metadata": {"name": "j", "namespace": "ns", "uid": "u1"}, "spec": spec}
    return parse_job(body, q)


GPU_QUEUE = {"image": "img", "nodeResources": {"gpus": 8, "cpus": 96, "memory": "512Gi"}}


@pytest.mark.parametrize(
    ("gpus", "per_node", "max_nodes", "want"),
    [
        (1, 8, None, (1, 1)),  # fits one node
        (8, 8, None, (1, 8)),  # exactly one node
        (4, 8, None, (1, 4)),  # partial single node
        (16, 8, None, (2, 8)),  # the design's example
        (32, 8, None, (4, 8)),  # "Will use 4 nodes with 8 GPUs each"
        (12, 8, None, (2, 6)),  # remainder spread: 2 x 6, not 8 + 4
        (10, 8, None, (2, 5)),
        (9, 8, None, (3, 3)),  # 9 does not split over 2
        (24, 8, 3, (3, 8)),  # at the cap
        (7, 4, None, (7, 1)),  # a prime: one GPU on each of 7 nodes
        (6, 4, None, (2, 3)),
    ],
)
def test_distribution_rule(
    gpus: int, per_node: int, max_nodes: int | None, want: tuple[int, int]
) -> None:
    assert distribute(gpus, per_node, max_nodes) == want


@pytest.mark.parametrize(
    ("gpus", "per_node", "max_nodes", "reason"),
    [
        (0, 8, None, "InvalidGPUs"),
        (25, 8, 3, "TooManyGPUs"),  # more than 3 x 8 can ever hold
        (17, 8, 4, "TooManyGPUs"),  # fits 4 x 8 but splits evenly only over 17 nodes
        (4, 0, None, "QueueHasNoGPUs"),
    ],
)
def test_distribution_refusals(
    gpus: int, per_node: int, max_nodes: int | None, reason: str
) -> None:
    with pytest.raises(JobSpecError) as err:
        distribute(gpus, per_node, max_nodes)
    assert err.value.reason == reason
    assert "spec.numGPUs" in str(err.value)


def test_num_nodes_takes_whole_nodes_and_cpu_queues_say_procs() -> None:
    gpu = job({"jobQueue": "q", "command": "x", "numNodes": 3}, queue(GPU_QUEUE))
    assert (gpu.layout.nodes, gpu.layout.procs_per_node, gpu.layout.gpus_per_node) == (3, 8, 8)
    cpu_q = queue({"image": "i", "nodeResources": {"cpus": 4}})
    cpu = job({"jobQueue": "q", "command": "x", "numNodes": 2, "procsPerNode": 2}, cpu_q)
    assert (cpu.layout.nodes, cpu.layout.procs_per_node, cpu.layout.gpus_per_node) == (2, 2, 0)


def test_elastic_range() -> None:
    j = job({"jobQueue": "q", "command": "x", "minNodes": 2, "maxNodes": 4}, queue(GPU_QUEUE))
    assert j.layout.elastic and (j.layout.min_nodes, j.layout.nodes) == (2, 4)


def test_job_overrides_queue_settings_deeply() -> None:
    q = queue({**GPU_QUEUE, "storage": {"workspace": {"enabled": True, "sizePerGPU": "10Gi"}},
               "scheduling": {"scheduler": "kai-scheduler", "priorityClassName": "low"}})  # fmt: skip
    spec = {"jobQueue": "q", "command": "x", "numGPUs": 8, "image": "mine",
            "scheduling": {"priorityClassName": "high"},
            "storage": {"workspace": {"sizePerGPU": "1Gi"}}}  # fmt: skip
    j = job(spec, q)
    assert j.image == "mine"
    assert j.scheduling == {"scheduler": "kai-scheduler", "priorityClassName": "high"}
    assert j.storage.workspace.enabled and j.storage.workspace.size_per_gpu == "1Gi"
    assert merge({"a": {"b": 1, "c": 2}}, {"a": {"c": 3}}) == {"a": {"b": 1, "c": 3}}


@pytest.mark.parametrize(
    ("spec", "q", "reason"),
    [
        ({"jobQueue": "missing", "command": "x", "numGPUs": 1}, None, "QueueNotFound"),
        ({"jobQueue": "q", "command": "  ", "numGPUs": 1}, GPU_QUEUE, "EmptyCommand"),
        (
            {"jobQueue": "q", "command": "x", "numGPUs": 1, "distributed": {"rdzvBackend": "zk"}},
            GPU_QUEUE,
            "UnknownRendezvousBackend",
        ),
        (
            {"jobQueue": "q", "command": "x", "numGPUs": 64},
            {**GPU_QUEUE, "nodeResources": {"gpus": 8, "maxNodes": 2}},
            "TooManyGPUs",
        ),
        (
            {"jobQueue": "q", "command": "x", "numNodes": 1, "procsPerNode": 9},
            GPU_QUEUE,
            "TooManyGPUs",
        ),
        (
            {
                "jobQueue": "q",
                "command": "x",
                "minNodes": 1,
                "maxNodes": 2,
                "distributed": {"rdzvBackend": "static"},
            },
            GPU_QUEUE,
            "StaticNotElastic",
        ),
        (
            {"jobQueue": "q", "command": "x", "numGPUs": 1},
            {"nodeResources": {"gpus": 8}},
            "NoImage",
        ),
    ],
)
def test_bad_inputs_name_a_reason(spec: dict[str, Any], q: Any, reason: str) -> None:
    with pytest.raises(JobSpecError) as err:
        job(spec, queue(q) if q is not None else None)
    assert err.value.reason == reason


def test_design_examples_parse() -> None:
    docs = list(yaml.safe_load_all(EXAMPLES.read_text()))
    queues = {d["metadata"]["name"]: parse_queue(d) for d in docs if d["kind"] == "TorchrunQueue"}
    jobs = [d for d in docs if d["kind"] == "TorchrunJob"]
    layouts = {d["metadata"]["name"]: parse_job(d, queues[d["spec"]["jobQueue"]]).layout
               for d in jobs}  # fmt: skip
    assert (layouts["training-job"].nodes, layouts["training-job"].procs_per_node) == (2, 8)
    assert (layouts["vit-training"].nodes, layouts["vit-training"].procs_per_node) == (4, 8)
