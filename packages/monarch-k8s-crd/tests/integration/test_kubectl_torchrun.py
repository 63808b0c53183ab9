"""``kubectl torchrun`` (the built kubectl finds the plugin on PATH) against the operator
running as a pod from the install manifests, on k8s-testenv's real control plane: a 2-node,
2-process-per-node gloo job trains a tiny model to Succeeded from the current directory;
a resubmit after a one-file edit sends only that file; hot reload reaches a running job;
list, logs, describe, suspend, resume and delete; --help and exit codes.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import kubernetes.client as k8s
import pytest
from k8s_testenv.testing import wait_until

from monarch_k8s.testing import cpu_queue, kubectl, kubectl_apply, torchrun_status
from monarch_k8s.torchrun import names

TRAIN = """\
import argparse
import sys
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

MARK = "edition-1"
parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=30)
steps = parser.parse_args().steps
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
model = DDP(torch.nn.Linear(4, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.05)
x = torch.randn(256, 4)
y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
losses = []
for _ in range(steps):
    opt.zero_grad()
    loss = ((model(x) - y) ** 2).mean()
    loss.backward()
    opt.step()
    losses.append(loss.item())
line = f"{MARK} rank={rank} world={world} first={losses[0]:.4f} last={losses[-1]:.4f}\\n"
sys.stdout.write(line)  # one write: the node's processes share the pod's output
sys.stdout.flush()
dist.destroy_process_group()
"""


def ok(result: Any) -> Any:
    assert result.returncode == 0, f"rc={result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture
def queue(k8s_cluster: Any, monarch_operator: Any, k8s_namespace: str) -> str:
    kubectl_apply(k8s_cluster, k8s_namespace, cpu_queue())
    return k8s_namespace


def worker_logs(api: Any, namespace: str, job: str) -> str:
    core = k8s.CoreV1Api(api)
    out = []
    for pod in core.list_namespaced_pod(namespace, label_selector=f"{names.JOB_LABEL}={job}").items:
        for container in ("workspace-sync", "trainer"):
            try:
                log = core.read_namespaced_pod_log(
                    pod.metadata.name, namespace, container=container
                )
            except k8s.ApiException as exc:
                log = f"<{exc.reason}>"
            out.append(f"--- {pod.metadata.name}/{container}\n{log[-3000:]}")
    return "\n".join(out)


def wait_phase(api: Any, namespace: str, job: str, want: str, timeout: float = 240) -> None:
    def reached() -> bool:
        got = torchrun_status(api, namespace, job)
        if got.get("phase") == "Failed" and want != "Failed":
            raise AssertionError(f"job {job} Failed: {got}\n{worker_logs(api, namespace, job)}")
        return got.get("phase") == want

    wait_until(reached, timeout=timeout, what=f"TorchrunJob {job} {want}", interval=0.5)


def sent(stderr: str) -> tuple[int, str]:
    """(bytes sent, what changed) from submit's summary line."""
    found = re.search(r"sent (\d+) bytes \(([^)]*)\)", stderr)
    assert found, stderr
    return int(found.group(1)), found.group(2)


def workspace(tmp_path: Path) -> Path:
    ws = tmp_path / "project"
    (ws / "data").mkdir(parents=True)
    (ws / "train.py").write_text(TRAIN)
    (ws / "README.md").write_text("tiny model\n" * 1000)
    (ws / ".gitignore").write_text("data/\n")
    (ws / "data" / "big.bin").write_bytes(b"\0" * 5_000_000)  # ignored: never uploaded
    return ws


def test_submit_trains_to_succeeded_and_a_resubmit_sends_only_the_edit(
    k8s_cluster: Any, k8s_api: Any, queue: str, tmp_path: Path
) -> None:
    ns, ws = queue, workspace(tmp_path)
    submit = ["torchrun", "-n", ns, "submit", "--queue", "cpu", "--gpus", "4", "--nodes", "2",
              "--backend", "gloo", "python train.py --steps 30"]  # fmt: skip
    first = ok(kubectl(k8s_cluster, *submit, cwd=ws))
    job = first.stdout.strip()
    assert re.fullmatch(r"project-[0-9a-f]{6}", job), first.stdout
    first_bytes, _ = sent(first.stderr)
    assert 0 < first_bytes < 1_000_000  # train.py, README.md, .gitignore; not data/big.bin
    wait_phase(k8s_api, ns, job, "Succeeded")
    logs = ok(kubectl(k8s_cluster, "torchrun", "-n", ns, "logs", job)).stdout
    lines = [line for line in logs.splitlines() if "edition-1" in line]
    assert len(lines) == 4, logs  # every process of both nodes
    assert {line.split("]")[0] + "]" for line in lines} == {"[rank 0]", "[rank 1]"}
    for line in lines:
        assert "world=4" in line
        first_loss, last_loss = (float(v) for v in re.findall(r"(?:first|last)=([\d.]+)", line))
        assert last_loss < first_loss / 2, line  # it trained

    edited = TRAIN.replace("edition-1", "edition-2")
    (ws / "train.py").write_text(edited)
    second = ok(kubectl(k8s_cluster, *submit, cwd=ws))
    job2 = second.stdout.strip()
    assert job2 != job
    assert sent(second.stderr) == (
        len(edited.encode()),
        "1 changed since the last upload from here: train.py",
    )
    wait_phase(k8s_api, ns, job2, "Succeeded")
    logs2 = ok(kubectl(k8s_cluster, "torchrun", "-n", ns, "logs", job2)).stdout
    assert logs2.count("edition-2") == 4 and "edition-1" not in logs2


RELOAD = """\
import os, time
path = os.path.join(os.environ["TORCHRUN_WORKSPACE"], "msg.txt")
print("started with", open(path).read().strip(), flush=True)
while open(path).read().strip() != "v2":
    time.sleep(0.1)
print("reloaded to v2 at", os.readlink(os.environ["TORCHRUN_WORKSPACE"]), flush=True)
"""


def test_hot_reload_reaches_the_running_workers(
    k8s_cluster: Any, k8s_api: Any, queue: str, tmp_path: Path
) -> None:
    ns, ws = queue, tmp_path / "reload"
    ws.mkdir()
    (ws / "reload.py").write_text(RELOAD)
    (ws / "msg.txt").write_text("v1\n")
    submit = ["torchrun", "-n", ns, "submit", "--queue", "cpu", "--nodes", "2",
              "--procs-per-node", "1", "--name", "reload", "python reload.py"]  # fmt: skip
    ok(kubectl(k8s_cluster, *submit, cwd=ws))
    wait_until(
        lambda: kubectl(k8s_cluster, "torchrun", "-n", ns, "logs", "reload").stdout.count(
            "started with v1"
        )
        == 2,
        timeout=240, what="both workers running v1", interval=0.5,
    )  # fmt: skip
    (ws / "msg.txt").write_text("v2\n")
    reload = ok(kubectl(k8s_cluster, "torchrun", "-n", ns, "sync", "reload", cwd=ws))
    assert sent(reload.stderr) == (3, "1 changed since the last upload from here: msg.txt")
    assert "2/2 running workers hold" in reload.stderr
    wait_phase(k8s_api, ns, "reload", "Succeeded")  # the same pods: nothing was recreated
    logs = ok(kubectl(k8s_cluster, "torchrun", "-n", ns, "logs", "reload")).stdout
    assert logs.count("reloaded to v2") == 2, logs


def test_plugin_help_exit_codes_and_job_management(
    k8s_cluster: Any, k8s_api: Any, queue: str, tmp_path: Path
) -> None:
    ns = queue
    helped = ok(kubectl(k8s_cluster, "torchrun", "--help"))
    for command in ("submit", "list", "logs", "describe", "suspend", "resume", "delete"):
        assert command in helped.stdout
    ok(kubectl(k8s_cluster, "torchrun", "submit", "--help"))
    for args, message in (
        ((), "error:"),
        (("frobnicate",), "invalid choice"),
        (("submit", "python train.py"), "--queue"),
        (("-n", ns, "describe", "nosuch"), 'torchrunjobs.torchrun.ai "nosuch" not found'),
        (("--context", "nosuch", "list"), 'context "nosuch" does not exist'),
    ):
        result = kubectl(k8s_cluster, "torchrun", *args)
        assert result.returncode == 1 and message in result.stderr, (args, result.stderr)

    ws = tmp_path / "sleepy"
    ws.mkdir()
    (ws / "loop.py").write_text("import time\nprint('looping', flush=True)\ntime.sleep(600)\n")
    submit = ["torchrun", "-n", ns, "submit", "--queue", "cpu", "--nodes", "1", "--procs-per-node",
              "1", "--name", "sleepy", "python loop.py"]  # fmt: skip
    ok(kubectl(k8s_cluster, *submit, cwd=ws))
    wait_phase(k8s_api, ns, "sleepy", "Running")
    listed = ok(kubectl(k8s_cluster, "torchrun", "-n", ns, "list")).stdout
    assert re.search(r"^sleepy\s+cpu\s+Running", listed, re.M), listed
    described = ok(kubectl(k8s_cluster, "torchrun", "-n", ns, "describe", "sleepy")).stdout
    assert "Phase:        Running" in described and "[rank 0] sleepy-0" in described
    follow = subprocess.Popen(
        [str(k8s_cluster.kubectl_path), "torchrun", "-n", ns, "logs", "-f", "sleepy"],
        env=k8s_cluster.kubectl_env(), stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert follow.stdout is not None
        assert follow.stdout.readline().strip() == "[rank 0] looping"
    finally:
        follow.kill()

    ok(kubectl(k8s_cluster, "torchrun", "-n", ns, "suspend", "sleepy"))
    wait_phase(k8s_api, ns, "sleepy", "Suspended")
    core = k8s.CoreV1Api(k8s_api)
    selector = f"{names.JOB_LABEL}=sleepy"
    wait_until(lambda: not core.list_namespaced_pod(ns, label_selector=selector).items,
             timeout=60, what="the suspended job's pods gone")  # fmt: skip
    ok(kubectl(k8s_cluster, "torchrun", "-n", ns, "resume", "sleepy"))
    wait_phase(k8s_api, ns, "sleepy", "Running")  # new pods, fed again by the cache
    ok(kubectl(k8s_cluster, "torchrun", "-n", ns, "delete", "sleepy"))
    result = kubectl(k8s_cluster, "torchrun", "-n", ns, "describe", "sleepy")
    assert result.returncode == 1 and "not found" in result.stderr
