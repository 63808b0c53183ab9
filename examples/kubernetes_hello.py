"""Monarch actors on Kubernetes from a laptop: KubernetesJob makes a MonarchMesh (workers, a
gateway, sync agents), reaches the gateway through a port-forward, and cleans up on exit.

    python examples/kubernetes_hello.py [--replicas 2] [--namespace default]

Needs a cluster with the MonarchMesh operator (see the root README) and a kubeconfig; no
kubectl. ``compute=`` also takes a ``kubetorch.Compute`` (gpus, cpus, memory, image, ...).
"""

from __future__ import annotations

import argparse
import socket

from monarch.actor import Actor, current_rank, endpoint

from monarch_k8s import KubernetesJob, MeshSpec


class Hello(Actor):
    """Defined in __main__, so it travels to the workers by value."""

    @endpoint
    def hi(self) -> str:
        return f"rank {current_rank().rank} on pod {socket.gethostname()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--namespace", default="default")
    args = parser.parse_args()
    compute = MeshSpec(replicas=args.replicas)
    with KubernetesJob(compute=compute, namespace=args.namespace, sync_dirs=[]) as job:
        actors = job.state().workers.spawn_procs(per_host={"procs": 1}).spawn("hello", Hello)
        for point, text in actors.hi.call().get(timeout=120).items():
            print(point, text)


if __name__ == "__main__":
    main()
