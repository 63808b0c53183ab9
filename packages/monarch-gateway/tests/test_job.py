"""The job contract (monarch_proxy.job.Job) as LocalJob implements it, on real processes."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys

import actors
import pytest

from monarch_gateway.local import LocalJob, start_local
from monarch_proxy import JobState
from monarch_proxy.job import state_is_open


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie child still answers kill(0): ask for its state
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(")")[-1].split()[0] != "Z"


def test_apply_is_idempotent_state_is_cached_and_kill_stops_everything():
    with LocalJob(1) as job:
        job.apply().apply()
        assert job._cluster is not None
        gateway = job._cluster.gateway
        assert gateway is not None
        state = job.state()
        assert job.state() is state  # cached while its connection is open
        assert job._cluster.gateway is gateway  # one cluster, however often applied
        assert state.hosts is state["hosts"]
        procs = state.hosts.spawn_procs(per_host={"gpus": 1})
        assert procs.spawn("w", actors.Worker).echo.choose(3).get(timeout=60) == 3
        pids = [gateway.pid, *(w.pid for w in job._cluster.workers)]
    assert not state_is_open(state)
    assert not any(alive(pid) for pid in pids)


def test_state_reconnects_after_its_connection_closed():
    with LocalJob(1) as job:
        first = job.state()
        first.close()
        second = job.state()
        assert second is not first and state_is_open(second)
        assert second.hosts.size() == 1


def test_a_named_job_is_reused_from_another_process_and_killed_there():
    name = f"reuse{secrets.token_hex(3)}"
    job = LocalJob(1, name=name)
    try:
        state = job.state()
        assert job._cluster is not None and job._cluster.gateway is not None
        gateway = job._cluster.gateway.pid
        script = (
            "import sys; from monarch_gateway.local import LocalJob\n"
            f"job = LocalJob(1, name={name!r})\n"
            "state = job.state()\n"
            "print(state.connection.url)\n"
            "job.kill()\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.split()[-1] == state.connection.url  # the same gateway, reused
        job._cluster.gateway.wait(timeout=30)  # the other process killed it
        assert not alive(gateway)
        assert not job.record_path.exists()
    finally:
        job.kill()


def test_start_local_returns_a_state_whose_close_stops_the_processes():
    state = start_local(hosts=1)
    assert isinstance(state, JobState)
    assert state.hosts.extent.as_dict() == {"hosts": 1}
    state.close()
    with pytest.raises(Exception, match="closed"):
        state.hosts.spawn_procs()
