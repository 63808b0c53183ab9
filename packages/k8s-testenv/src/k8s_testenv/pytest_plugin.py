"""pytest plugin (auto-loaded through the ``pytest11`` entry point): a real cluster per session.

Fixtures:

* ``k8s_cluster`` (session): a running :class:`~k8s_testenv.cluster.Cluster`;
  ``k8s_cluster.kubectl(...)`` runs the kubectl built with it (v1.37.2, not the one on PATH).
* ``k8s_api`` (session): an official ``kubernetes.client.ApiClient`` for it.
* ``k8s_namespace`` (function): a fresh namespace, deleted after the test (the namespace
  controller then removes everything in it, and the kubelet kills the processes).

The binaries are built during collection, outside any test timeout, and only when a
collected test uses ``k8s_cluster``. A missing tool is reported by the fixture as an error
naming it; these tests never skip.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from k8s_testenv.build import ensure_binaries
from k8s_testenv.cluster import Cluster, start_cluster
from k8s_testenv.exceptions import K8sTestenvError
from k8s_testenv.procs import wait_for

if TYPE_CHECKING:
    import kubernetes.client

_FIXTURES = {"k8s_cluster", "k8s_api", "k8s_namespace"}
_build_error: K8sTestenvError | None = None


def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    global _build_error
    if any(_FIXTURES & set(getattr(item, "fixturenames", ())) for item in items):
        try:
            ensure_binaries()
        except K8sTestenvError as exc:
            _build_error = exc


@pytest.fixture(scope="session")
def k8s_cluster() -> Iterator[Cluster]:
    if _build_error is not None:
        raise _build_error
    cluster = start_cluster()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def k8s_api(k8s_cluster: Cluster) -> Iterator[kubernetes.client.ApiClient]:
    client = k8s_cluster.api_client()
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def k8s_namespace(k8s_cluster: Cluster) -> Iterator[str]:
    rest = k8s_cluster.rest()
    name = f"test-{secrets.token_hex(4)}"
    rest.request("POST", "/api/v1/namespaces", {"metadata": {"name": name}})
    # pods are rejected until the ServiceAccount controller has created "default"
    why = wait_for(
        lambda: bool(rest.get(f"/api/v1/namespaces/{name}/serviceaccounts/default")), timeout=30
    )
    if why is not None:
        raise K8sTestenvError(f"namespace {name}: no default ServiceAccount ({why})")
    try:
        yield name
    finally:
        rest.request("DELETE", f"/api/v1/namespaces/{name}")
