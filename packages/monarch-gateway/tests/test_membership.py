"""Workers that come and go: a worker restarted at a new address is taken in, brought up to the
current workspace version, announced to the laptop, and used by meshes spawned afterwards."""

from __future__ import annotations

import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest

from monarch_gateway.local import LocalCluster
from monarch_gateway.membership import plan_replacements
from monarch_proxy import WorkerLostError

PROBE = """
import os
from monarch.actor import Actor, endpoint

class Probe(Actor):
    @endpoint
    def where(self):
        return os.environ["MONARCH_SYNC_ROOT"], VERSION

VERSION = {version}
"""


def test_gone_workers_are_paired_with_fresh_listed_addresses_in_order() -> None:
    current = ["a", "b", "c"]
    assert plan_replacements(current, set(), ["a", "b", "c"]) == []  # all well
    assert plan_replacements(current, {"b"}, ["a", "c", "d"]) == [(1, "d")]
    assert plan_replacements(current, set(), ["a", "c", "d"]) == [(1, "d")]  # b left the list
    assert plan_replacements(current, {"a", "c"}, ["b", "e"]) == [(0, "e")]  # c waits
    # Recreated at the same address: the dead worker's own address, once nothing fresher is.
    assert plan_replacements(current, {"b"}, ["a", "b", "c"]) == [(1, "b")]
    assert plan_replacements(current, {"b", "c"}, ["a", "b", "c", "d"]) == [(1, "d"), (2, "c")]
    assert plan_replacements(current, {"a"}, None) == []  # the source cannot tell right now


def test_restarted_worker_is_reattached_synced_and_used_by_new_meshes(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "probepkg").mkdir(parents=True)
    (src / "probepkg" / "__init__.py").write_text("")
    (src / "probepkg" / "probe.py").write_text(textwrap.dedent(PROBE.format(version=1)))
    with LocalCluster(2, sync=True, stream_output=False).start() as cluster:
        job = cluster.connect()
        events: list[dict[str, Any]] = []
        lost, whole_again = threading.Event(), threading.Event()

        def record(state: dict[str, Any]) -> None:
            events.append(state)
            (whole_again if "replaced" in state else lost).set()

        job.on_membership(record)
        job.sync(str(src))
        before = job.hosts.spawn_procs(per_host={"procs": 1}).spawn("p", "probepkg.probe:Probe")
        old_roots = sorted(before.where.call().get(timeout=120).values())

        old_address = cluster.addresses[1]
        new_address = cluster.restart_worker(1)
        assert lost.wait(30)  # the gateway noticed (its probes), and told us
        # A push meanwhile reaches the live hosts (the dead worker's agent is left out) and
        # reloads the meshes that still work; the replacement is brought to this version.
        (src / "probepkg" / "probe.py").write_text(textwrap.dedent(PROBE.format(version=2)))
        assert job.sync(str(src)).changed == ["probepkg/probe.py"]
        state = job.wait_for_workers(timeout=120)
        assert state["whole"] and new_address in state["meshes"]["hosts"]["workers"]
        assert whole_again.wait(10)
        assert any(old_address in e.get("lost", []) for e in events)
        replaced = next(e for e in events if "replaced" in e)
        assert replaced["replaced"] == {old_address: new_address}

        # The mesh spawned before still spans the dead worker, and says so by name.
        with pytest.raises(WorkerLostError, match=old_address.split("//")[1]):
            before.where.call().get(timeout=60)
        # A mesh spawned afterwards reaches the replacement, which imports the synced code:
        # its fresh agent was brought to the current version before it was reported ready.
        after = job.hosts.spawn_procs(per_host={"procs": 1}).spawn("q", "probepkg.probe:Probe")
        new_roots = sorted(after.where.call().get(timeout=120).values())
        assert new_roots[0][0] == old_roots[0][0] and new_roots[1][0] != old_roots[1][0]
        assert str(cluster.sync_root(1)) in new_roots[1][0]
        assert {version for _, version in new_roots} == {2}
        job.close()
