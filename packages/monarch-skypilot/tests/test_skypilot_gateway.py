"""Gateway mode end to end on the fake cloud: launch, gateway, attach, spawn, call, sync,
hot reload, the job cache, preemption and recovery, kill.

Faked: only the cloud (``monarch_skypilot.testing.FakeCloud``): nodes are local process
groups on their own loopback addresses, running the task's real ``setup`` and ``run`` strings
with SkyPilot's variables, because no test may touch a real cloud. Everything the task starts
is real: torchmonarch workers, monarch-gateway with TLS and a token, monarch-sync agents, and
the client is monarch-proxy over the pinned certificate.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import sky
from monarch.actor import Actor, endpoint

from monarch_proxy import WorkerLostError
from monarch_skypilot import SkyPilotJob
from monarch_skypilot.testing import FakeCloud

ACTOR_V1 = """
import time
from monarch.actor import Actor, endpoint

class Greeter(Actor):
    def __init__(self):
        self.calls = 0

    @endpoint
    def hello(self) -> str:
        self.calls += 1
        return f"v1:{self.calls}"

    @endpoint
    def nap(self, seconds: float) -> float:
        time.sleep(seconds)
        return seconds
"""


class Echo(Actor):
    """Not importable on the nodes: it travels by value."""

    @endpoint
    def echo(self, value: int) -> int:
        return value


def make_job(cloud: FakeCloud, ports: dict[str, int], name: str, **kw: Any) -> SkyPilotJob:
    return SkyPilotJob(
        meshes=kw.pop("meshes", {"trainers": 2}),
        resources=sky.Resources(infra="aws", use_spot=True),
        cluster_name=name,
        python_exe=sys.executable,
        setup_commands="echo setup on node $SKYPILOT_SETUP_NODE_RANK",
        image_id=None,
        sky=cloud,
        ready_timeout=120,
        **ports,
        **kw,
    )


def test_gateway_mode_spawns_calls_syncs_reloads_and_recovers_a_preempted_node(
    cloud: FakeCloud, ports: dict[str, int], tmp_path: Path
) -> None:
    cache = str(tmp_path / "job_state.pkl")
    job = make_job(cloud, ports, "sky-gw", idle_minutes_to_autostop=30)
    try:
        state = job.state(cached_path=cache)
        assert state.names == ["trainers"] and state.trainers.size() == 2
        assert cloud.calls == ["launch sky-gw"]
        assert cloud.launch_options == {"idle_minutes_to_autostop": 30, "down": True}
        job.set_autostop(-1)  # cancel, e.g. for a long interactive session
        assert cloud.calls[-1] == "autostop sky-gw -1 True"
        assert Path(cache).stat().st_mode & 0o077 == 0  # the cache holds the token and TLS key

        # edit -> sync -> spawn -> call, through the gateway only
        src = tmp_path / "src"
        src.mkdir()
        (src / "skyactors.py").write_text(ACTOR_V1)
        assert job.sync(str(src)).changed == ["skyactors.py"]
        actors = state.trainers.spawn_procs().spawn("greeters", "skyactors:Greeter")
        assert sorted(actors.hello.call().get(timeout=60).values()) == ["v1:1", "v1:1"]
        (src / "skyactors.py").write_text(ACTOR_V1.replace('f"v1:', 'f"v2:'))
        result = job.sync(str(src))
        assert result.changed == ["skyactors.py"] and result.reloaded
        # same actors (their state kept), new code
        assert sorted(actors.hello.call().get(timeout=60).values()) == ["v2:2", "v2:2"]

        # a second client process would find the job in Monarch's cache and reuse the cluster
        again = make_job(cloud, ports, "sky-gw", idle_minutes_to_autostop=30)
        again.state(cached_path=cache)
        assert cloud.calls.count("launch sky-gw") == 1
        again._close()

        # preemption: node 1 dies mid-call; the call fails, the job relaunches, mesh is whole
        events: list[dict[str, Any]] = []
        whole = threading.Event()
        state.on_membership(lambda e: (events.append(e), e.get("whole") and whole.set()))
        slow = actors.nap.call(30)
        time.sleep(1.0)
        lost = cloud.preempt("sky-gw", 1)
        with pytest.raises(WorkerLostError):
            slow.get(timeout=60)
        assert whole.wait(120), events
        assert any(lost in str(e.get("lost")) for e in events), events
        assert state.wait_for_workers(timeout=60)["whole"]
        assert cloud.calls.count("launch sky-gw") == 2
        assert any("relaunch" in what for _, what in job.recoveries), job.recoveries
        # meshes spawned afterwards use the replacement node, with the synced code
        fresh = state.trainers.spawn_procs(name="again").spawn("g2", "skyactors:Greeter")
        assert sorted(fresh.hello.call().get(timeout=60).values()) == ["v2:1", "v2:1"]
    finally:
        job.kill()
    assert "down sky-gw" in cloud.calls and "sky-gw" not in cloud.clusters


def test_a_lost_head_node_is_relaunched_and_the_gateway_re_attached_by_state(
    cloud: FakeCloud, ports: dict[str, int]
) -> None:
    job = make_job(cloud, ports, "sky-head", meshes={"hosts": 2})
    try:
        first = job.state(cached_path=None)
        old_head = cloud.preempt("sky-head", 0)  # the gateway goes with it
        state = job.state(cached_path=None)  # notices, relaunches, connects to the new head
        assert state is not first and state.hosts.size() == 2
        assert old_head not in job.gateway_url()
        actors = state.hosts.spawn_procs().spawn("a", Echo)
        assert sorted(actors.echo.call(7).get(timeout=60).values()) == [7, 7]
        assert any("unreachable" in what for _, what in job.recoveries), job.recoveries
    finally:
        job.kill()
