"""Getting started with SkyPilotJob: Monarch actors on cloud nodes, from this laptop.

    python examples/skypilot_getting_started.py --cloud aws --num-hosts 2 \\
        --accelerator H100:1 --cluster-name my-monarch-cluster [--gateway | --direct]

Gateway mode (the default) needs one open port on the head node and works from anywhere;
direct mode dials every worker, so run it from inside the cluster's network. `sky check`
shows which clouds are set up. `--fake-cloud` runs the same code on local processes (no cloud,
no credentials), as the tests do.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys

from monarch.actor import Actor, current_rank, endpoint

from monarch_skypilot import SkyPilotJob, SkyPilotJobError


class Greeter(Actor):
    """Defined in __main__, so it travels to the workers by value."""

    @endpoint
    def hello(self) -> str:
        return f"hello from {dict(current_rank())} on {socket.gethostname()} (pid {os.getpid()})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cloud", default="aws", help="aws, gcp, azure, kubernetes, lambda, ...")
    parser.add_argument("--region", help="region (or Kubernetes context)")
    parser.add_argument("--num-hosts", type=int, default=2)
    parser.add_argument("--accelerator", default="H100:1", help="e.g. H100:1; 'none' for CPUs")
    parser.add_argument("--cluster-name", default="monarch-getting-started")
    parser.add_argument("--spot", action="store_true", help="spot instances (recovered on loss)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--gateway", dest="mode", action="store_const", const="gateway")
    mode.add_argument("--direct", dest="mode", action="store_const", const="direct")
    parser.add_argument("--fake-cloud", action="store_true", help="local processes, no cloud")
    parser.add_argument("--keep", action="store_true", help="leave the cluster up (no kill)")
    args = parser.parse_args()

    import sky

    infra = f"{args.cloud}/{args.region}" if args.region else args.cloud
    accelerators = None if args.accelerator == "none" else args.accelerator
    options: dict[str, object] = {}
    if args.fake_cloud:
        from monarch_skypilot.testing import FakeCloud

        cloud = FakeCloud()
        accelerators = None  # the fake's nodes have no GPUs
        options = {"sky": cloud, "python_exe": sys.executable, "setup_commands": ":"}
        options.update(image_id=None, gateway_port=18443, sync_port=17878, monarch_port=22222)
    job = SkyPilotJob(
        meshes={"workers": args.num_hosts},
        resources=sky.Resources(infra=infra, accelerators=accelerators),
        cluster_name=args.cluster_name,
        idle_minutes_to_autostop=30,
        mode=args.mode or "auto",
        use_spot=args.spot or None,
        **options,  # type: ignore[arg-type]
    )
    try:
        state = job.state()  # launch (progress streams here), start workers, attach
        procs = state.workers.spawn_procs()
        greeters = procs.spawn("greeters", Greeter)
        for point, text in greeters.hello.call().get().items():
            print(point, text)
    except SkyPilotJobError as exc:  # each names the next step (sky check, GPUs, logs, ...)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if not args.keep:
            job.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
