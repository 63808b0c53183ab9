"""job.sync(): the workspace reaches every worker through monarch-sync agents, actors import it
by name, and a sync reloads changed modules in running actors without losing their state."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from monarch_gateway.local import start_local

ACTOR = """
from monarch.actor import Actor, endpoint

class Counter(Actor):
    def __init__(self):
        self.calls = 0

    @endpoint
    def bump(self):
        self.calls += 1
        return (VERSION, self.calls)

VERSION = "{version}"
"""


def write(root: Path, version: str) -> None:
    (root / "mylib").mkdir(exist_ok=True)
    (root / "mylib" / "__init__.py").write_text("")
    (root / "mylib" / "counter.py").write_text(textwrap.dedent(ACTOR.format(version=version)))


@pytest.fixture
def job():
    with start_local(hosts=2, sync=True) as state:
        yield state


def test_sync_then_spawn_from_the_synced_tree_then_hot_reload(job, tmp_path):
    write(tmp_path, "v1")
    (tmp_path / "stale.txt").write_text("old")
    first = job.sync(str(tmp_path))
    assert "mylib/counter.py" in first.changed

    procs = job.hosts.spawn_procs(per_host={"gpus": 2})
    counters = procs.spawn("counters", "mylib.counter:Counter")  # importable only via the sync
    assert list(counters.bump.call().get(timeout=60).values()) == [("v1", 1)] * 4

    write(tmp_path, "v2")
    (tmp_path / "stale.txt").unlink()
    second = job.sync(str(tmp_path))
    assert second.changed == ["mylib/counter.py", "stale.txt"]
    assert second.reloaded["mylib.counter"] == 4  # every actor process reloaded it
    # Same actors, new code, state kept.
    assert list(counters.bump.call().get(timeout=60).values()) == [("v2", 2)] * 4

    unchanged = job.sync(str(tmp_path))
    assert unchanged.changed == [] and unchanged.reloaded == {}
