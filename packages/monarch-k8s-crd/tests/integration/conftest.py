"""Fixtures for KubernetesJob's end-to-end tests: the operator as a pod from the install
manifests, and a test process that may not reach the cluster's pod network."""

from __future__ import annotations

import ipaddress
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from k8s_testenv.build import ensure_binaries

from monarch_k8s.testing import install_with_kubectl

OPERATOR_NS = "monarch-system"
_forbid = {"on": False}


def _only_loopback_one(event: str, args: tuple[Any, ...]) -> None:
    """While on: the laptop reaches the API server and its own port-forward listeners (both on
    127.0.0.1) and nothing else; k8s-testenv's pod IPs are other 127/8 addresses."""
    if not _forbid["on"] or event != "socket.connect":
        return
    address = args[1]
    if isinstance(address, tuple) and len(address) >= 2:
        try:
            ip = ipaddress.ip_address(address[0])
        except ValueError:
            return
        if ip.is_loopback and str(ip) not in ("127.0.0.1", "::1"):
            raise PermissionError(f"the laptop may not reach pod address {address[0]}")


sys.addaudithook(_only_loopback_one)


@pytest.fixture
def outside_cluster() -> Iterator[None]:
    """Connections to pod IPs fail from here on, in this process, as from a laptop."""
    _forbid["on"] = True
    try:
        yield
    finally:
        _forbid["on"] = False


@pytest.fixture(scope="session")
def install_operator_for_tests(k8s_cluster: Any) -> Callable[[], Any]:
    """(Re)install the operator as a pod from the kustomize base, under its own ServiceAccount,
    with the settings every module here relies on; returns the Ready operator pod. A job's etcd
    (etcd-v2 rendezvous) is k8s-testenv's etcd-v2: the process kubelet ignores images, and the
    control plane's etcd 3.7 has no v2 API. A module that installs another operator puts this
    one back with it: ``kubectl apply --server-side`` drops what the last apply left out, so an
    install without ``TORCHRUN_ETCD_COMMAND`` left later jobs' etcd as ``etcd``, not on PATH
    here (it crash-looped and the workers waited for it forever)."""
    env = {"TORCHRUN_ETCD_COMMAND": str(ensure_binaries().etcd_v2)}
    return lambda: install_with_kubectl(k8s_cluster, OPERATOR_NS, env=env)


@pytest.fixture(scope="session")
def monarch_operator(install_operator_for_tests: Callable[[], Any]) -> Any:
    """The operator, installed once per session (:func:`install_operator_for_tests`)."""
    return install_operator_for_tests()
