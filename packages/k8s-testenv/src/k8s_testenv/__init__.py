"""A real Kubernetes control plane on one machine, with a process kubelet, for tests.

etcd, kube-apiserver, kube-controller-manager and kube-scheduler are built from the Go
modules in ``tools/k8s-testenv``; pods run as local processes under
:mod:`k8s_testenv.kubelet`. This package depends on no sibling package.
"""

from k8s_testenv.build import KUBE_VERSION, Binaries, build_binaries, ensure_binaries
from k8s_testenv.cluster import Cluster, default_nodes, start_cluster, stop_cluster
from k8s_testenv.exceptions import BuildError, K8sTestenvError, MissingToolError, StartupError
from k8s_testenv.kubelet.agent import NodeSpec
from k8s_testenv.kubelet.runtime import KubeletSettings

__all__ = [
    "KUBE_VERSION",
    "Binaries",
    "BuildError",
    "Cluster",
    "K8sTestenvError",
    "KubeletSettings",
    "MissingToolError",
    "NodeSpec",
    "StartupError",
    "build_binaries",
    "default_nodes",
    "ensure_binaries",
    "start_cluster",
    "stop_cluster",
]
