"""Quickstart: start workers and a gateway on this machine, spawn actors, call them.

    python examples/quickstart.py [--hosts N]

The same code drives a cluster: replace start_local(...) with
monarch_proxy.connect("wss://your-gateway:8765", token=...).
"""

from __future__ import annotations

import argparse
import os
import socket

from monarch.actor import Actor, current_rank, endpoint

from monarch_gateway.local import start_local


class Greeter(Actor):
    """Defined in __main__, so it travels to the workers by value."""

    def __init__(self, greeting: str) -> None:
        self.greeting = greeting

    @endpoint
    def hello(self, name: str) -> str:
        rank = current_rank()
        print(f"worker pid {os.getpid()} greeting {name}", flush=True)
        return (
            f"{self.greeting} {name} from {dict(rank)} (pid {os.getpid()}, {socket.gethostname()})"
        )

    @endpoint
    def square(self, x: int) -> int:
        return x * x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=2)
    parser.add_argument("--per-host", type=int, default=2)
    args = parser.parse_args()

    with start_local(hosts=args.hosts) as job:
        print(f"job: {job}")
        procs = job.hosts.spawn_procs(per_host={"gpus": args.per_host})
        greeters = procs.spawn("greeters", Greeter, "hello")
        for point, text in greeters.hello.call("laptop").get(timeout=60).items():
            print(f"{dict(point)}: {text}")
        squares = greeters.square.call(7).get()
        print(f"squares: {list(squares.values())}")
        first = greeters.slice(hosts=0, gpus=0)
        print(f"call_one on hosts=0, gpus=0: {first.square.call_one(12).get()}")
        print(f"{procs.size()} actors answered on {args.hosts} worker hosts")


if __name__ == "__main__":
    main()
