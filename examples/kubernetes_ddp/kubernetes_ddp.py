"""PyTorch DDP on a MonarchMesh: one actor per GPU (or CPU process), torch.distributed from
mesh ranks, a short training loop, gradients all-reduced by DDP (NCCL on GPU, gloo on CPU).

Two ways to drive it (see README.md):

    # from a laptop, through the mesh's gateway (a port-forward made by KubernetesJob)
    python kubernetes_ddp.py --num_hosts 2 --gpus_per_host 4 --mesh_name ddpmesh --namespace monarch-tests

    # upstream's way, from a controller pod in the cluster (kubectl cp + kubectl exec)
    python /tmp/kubernetes_ddp.py --num_hosts 2 --gpus_per_host 4 --via upstream

The actor code is the same both ways; only how the host mesh is found differs.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
from typing import Any

import torch
import torch.distributed as dist
from monarch.actor import Actor, current_rank, endpoint
from torch import nn
from torch.nn.parallel import DistributedDataParallel

BATCH, FEATURES = 32, 10


class ToyModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net1 = nn.Linear(FEATURES, FEATURES)
        self.relu = nn.ReLU()
        self.net2 = nn.Linear(FEATURES, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net2(self.relu(self.net1(x)))


def pod_ip() -> str:
    """This host's address as other pods reach it (the operator sets POD_IP)."""
    return os.environ.get("POD_IP") or socket.gethostbyname(socket.gethostname())


class DDPActor(Actor):
    """One DDP rank. Its rank and world size are its place in the process mesh."""

    def __init__(self) -> None:
        point = current_rank()
        self.rank = point.rank
        self.local_rank = point["gpus"] if "gpus" in point.extent.labels else 0
        self.model: DistributedDataParallel | None = None

    def _rprint(self, text: str) -> None:
        print(f"{self.rank=} {text}", flush=True)

    @endpoint
    def rendezvous(self) -> tuple[str, int]:
        """Rank 0 picks the store's address: its pod IP and a free port."""
        with socket.socket() as sock:
            sock.bind((pod_ip(), 0))
            return pod_ip(), int(sock.getsockname()[1])

    @endpoint
    def setup(self, master_addr: str, master_port: int, world_size: int) -> str:
        self._rprint("Initializing torch distributed")
        gpu = torch.cuda.is_available()
        if not gpu and ipaddress.ip_address(pod_ip()).is_loopback:
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # pods on loopback (k8s-testenv)
        if gpu:
            torch.cuda.set_device(self.local_rank)
        dist.init_process_group(
            "nccl" if gpu else "gloo",
            init_method=f"tcp://{master_addr}:{master_port}",
            rank=self.rank,
            world_size=world_size,
        )
        self._rprint("Finished initializing torch distributed")
        return dist.get_backend()

    @endpoint
    def train(self, steps: int, lr: float = 0.05) -> dict[str, Any]:
        """A short DDP loop on a fixed regression task; returns losses and a weight checksum
        (equal on every rank when DDP keeps the replicas in step)."""
        self._rprint("Running basic DDP example")
        self._rprint(f"local_rank={self.local_rank}")
        device = torch.device("cuda", self.local_rank) if torch.cuda.is_available() else None
        torch.manual_seed(0)  # same initial weights everywhere (DDP also broadcasts rank 0's)
        model = ToyModel().to(device) if device else ToyModel()
        ddp = DistributedDataParallel(model, device_ids=[self.local_rank] if device else None)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=lr)
        data = torch.Generator().manual_seed(1000 + self.rank)  # each rank its own shard
        losses = []
        for _ in range(steps):
            inputs = torch.randn(BATCH, FEATURES, generator=data)
            targets = inputs[:, :5] * 2.0
            if device:
                inputs, targets = inputs.to(device), targets.to(device)
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(ddp(inputs), targets)
            loss.backward()  # gradients averaged over every rank here
            optimizer.step()
            losses.append(float(loss.detach()))
        checksum = float(sum(p.detach().double().sum() for p in model.parameters()))
        self._rprint("Finished running basic DDP example")
        return {"rank": self.rank, "first_loss": losses[0], "last_loss": losses[-1],
                "checksum": checksum}  # fmt: skip

    @endpoint
    def cleanup(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def use_loopback_transport() -> None:
    """Pods on loopback addresses (k8s-testenv's process kubelet): upstream's job pins the
    TcpWithHostname transport, which needs a non-loopback address; use TcpWithLocalhost."""
    import monarch._src.job.kubernetes as upstream
    from monarch._rust_bindings.monarch_hyperactor.channel import ChannelTransport

    pinned = upstream.configure

    def configure(**settings: Any) -> None:
        pinned(**{**settings, "default_transport": ChannelTransport.TcpWithLocalhost})

    upstream.configure = configure


def run_ddp(host_mesh: Any, gpus_per_host: int, steps: int) -> list[dict[str, Any]]:
    """Spawn the ranks on ``host_mesh`` (a Monarch HostMesh or a KubernetesJob's proxy), set up
    torch.distributed from rank 0's address, train, and return every rank's report."""
    procs = host_mesh.spawn_procs(per_host={"gpus": gpus_per_host})
    actors = procs.spawn("ddp_actor", DDPActor)
    world = procs.size()  # the same on a Monarch ProcMesh and a proxy
    master = actors.slice(hosts=0, gpus=0).rendezvous.call_one().get()
    actors.setup.call(master[0], master[1], world).get()
    try:
        reports = list(actors.train.call(steps).get().values())
    finally:
        actors.cleanup.call().get()
    return sorted(reports, key=lambda r: r["rank"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num_hosts", type=int, default=2, help="spec.replicas of the mesh")
    parser.add_argument("--gpus_per_host", type=int, default=4, help="processes per host")
    parser.add_argument("--mesh_name", default="ddpmesh", help="metadata.name of the mesh")
    parser.add_argument("--namespace", default="monarch-tests")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument(
        "--via", choices=["gateway", "upstream"], default=None,
        help="gateway: KubernetesJob through the mesh's gateway (default outside the cluster); "
        "upstream: Monarch's own KubernetesJob, straight to the pods (default inside it)",
    )  # fmt: skip
    args = parser.parse_args()
    via = args.via or ("upstream" if os.environ.get("KUBERNETES_SERVICE_HOST") else "gateway")
    if via == "upstream":
        from monarch.job.kubernetes import KubernetesJob as UpstreamJob

        if ipaddress.ip_address(pod_ip()).is_loopback:
            use_loopback_transport()

        upstream = UpstreamJob(namespace=args.namespace)
        upstream.add_mesh(args.mesh_name, args.num_hosts)
        host_mesh = getattr(upstream.state(), args.mesh_name)
        reports = run_ddp(host_mesh, args.gpus_per_host, args.steps)
    else:
        from monarch_k8s import KubernetesJob

        here = os.path.dirname(os.path.abspath(__file__))
        job = KubernetesJob(name=args.mesh_name, namespace=args.namespace, sync_dirs=[here])
        try:
            reports = run_ddp(job.state().workers, args.gpus_per_host, args.steps)
        finally:
            job.kill()  # leaves the mesh this script did not create
    for report in reports:
        print(
            f"rank {report['rank']}: loss {report['first_loss']:.4f} -> {report['last_loss']:.4f}"
            f" weights checksum {report['checksum']:.6f}"
        )
    print(f"DDP finished on {len(reports)} ranks", flush=True)


if __name__ == "__main__":
    main()
