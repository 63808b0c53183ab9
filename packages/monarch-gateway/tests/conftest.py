"""Fixtures: real torchmonarch worker processes and a real gateway process on loopback."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# Workers and the gateway inherit this process's sys.path (see local.child_env), so the actor
# classes in tests/actors.py can be shipped by reference.
TESTS = str(Path(__file__).parent)
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)

from monarch_gateway.local import LocalCluster  # noqa: E402
from monarch_proxy import JobState  # noqa: E402


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(2).start() as c:
        yield c


@pytest.fixture(scope="module")
def session(cluster: LocalCluster) -> Iterator[tuple[JobState, Any, Any]]:
    """One session for the module: its job, procs of 2 GPUs a host, and Workers labelled "w"."""
    import actors  # monarch's, imported once the path above is set

    job = cluster.connect()
    procs = job.hosts.spawn_procs(per_host={"gpus": 2})
    yield job, procs, procs.spawn("workers", actors.Worker, "w")
    job.close()


@pytest.fixture
def job(cluster: LocalCluster) -> Iterator[JobState]:
    state = cluster.connect()
    yield state
    state.close()
