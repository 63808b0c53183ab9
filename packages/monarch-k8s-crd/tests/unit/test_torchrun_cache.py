"""The workspace's decisions (which pod gets which version, what a worker pod runs) and its
pod entry points run for real: an init agent that exits once a monarch-sync push brings its
version, and the trainer wrapper's exit status, signals and environment."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from monarch_k8s.torchrun import workspace
from monarch_k8s.torchrun.cache import (
    CONTAINER_INIT,
    LIVE_ANNOTATION,
    SYNC_PORT,
    TOKEN_SECRET,
    VERSION_ENV,
    WorkerPod,
    plan_feeds,
    render_cache,
    worker_pod,
)
from monarch_k8s.torchrun.names import JOB_LABEL
from monarch_k8s.torchrun.objects import Options
from monarch_k8s.torchrun.spec import parse_job, parse_queue
from monarch_sync import push, scan_tree

TOKEN = "unit-test-token"


def pod_json(stage: str, *, version: str = "v1", live: str | None = None, ip: str = "10.0.0.1"):
    init_state = {"running": {}} if stage == "init" else {"terminated": {"exitCode": 0}}
    trainer = {"running": {}} if stage == "running" else {"waiting": {}}
    return {
        "metadata": {
            "name": f"job-0-{stage}",
            "uid": f"uid-{stage}",
            "labels": {JOB_LABEL: "job"},
            "annotations": {LIVE_ANNOTATION: live} if live else {},
        },
        "spec": {
            "initContainers": [
                {"name": CONTAINER_INIT, "env": [{"name": VERSION_ENV, "value": version}]}
            ],
            "containers": [{"name": "trainer"}],
        },
        "status": {
            "podIP": ip,
            "initContainerStatuses": [{"name": CONTAINER_INIT, "state": init_state}],
            "containerStatuses": [{"name": "trainer", "state": trainer}],
        },
    }


def test_worker_pod_reads_stage_version_and_address() -> None:
    init = worker_pod(pod_json("init", version="abc"))
    assert init is not None
    assert (init.stage, init.created_version, init.address) == (
        "init",
        "abc",
        f"10.0.0.1:{SYNC_PORT}",
    )
    running = worker_pod(pod_json("running", live="abc"))
    assert running is not None and (running.stage, running.live_version) == ("running", "abc")
    bare = pod_json("init")
    bare["spec"]["initContainers"] = []
    assert worker_pod(bare) is None  # a job without a submitted workspace
    gone = pod_json("init")
    gone["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    assert worker_pod(gone) is None


def wp(
    name: str, stage: str, created: str, live: str | None = None, address: str | None = "a:1"
) -> WorkerPod:
    return WorkerPod(name, name, "job", address, stage, created, live)


def test_plan_feeds_starting_pods_get_their_version_running_pods_the_jobs() -> None:
    pods = [
        wp("a", "init", "v1"),
        wp("b", "running", "v1", live="v1"),  # hot reload: the job moved on to v2
        wp("c", "running", "v1", live="v2"),  # already there
        wp("d", "init", "v1", address=None),  # no IP yet
        wp("e", "other", "v1"),  # finished
    ]
    plan = plan_feeds(pods, {"job": "v2"}, {"v1", "v2"})
    assert {v: [p.name for p in ps] for v, ps in plan.items()} == {"v1": ["a"], "v2": ["b"]}


def test_plan_feeds_waits_for_the_cache_and_remembers_what_it_pushed() -> None:
    pods = [wp("a", "init", "v1"), wp("b", "init", "v1")]
    assert plan_feeds(pods, {"job": "v1"}, set()) == {}  # the laptop is still uploading
    plan = plan_feeds(pods, {"job": "v1"}, {"v1"}, delivered={"a": "v1"})
    assert [p.name for p in plan["v1"]] == ["b"]  # the pod mark may not be visible yet


def job(storage: bool, command: str = "python train.py") -> Any:
    queue = parse_queue({
        "metadata": {"name": "q", "namespace": "ns", "uid": "q1"},
        "spec": {"nodeResources": {"gpus": 2}, "image": "img",
                 "storage": {"workspace": {"enabled": storage, "sizePerGPU": "1Gi"}}},
    })  # fmt: skip
    return parse_job({
        "metadata": {"name": "job", "namespace": "ns", "uid": "j1"},
        "spec": {"jobQueue": "q", "numGPUs": 4, "command": command,
                 "workspace": {"version": "abc123"}},
    }, queue)  # fmt: skip


@pytest.mark.parametrize("storage", [True, False])
def test_add_workspace_waits_in_init_and_runs_the_trainer_in_the_live_tree(storage: bool) -> None:
    j = job(storage)
    spec: dict[str, Any] = {"containers": []}
    trainer: dict[str, Any] = {"name": "trainer", "command": ["torchrun", "--nnodes", "2", "train.py"],
                               "workingDir": j.working_dir}  # fmt: skip
    workspace.add_workspace(j, spec, trainer, Options(listen_host="podIP"))
    init = spec["initContainers"][0]
    assert init["name"] == CONTAINER_INIT
    assert {"name": VERSION_ENV, "value": "abc123"} in init["env"]
    assert trainer["workingDir"] == f"{j.working_dir}/current"
    assert trainer["command"][:2] == ["sh", "-c"]
    assert trainer["command"][-4:] == ["torchrun", "--nnodes", "2", "train.py"]
    volume = spec["volumes"][0]
    mount = trainer["volumeMounts"][0]
    if storage:
        assert volume["persistentVolumeClaim"]["claimName"] == "job-workspace"
        assert mount["subPathExpr"] == "$(POD_NAME)"  # one agent root per pod on the claim
    else:
        assert "emptyDir" in volume and "subPathExpr" not in mount
    for container in (init, trainer):  # the token only ever comes from the Secret
        token = next(e for e in container["env"] if e["name"] == "MONARCH_SYNC_TOKEN")
        assert token["valueFrom"]["secretKeyRef"]["name"] == TOKEN_SECRET


def test_no_submitted_version_means_no_workspace_machinery() -> None:
    j = job(False)
    j = type(j)(**{**j.__dict__, "workspace": {}})
    spec: dict[str, Any] = {"containers": []}
    trainer: dict[str, Any] = {"name": "trainer", "command": ["torchrun"]}
    workspace.add_workspace(j, spec, trainer, Options())
    assert "initContainers" not in spec and trainer["command"] == ["torchrun"]
    assert workspace.workspace_children(j, Options()) == []


def test_cache_objects_are_owned_by_no_job() -> None:
    objects = workspace.workspace_children(job(False), Options(listen_host="podIP"))
    assert objects[0]["kind"] == "Secret"
    assert all("ownerReferences" not in o["metadata"] for o in objects)
    deployment = next(
        o
        for o in render_cache("ns", image="img", listen_host="$(POD_IP)")
        if o["kind"] == "Deployment"
    )
    command = deployment["spec"]["template"]["spec"]["containers"][0]["command"]
    assert f"$(POD_IP):{SYNC_PORT}" in command and not any(TOKEN in c for c in command)


# -- the pod entry points, run for real ---------------------------------------------------------


def agent_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "monarch_k8s.torchrun.agent", *args]


def env() -> dict[str, str]:
    return {**os.environ, "MONARCH_SYNC_TOKEN": TOKEN}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_init_agent_exits_once_a_push_brings_its_version(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "train.py").write_text("print('hi')\n")
    version = scan_tree(src).root_hash
    port = free_port()
    root = tmp_path / "root"
    proc = subprocess.Popen(
        agent_cmd("init", "--listen", f"127.0.0.1:{port}", "--root", str(root), "--version", version),
        env=env(), stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and "waiting for workspace" in proc.stdout.readline()
        time.sleep(0.2)
        assert proc.poll() is None  # holds nothing yet
        report = asyncio.run(push(src, [f"127.0.0.1:{port}"], TOKEN, cache_dir=tmp_path / "c"))
        assert report.ok, report.format()
        assert proc.wait(timeout=30) == 0
        assert (root / "current" / "train.py").read_text() == "print('hi')\n"
    finally:
        proc.kill()
    # a restarted pod whose volume already holds it passes at once
    again = subprocess.run(
        agent_cmd("init", "--listen", f"127.0.0.1:{port}", "--root", str(root), "--version", version),
        env=env(), timeout=30,
    )  # fmt: skip
    assert again.returncode == 0


def test_trainer_wrapper_keeps_the_exit_status_and_hides_the_token(tmp_path: Path) -> None:
    script = "import os, sys; print(os.environ.get('MONARCH_SYNC_TOKEN', 'hidden')); sys.exit(3)"
    wrapped = [*workspace_wrapper(tmp_path), sys.executable, "-c", script]
    result = subprocess.run(wrapped, env=env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 3
    assert result.stdout.strip() == "hidden"


def workspace_wrapper(tmp_path: Path) -> list[str]:
    j = job(False)
    trainer: dict[str, Any] = {"name": "trainer", "command": ["placeholder"]}
    workspace.add_workspace(j, {"containers": []}, trainer, Options(listen_host="127.0.0.1"))
    sh, dash_c, script, zero, _listen, _root, _ = trainer["command"]
    port = free_port()
    return [sh, dash_c, script, zero, f"127.0.0.1:{port}", str(tmp_path / "root")]


def test_trainer_wrapper_serves_hot_reloads_while_the_command_runs(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "msg.txt").write_text("v2\n")
    wrapper = workspace_wrapper(tmp_path)
    address = wrapper[4]
    live = tmp_path / "root" / "current" / "msg.txt"
    waiter = f"import os, time\nwhile not os.path.exists({str(live)!r}): time.sleep(0.05)\nprint(open({str(live)!r}).read())"
    proc = subprocess.Popen(
        [*wrapper, sys.executable, "-c", waiter], env=env(), stdout=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            report = asyncio.run(push(src, [address], TOKEN, cache_dir=tmp_path / "c"))
            if report.ok or time.monotonic() > deadline:
                break
            time.sleep(0.2)  # the agent is still starting
        assert report.ok, report.format()
        out, _ = proc.communicate(timeout=30)
        assert out.strip() == "v2" and proc.returncode == 0
    finally:
        proc.kill()
