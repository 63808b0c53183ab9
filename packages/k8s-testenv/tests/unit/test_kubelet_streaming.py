"""What the kubelet tells its streaming helper: pod facts, container stdin, the facts endpoint."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from k8s_testenv.kubelet.logs import LogServer
from k8s_testenv.kubelet.podspec import PodNetwork
from k8s_testenv.kubelet.runtime import KubeletSettings, PodWorker
from k8s_testenv.kubelet.status import State
from k8s_testenv.kubelet.streaming import container_stdin, pod_facts


def worker(tmp_path: Path) -> PodWorker:
    pod = {
        "metadata": {"name": "p", "namespace": "ns", "uid": "u-1"},
        "spec": {
            "nodeName": "node-0",
            "initContainers": [{"name": "init", "command": ["true"]}],
            "containers": [
                {"name": "app", "command": ["sleep", "9"], "workingDir": "/srv", "tty": True},
                {"name": "reader", "command": ["cat"], "stdin": True},
            ],
        },
    }
    return PodWorker(
        pod,
        net=PodNetwork(pod_ip="127.10.0.7", host_ip="127.0.0.1", node_name="node-0"),
        root=tmp_path / "pod",
        hosts_file=tmp_path / "hosts",
        base_env={},
        lookup=lambda kind, ns, name: None,
        settings=KubeletSettings(),
        pgid_dir=tmp_path,
        now=time.time(),
    )


def test_pod_facts_describe_every_container_as_the_helper_needs_it(tmp_path: Path) -> None:
    w = worker(tmp_path)
    app = w.records[0]
    app.state, app.extra["pid"] = State.RUNNING, 4242
    w.envs["app"] = {"PATH": "/usr/bin", "MY_VAR": "x"}
    facts = pod_facts(w, namespaces=True)
    assert {
        k: facts[k] for k in ("uid", "namespace", "name", "fullName", "podIP", "namespaces")
    } == {
        "uid": "u-1",
        "namespace": "ns",
        "name": "p",
        "fullName": "p_ns",
        "podIP": "127.10.0.7",
        "namespaces": True,
    }
    containers: dict[str, Any] = facts["containers"]
    assert set(containers) == {"init", "app", "reader"}
    assert containers["app"] == {
        "name": "app",
        "running": True,
        "pid": 4242,
        "env": {"PATH": "/usr/bin", "MY_VAR": "x"},
        "workingDir": "/srv",
        "tty": True,
        "stdin": False,
        "stdinPath": "",
        "logPath": str(w.log_path("app")),
    }
    # not started yet: not running, no pid; the pod folder is the default working directory
    reader = containers["reader"]
    assert (reader["running"], reader["pid"], reader["workingDir"]) == (False, 0, str(w.root))
    assert reader["stdin"] and reader["stdinPath"] == str(w.root / "reader.stdin")
    json.dumps(facts)  # the helper reads it as JSON


def test_container_stdin_is_a_fifo_only_for_stdin_containers(tmp_path: Path) -> None:
    assert container_stdin(tmp_path, {"name": "plain"}) == subprocess.DEVNULL
    fd = container_stdin(tmp_path, {"name": "reader", "stdin": True})
    try:
        assert stat.S_ISFIFO(os.stat(tmp_path / "reader.stdin").st_mode)
        os.write(os.open(tmp_path / "reader.stdin", os.O_WRONLY | os.O_NONBLOCK), b"hi")
        assert os.read(fd, 2) == b"hi"
    finally:
        os.close(fd)
    # a restart reuses the FIFO
    os.close(container_stdin(tmp_path, {"name": "reader", "stdin": True}))


@pytest.fixture
def log_server() -> Any:
    pods = {("ns", "p"): {"uid": "u-1"}}
    server = LogServer(
        locate=lambda *args: None,
        facts=lambda ns, name: pods.get((ns, name)),
        token="s3cret",
    )
    server.start()
    yield server
    server.stop()


def fetch(server: LogServer, path: str, token: str | None) -> tuple[int, bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{server.port}{path}")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def test_facts_endpoint_needs_the_helpers_token(log_server: LogServer) -> None:
    assert fetch(log_server, "/runtime/ns/p", "s3cret") == (200, b'{"uid": "u-1"}')
    assert fetch(log_server, "/runtime/ns/other", "s3cret") == (404, b"pod does not exist")
    assert fetch(log_server, "/runtime/ns/p", "wrong")[0] == 403
    assert fetch(log_server, "/runtime/ns/p", None)[0] == 403
    assert fetch(log_server, "/healthz", None) == (200, b"ok")
