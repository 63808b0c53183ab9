"""The conformance suite's workers: one set, shared by Monarch (attached from this process)
and by a gateway process that monarch-proxy talks to."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = str(Path(__file__).parent)
if HERE not in sys.path:  # workers and the gateway inherit sys.path: they import our actors
    sys.path.insert(0, HERE)

from conformance_harness import Api, Conform  # noqa: E402

from monarch_gateway.local import LocalCluster  # noqa: E402


@pytest.fixture(scope="package")
def conformance_cluster() -> Iterator[LocalCluster]:
    with LocalCluster(2).start() as cluster:
        yield cluster


@pytest.fixture(scope="package")
def monarch_api(conformance_cluster: LocalCluster) -> Api:
    from monarch.actor import ActorError, attach_to_workers

    from monarch_gateway.app import configure_monarch

    # As the gateway does: loopback transport, and a failed mesh is logged, not an exit.
    configure_monarch(conformance_cluster.addresses, stream_output=False)
    hosts = attach_to_workers(
        workers=conformance_cluster.addresses, ca="trust_all_connections", name="direct"
    )
    hosts.initialized.get(timeout=120)
    return Api("monarch", hosts, ActorError)


@pytest.fixture(scope="package")
def proxy_api(conformance_cluster: LocalCluster) -> Iterator[Api]:
    import monarch_proxy

    job = conformance_cluster.connect()
    yield Api("proxy", job.hosts, getattr(monarch_proxy, "ActorError", None))
    job.close()


@pytest.fixture
def conform(monarch_api: Api, proxy_api: Api) -> Conform:
    return Conform(monarch_api, proxy_api)
