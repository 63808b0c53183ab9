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
from monarch_proxy import WorkerLostError, WorkerReattachError

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
    # Attaching there again failed once (REUSED_ADDRESS): never planned while listed.
    assert plan_replacements(current, {"b"}, ["a", "b", "c"], {"b"}) == []
    assert plan_replacements(current, {"b", "c"}, ["a", "b", "c", "x"], {"x"}) == [
        (1, "b"),
        (2, "c"),
    ]


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


def test_worker_restarted_at_its_old_address_is_reported_not_retried_forever(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Monarch 0.7 cannot attach a second process at an address from one gateway process once
    the first had acknowledged messages (README "Known gaps"): a worker restarted in place must
    then be reported as such, not retried every poll while clients time out."""
    monkeypatch.setenv("HYPERACTOR_MESH_ATTACH_CONFIG_TIMEOUT", "5s")  # the gateway's attempt
    # Workers acknowledge every message at once (by default after 500 ms, so any worker that
    # lived half a second past its last message hits this): no race with the kill below.
    monkeypatch.setenv("HYPERACTOR_MESSAGE_ACK_EVERY_N_MESSAGES", "1")
    with LocalCluster(2, stream_output=False).start() as cluster:
        job = cluster.connect()
        events: list[dict[str, Any]] = []
        lost, replaced = threading.Event(), threading.Event()

        def record(state: dict[str, Any]) -> None:
            events.append(state)
            (replaced if "replaced" in state else lost).set()

        job.on_membership(record)
        before = job.hosts.spawn_procs(per_host={"procs": 1}).spawn("w", "actors:Worker")
        assert len(before.whoami.call().get(timeout=120)) == 2
        cluster.kill_worker(1)
        assert lost.wait(30)  # the gateway noticed the old process go
        address = cluster.restart_worker(1, same_address=True)  # as a container restarts
        with pytest.raises(WorkerReattachError, match=address.split("//")[1]) as refused:
            job.wait_for_workers(timeout=60)
        assert "restart the gateway" in str(refused.value)
        assert "config push failed" in str(refused.value)  # Monarch's own words, kept
        assert any(address in e.get("unattachable", {}) for e in events)
        assert not replaced.is_set()
        # Given a new address, the worker is taken in and the mesh is whole again.
        new_address = cluster.restart_worker(1)
        assert replaced.wait(120)
        state = job.wait_for_workers(timeout=10)
        assert state["meshes"]["hosts"]["workers"][1] == new_address
        assert state["meshes"]["hosts"]["unattachable"] == {}
        after = job.hosts.spawn_procs(per_host={"procs": 1}).spawn("w2", "actors:Worker")
        assert len({v["pid"] for v in after.whoami.call().get(timeout=120).values()}) == 2
        job.close()
