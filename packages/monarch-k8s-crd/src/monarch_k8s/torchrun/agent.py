"""``python -m monarch_k8s.torchrun.agent cache|init ...``: the workspace's pod entry points.

- ``cache --listen H:P --root DIR``: the namespace's workspace cache (see :mod:`.cache`): a
  monarch-sync agent that laptops push to, and a feeder that pushes each job's version from
  this agent's store to the job's worker agents, one tree per version.
- ``init --listen H:P --root DIR --version HASH``: a worker's init container: a monarch-sync
  agent that exits 0 once its live tree is at ``HASH``, so the trainer starts on it.
- ``run --listen H:P --root DIR -- COMMAND...``: the trainer's wrapper: the same agent serves
  on while ``COMMAND`` runs (hot reload), and ends with it; the exit status is the command's,
  SIGTERM/SIGINT are passed on to it, and the command does not see the token.

Every token comes from ``MONARCH_SYNC_TOKEN`` (a Secret), never from the command line.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from monarch_k8s.torchrun.cache import LIVE_ANNOTATION, plan_feeds, worker_pod
from monarch_k8s.torchrun.names import GROUP, JOB_LABEL, JOB_PLURAL, VERSION
from monarch_sync import Agent, push
from monarch_sync.conn import parse_peer

__all__ = ["main"]

log = logging.getLogger("monarch_k8s.torchrun.agent")
POLL_S = 0.3


def _token() -> str:
    token = os.environ.get("MONARCH_SYNC_TOKEN", "")
    if not token:
        raise SystemExit("MONARCH_SYNC_TOKEN is not set (the workspace token Secret)")
    return token


async def run_init(listen: str, root: str, version: str) -> int:
    host, port = parse_peer(listen)
    agent = Agent(root, _token(), host=host, port=port)
    if agent.store.current_hash() == version:  # a restarted pod whose volume has it
        return 0
    await agent.start()
    print(f"waiting for workspace {version[:16]} on {agent.address}", flush=True)
    t0 = time.monotonic()
    while agent.store.current_hash() != version:
        await asyncio.sleep(0.05)
    await agent.close()
    print(f"workspace {version[:16]} ready in {time.monotonic() - t0:.2f}s", flush=True)
    return 0


async def run_command(listen: str, root: str, command: list[str]) -> int:
    host, port = parse_peer(listen)
    agent = Agent(root, _token(), host=host, port=port)
    env = {k: v for k, v in os.environ.items() if k != "MONARCH_SYNC_TOKEN"}
    serving = True
    try:
        await agent.start()
    except OSError as exc:  # the job runs, without hot reload
        print(f"workspace agent not started ({exc}); hot reload is off", file=sys.stderr)
        serving = False
    proc = await asyncio.create_subprocess_exec(*command, env=env)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, proc.send_signal, sig)
    try:
        return await proc.wait()
    finally:
        if serving:
            await agent.close()


class Feeder:
    """Pushes versions from the cache's store to the worker agents that lack them."""

    def __init__(self, agent: Agent, namespace: str, token: str) -> None:
        from kubernetes import client, config

        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        api = client.ApiClient()
        self.core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self.serialize = api.sanitize_for_serialization
        self.agent = agent
        self.namespace = namespace
        self.token = token
        self.delivered: dict[str, str] = {}  # pod uid -> version pushed by this process

    def _observe(self) -> tuple[list[Any], dict[str, str]]:
        pods = self.core.list_namespaced_pod(self.namespace, label_selector=JOB_LABEL).items
        jobs: Any = self.custom.list_namespaced_custom_object(
            GROUP, VERSION, self.namespace, JOB_PLURAL
        )
        desired = {}
        for job in jobs.get("items", []):
            version = ((job.get("spec") or {}).get("workspace") or {}).get("version")
            if version:
                desired[job["metadata"]["name"]] = str(version)
        workers = [w for p in pods if (w := worker_pod(self.serialize(p))) is not None]
        return workers, desired

    def _available(self) -> set[str]:
        store = self.agent.store
        return {h for h in (store.current_hash(), store.previous_hash()) if h}

    async def step(self) -> None:
        workers, desired = await asyncio.to_thread(self._observe)
        live = {w.uid for w in workers}
        self.delivered = {uid: v for uid, v in self.delivered.items() if uid in live}
        for version, pods in plan_feeds(
            workers, desired, self._available(), self.delivered
        ).items():
            src = self.agent.store.version_dir(version)
            # one stat cache for every version: unchanged files are hard links of the previous
            # version's (same inode), so only what a push changed is hashed again
            cache = Path(self.agent.store.root).parent / "feeder"
            peers = [p.address for p in pods if p.address]
            report = await push(src, peers, self.token, cache_dir=cache)
            ok = {n.peer for n in report.nodes if n.ok and n.root == version}
            for pod in pods:
                if pod.address in ok:
                    self.delivered[pod.uid] = version
                    await asyncio.to_thread(self._mark, pod.name, version)
            print(
                f"fed {version[:16]} to {len(ok)}/{len(pods)} pods "
                f"({', '.join(p.name for p in pods)}) in {report.seconds:.2f}s",
                flush=True,
            )
            if not report.ok:
                print(report.format(), flush=True)

    def _mark(self, pod: str, version: str) -> None:
        patch = {"metadata": {"annotations": {LIVE_ANNOTATION: version}}}
        try:
            self.core.patch_namespaced_pod(pod, self.namespace, patch)
        except Exception as exc:  # gone meanwhile: nothing to mark
            log.info("marking %s failed: %s", pod, exc)

    async def run(self) -> None:
        while True:
            try:
                await self.step()
            except Exception as exc:  # the API server away, a pod gone: next pass
                print(f"feeder pass failed: {exc}", file=sys.stderr, flush=True)
            await asyncio.sleep(POLL_S)


async def run_cache(listen: str, root: str) -> int:
    host, port = parse_peer(listen)
    token = _token()
    Path(root).mkdir(parents=True, exist_ok=True)
    agent = Agent(root, token, host=host, port=port)
    await agent.start()
    print(f"workspace cache listening on {agent.address}, root {root}", flush=True)
    namespace = os.environ.get("POD_NAMESPACE", "default")
    feeder = asyncio.create_task(Feeder(agent, namespace, token).run())
    try:
        await agent.serve_until_signalled()
    finally:
        feeder.cancel()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m monarch_k8s.torchrun.agent")
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("cache", "init", "run"):
        p = sub.add_parser(name)
        p.add_argument("--listen", required=True)
        p.add_argument("--root", required=True)
        if name == "init":
            p.add_argument("--version", required=True)
        if name == "run":
            p.add_argument("command", nargs="+", help="the trainer's command, after --")
    args = parser.parse_args(argv)
    Path(args.root).mkdir(parents=True, exist_ok=True)
    if args.cmd == "cache":
        return asyncio.run(run_cache(args.listen, args.root))
    if args.cmd == "run":
        return asyncio.run(run_command(args.listen, args.root, args.command))
    return asyncio.run(run_init(args.listen, args.root, args.version))


if __name__ == "__main__":
    sys.exit(main())
