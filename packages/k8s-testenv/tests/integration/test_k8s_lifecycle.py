"""`k8s-testenv up` / `down` from the CLI: a detached cluster, then nothing left running."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from k8s_testenv import cli
from k8s_testenv.kubelet.api import RestClient
from k8s_testenv.testing import pid_alive, wait_until

pytestmark = pytest.mark.timeout(120)


def test_up_then_down_leaves_no_process_behind(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    workdir = tmp_path / "cluster"
    kubeconfig = tmp_path / "kubeconfig"
    assert (
        cli.main(["up", "--dir", str(workdir), "--nodes", "1", "--kubeconfig", str(kubeconfig)])
        == 0
    )
    out = capsys.readouterr().out
    assert f"export KUBECONFIG={kubeconfig}" in out
    # stdout holds only the exports, so `eval "$(k8s-testenv up)"` sets them
    assert all(line.startswith("export ") for line in out.splitlines()), out
    state = json.loads((workdir / "state.json").read_text())
    config = json.loads(kubeconfig.read_text())
    assert config["clusters"][0]["cluster"]["server"] == state["server"]
    assert cli.main(["up", "--dir", str(workdir)]) == 1  # refuses to start twice
    token = config["users"][0]["user"]["token"]
    rest = RestClient(state["server"], token, ca_file=str(workdir / "certs" / "apiserver.crt"))
    body = {
        "metadata": {"name": "sleeper"},
        "spec": {
            "terminationGracePeriodSeconds": 30,
            "containers": [
                {"name": "c", "image": "none", "command": ["/bin/sh", "-c", "sleep 300 & wait"]}
            ],
        },
    }
    rest.request("POST", "/api/v1/namespaces/default/pods", body)
    pod = wait_until(
        lambda: (
            (p := rest.get("/api/v1/namespaces/default/pods/sleeper"))
            .get("status", {})
            .get("phase")
            == "Running"
            and p
        ),
        timeout=30,
        what="pod Running",
    )
    pod_pid = int(pod["status"]["containerStatuses"][0]["containerID"].removeprefix("process://"))
    component_pids = list(state["pids"].values())
    assert pid_alive(pod_pid) and all(pid_alive(pid) for pid in component_pids)

    assert cli.main(["down", "--dir", str(workdir)]) == 0
    assert not workdir.exists()
    assert not pid_alive(pod_pid)
    assert not any(pid_alive(pid) for pid in component_pids)
