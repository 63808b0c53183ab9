"""Direct mode (real Monarch host meshes attached to every worker) and batch mode (the client
script itself runs on the cluster, as a managed job) on the fake cloud.

Faked: only the cloud (``FakeCloud``), because no test may touch one: nodes are local process
groups on their own loopback addresses running the task's real ``setup`` and ``run`` with
SkyPilot's variables, in a copy of the ``workdir``. The workers, the attach, the spawned
processes and actors, and in batch mode the client script and its reconnect through Monarch's
job cache (``BatchJob``), are all real torchmonarch.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import sky

from monarch_skypilot import SkyPilotJob
from monarch_skypilot.testing import FakeCloud

ACTORS = """
import socket
from monarch.actor import Actor, current_rank, endpoint

class Where(Actor):
    @endpoint
    def where(self) -> str:
        import os
        return os.environ["HOME"].rsplit("/", 1)[-1]
"""

CLIENT = """
from monarch_skypilot import SkyPilotJob
from skyactors_direct import Where

job = SkyPilotJob(meshes={"hosts": 2})
state = job.state()          # Monarch's job cache: the BatchJob this laptop shipped
actors = state.hosts.spawn_procs().spawn("where", Where)
print("BATCH RESULT", sorted(actors.where.call().get().values()), flush=True)
"""


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "work"
    folder.mkdir()
    (folder / "skyactors_direct.py").write_text(ACTORS)
    (folder / "client.py").write_text(CLIENT)
    monkeypatch.syspath_prepend(str(folder))  # the client imports the actor class too
    return folder


def make_job(cloud: FakeCloud, ports: dict[str, int], workdir: Path, **kw: Any) -> SkyPilotJob:
    return SkyPilotJob(
        meshes={"hosts": 2},
        resources=sky.Resources(infra="aws"),
        cluster_name="sky-direct",
        python_exe=sys.executable,
        setup_commands=":",
        workdir=str(workdir),
        image_id=None,
        sky=cloud,
        ready_timeout=120,
        mode="direct",
        **ports,
        **kw,
    )


def test_direct_mode_attaches_real_host_meshes_cut_from_the_nodes(
    cloud: FakeCloud, ports: dict[str, int], workdir: Path
) -> None:
    from skyactors_direct import Where  # type: ignore[import-not-found]

    job = make_job(cloud, ports, workdir)
    try:
        state = job.state(cached_path=None)
        procs = state.hosts.spawn_procs()
        actors = procs.spawn("where", Where)
        assert sorted(actors.where.call().get().values()) == ["node-2", "node-3"]
    finally:
        job.kill()
    assert "down sky-direct" in cloud.calls


def test_batch_mode_runs_the_client_on_the_cluster_with_status_and_logs_here(
    cloud: FakeCloud, ports: dict[str, int], workdir: Path
) -> None:
    job = make_job(cloud, ports, workdir)
    job.apply(client_script=str(workdir / "client.py"))
    try:
        record = job.wait_batch(timeout=240)
        logs = job.batch_logs()
        assert record.status == "SUCCEEDED", logs
        assert "BATCH RESULT ['node-2', 'node-3']" in logs
    finally:
        job.kill()
    assert any(c.startswith("jobs.launch sky-direct") for c in cloud.calls)
