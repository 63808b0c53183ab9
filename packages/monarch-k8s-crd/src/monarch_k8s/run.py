"""``python -m monarch_k8s.run worker|gateway|sync-agent ...``: what the operator's pods run.

Each wraps the real program (``monarch_gateway.worker``, ``monarch-gateway serve``, a
``monarch-sync`` agent) with the waits a pod needs and a laptop does not:

- ``worker ADDRESS``: with ``MONARCH_SYNC_ROOT`` set (``spec.sync``), wait until the sync agent
  beside it has a live tree, so imports from it work from the first actor on.
- ``gateway serve ARGS``: the same wait, then, with ``MONARCH_EXPECTED_WORKERS``, wait until that
  many pods match the ``--mesh-selector`` and are Ready (the gateway keeps the size its source
  first lists, so starting early would give a smaller mesh).
- ``sync-agent ARGS``: a ``monarch-sync agent`` that first gives itself an empty version, as the
  local default does, so the live tree exists before anything imports from it.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

WAIT_S = 300.0


def wait_for_live_tree() -> None:
    root = os.environ.get("MONARCH_SYNC_ROOT")
    deadline = time.monotonic() + WAIT_S
    while root and not os.path.isdir(root) and time.monotonic() < deadline:
        time.sleep(0.1)


def ready_workers(namespace: str, selector: str) -> int:
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    from monarch_gateway.sources import pod_address

    pods = client.CoreV1Api().list_namespaced_pod(namespace, label_selector=selector).items
    return sum(1 for p in pods if pod_address(p, 1) is not None)


def wait_for_workers(args: list[str]) -> None:
    expected = int(os.environ.get("MONARCH_EXPECTED_WORKERS", "0"))
    if not expected or "--mesh-selector" not in args:
        return
    value = args[args.index("--mesh-selector") + 1]  # NAME=NAMESPACE/SELECTOR:PORT
    namespace, _, selector = value.partition("=")[2].rpartition(":")[0].partition("/")
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        try:
            if ready_workers(namespace, selector) >= expected:
                return
        except Exception as exc:  # API server away: keep waiting, the deadline bounds it
            print(f"monarch_k8s.run: listing workers failed: {exc}", file=sys.stderr)
        time.sleep(0.5)


async def sync_agent(args: list[str]) -> int:
    import argparse

    from monarch_sync import Agent, push
    from monarch_sync.conn import parse_peer

    parser = argparse.ArgumentParser(prog="monarch_k8s.run sync-agent")
    parser.add_argument("--listen", required=True)
    parser.add_argument("--root", required=True)
    parser.add_argument("--members-file")
    ns = parser.parse_args(args)
    token = os.environ["MONARCH_SYNC_TOKEN"]
    host, port = parse_peer(ns.listen)
    agent = Agent(ns.root, token, host=host, port=port, members_file=ns.members_file)
    await agent.start()
    if not agent.synced_path.exists():
        with tempfile.TemporaryDirectory() as empty:
            report = await push(empty, [agent.address], token)
            if not report.ok:
                print(report.format(), file=sys.stderr)
    print(f"monarch-sync agent listening on {agent.address}, root {ns.root}", flush=True)
    await agent.serve_until_signalled()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] not in ("worker", "gateway", "sync-agent"):
        print(
            "usage: python -m monarch_k8s.run worker ADDRESS | gateway serve ARGS... | "
            "sync-agent --listen HOST:PORT --root DIR [--members-file F]",
            file=sys.stderr,
        )
        return 2
    command, rest = args[0], args[1:]
    if command == "sync-agent":
        Path(rest[rest.index("--root") + 1] if "--root" in rest else ".").mkdir(
            parents=True, exist_ok=True
        )
        return asyncio.run(sync_agent(rest))
    wait_for_live_tree()
    if command == "worker":
        from monarch_gateway.worker import main as worker_main

        worker_main(rest)
        return 0
    wait_for_workers(rest)
    from monarch_gateway.cli import main as gateway_main

    return gateway_main(rest)


if __name__ == "__main__":
    sys.exit(main())
