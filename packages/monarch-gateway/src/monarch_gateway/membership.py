"""Workers that come and go: take a replacement in, bring its sync agent up to date, tell clients.

A host mesh keeps its size. Every ``poll_s`` the gateway asks each mesh's source
(:mod:`monarch_gateway.sources`) which addresses are listed. :func:`plan_replacements` (pure)
pairs the slots whose worker is gone (judged dead by the monitor, or no longer listed) with
listed addresses the mesh does not use yet. For a plan, :class:`Membership`:

1. waits until every new address accepts connections (tried again at the next poll if not);
2. brings the new hosts' monarch-sync agents to the version the gateway's own agent holds
   (``monarch-sync push`` of that live tree, run as a command: the gateway imports nothing from
   monarch-sync), again until that version stopped changing meanwhile;
3. attaches a new Monarch host mesh over the current addresses and makes it the mesh's current
   one (spawns on the whole mesh use it from now on; meshes spawned before keep failing with
   ``WorkerLostError`` naming the dead worker);
4. updates the members file (pushes fan out to the new agent) and sends every client a
   membership event.

A worker restarted at an address this gateway attached before (a container restart keeps its
pod's IP; a pod may get its old IP back) is attached again, but torchmonarch 0.7 fails that once
the old worker had acknowledged a message (see :data:`REUSED_ADDRESS`); the address is then
reported to clients as ``unattachable`` and not tried again while it stays listed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from monarch_gateway.monitor import Worker, WorkerMonitor, probe, tcp_endpoint
from monarch_gateway.operations import MeshService
from monarch_gateway.relay import write_members
from monarch_gateway.sources import WorkerSource

__all__ = ["REUSED_ADDRESS", "Membership", "SyncSettings", "plan_replacements"]

logger = logging.getLogger("monarch_gateway.membership")

Attach = Callable[[str, list[str]], Awaitable[Any]]


#: Why a worker restarted at an address this gateway attached before is not taken in, once
#: attaching it failed. Established on torchmonarch 0.7.0 (README "Workers that come and go"):
#: the gateway's cached channel to the address resumes the dead process's session at its last
#: acknowledged sequence number, which the new process rejects ("stale session: out-of-sequence
#: message"), losing what was queued on it; and attempts after that connection is dropped fail
#: too, as the gateway's actors number their messages per destination actor
#: (``hyperactor::ordering``) and the new process's actors have the old ones' names
#: (``host_agent.service@<address>``). Only a worker that died before acknowledging anything
#: (its first 500 ms) can be attached again.
REUSED_ADDRESS = (
    "{address} is served by a new worker process, but this gateway attached the worker that was "
    "there before, and torchmonarch 0.7 cannot attach a second process at that address "
    "from the same gateway process (its message sequence numbers and cached connection for that "
    "address belong to the dead one; attaching failed: {error}). Give the worker a new address "
    "(delete its pod so that it gets another IP), or restart the gateway"
)


def plan_replacements(
    current: list[str],
    dead: set[str],
    listed: list[str] | None,
    refused: set[str] | frozenset[str] = frozenset(),
) -> list[tuple[int, str]]:
    """(slot, new address) for each gone worker that a listed address can replace.

    Gone: judged dead, or no longer listed. Fresh addresses (listed, not in use) replace gone
    workers in order; a dead worker whose own address is listed again (a container restarted,
    a pod recreated at the same IP) is then replaced by that address. Others wait for the next
    poll; ``refused`` addresses (attaching them cannot work) are never planned.
    """
    if listed is None:
        return []
    gone = [i for i, a in enumerate(current) if a in dead or a not in listed]
    fresh = [a for a in listed if a not in current and a not in refused]
    plan = list(zip(gone, fresh, strict=False))
    plan += [
        (i, current[i])
        for i in gone[len(plan) :]
        if current[i] in listed and current[i] not in refused
    ]
    return plan


def sync_member(worker_address: str, sync_port: int) -> str | None:
    """The monarch-sync agent of a worker host: same host, the agents' port."""
    endpoint = tcp_endpoint(worker_address)
    return f"{endpoint[0]}:{sync_port}" if endpoint is not None else None


@dataclass(frozen=True)
class SyncSettings:
    port: int  # every worker host's agent listens here
    members_file: str | None  # kept for the gateway's agent (its --members-file)
    token: str | None  # the agents' token: the gateway's own
    live_root: str | None  # the gateway agent's live tree (MONARCH_SYNC_ROOT), source of catch-up

    def members(self, addresses: list[str]) -> list[str]:
        return [m for a in addresses if (m := sync_member(a, self.port)) is not None]

    def write(self, addresses: list[str]) -> None:
        if self.members_file:
            write_members(self.members_file, self.members(addresses))

    def version(self) -> str | None:
        return os.path.realpath(self.live_root) if self.live_root else None

    async def catch_up(self, addresses: list[str]) -> bool:
        """Push the gateway agent's current version to the agents of ``addresses``."""
        if not self.live_root or not os.path.isdir(self.live_root):
            return True  # nothing was ever synced: nothing to catch up with
        peers = ",".join(self.members(addresses))
        while True:
            before = self.version()
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "monarch_sync.cli", "push", self.live_root, "--to", peers,
                "--quiet", env={**os.environ, "MONARCH_SYNC_TOKEN": self.token or ""},
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
            out, _ = await process.communicate()
            if process.returncode != 0:
                logger.warning("catch-up push to %s failed: %s", peers, out.decode()[-2000:])
                return False
            if self.version() == before:  # no push landed meanwhile: they hold the current one
                return True


class Membership:
    def __init__(
        self,
        sources: dict[str, WorkerSource],
        service: MeshService,
        monitor: WorkerMonitor,
        attach: Attach,
        publish: Callable[[dict[str, Any]], None],
        *,
        sync: SyncSettings | None = None,
        poll_s: float = 0.5,
    ) -> None:
        self.sources = sources
        self.service = service
        self.monitor = monitor
        self.attach = attach
        self.publish = publish
        self.sync = sync
        self.poll_s = poll_s
        self._task: asyncio.Task[None] | None = None
        # Workers a source stopped listing: gone for good, even if their address is listed
        # again (a pod recreated at the same IP is another process, hence another Worker).
        self.gone: set[Worker] = set()
        # Every address attached so far, and those attached again in vain (REUSED_ADDRESS):
        # mesh -> address -> why; kept while the address stays listed.
        self.used: set[str] = {w.address for ws in service.workers.values() for w in ws}
        self.unattachable: dict[str, dict[str, str]] = {name: {} for name in sources}

    def state(self) -> dict[str, Any]:
        """What clients are told: per mesh, its workers, the dead ones, whether it is whole."""
        dead = self.monitor.liveness.dead
        meshes = {}
        for name, workers in self.service.workers.items():
            lost = [w.address for w in workers if w in dead or w in self.gone]
            meshes[name] = {
                "workers": [w.address for w in workers],
                "dead": lost,
                "whole": not lost,
                "unattachable": dict(self.unattachable.get(name, {})),
            }
        return {"meshes": meshes, "whole": all(m["whole"] for m in meshes.values())}

    def refresh_members(self) -> None:
        """Pushes fan out to the agents of live workers only: a push while a worker is down
        reaches the others (its replacement is brought up to date when it joins)."""
        if self.sync is None:
            return
        dead = self.monitor.liveness.dead
        self.sync.write(
            [
                w.address
                for workers in self.service.workers.values()
                for w in workers
                if w not in dead and w not in self.gone
            ]
        )

    def start(self) -> None:
        self.refresh_members()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        for source in self.sources.values():
            source.close()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            for name, source in self.sources.items():
                try:
                    await self._poll(name, source)
                except Exception:
                    logger.exception("taking in workers of mesh %r failed; trying again", name)
            await asyncio.sleep(self.poll_s)

    async def _poll(self, name: str, source: WorkerSource) -> None:
        workers = self.service.workers[name]
        current = [w.address for w in workers]
        listed = await source.addresses()
        left = [w for w in workers if listed is not None and w.address not in listed]
        if set(left) - self.gone:  # the source no longer lists them: gone, whatever probes say
            self.gone |= set(left)
            self.refresh_members()
            self.publish({**self.state(), "lost": sorted(w.address for w in left)})
        dead = {w.address for w in workers if w in self.monitor.liveness.dead or w in self.gone}
        refused = self.unattachable[name]
        for address in set(refused) - set(listed or ()):
            del refused[address]
        plan = plan_replacements(current, dead, listed, set(refused))
        if not plan:
            return
        new = [address for _, address in plan]
        if not all(await asyncio.gather(*(probe(a) for a in new))):
            return
        if self.sync is not None and not await self.sync.catch_up(new):
            return
        addresses = list(current)
        for slot, address in plan:
            addresses[slot] = address
        try:
            host_mesh = await self.attach(name, addresses)
        except Exception as exc:
            reused = [a for a in new if a in self.used]
            if not reused:
                raise
            self._refuse(name, reused, exc)
            return
        self.used.update(new)
        replaced = list(workers)
        for slot, address in plan:
            replaced[slot] = Worker(name, slot, address, workers[slot].generation + 1)
        self.service.host_meshes[name] = host_mesh
        self.service.workers[name] = replaced
        self.monitor.workers = [w for ws in self.service.workers.values() for w in ws]
        if self.sync is not None:
            self.refresh_members()
        for slot, address in plan:
            logger.warning(
                "worker %s replaced by %s (host %d of %r)", current[slot], address, slot, name
            )
        self.publish({**self.state(), "replaced": {current[s]: a for s, a in plan}})

    def _refuse(self, name: str, addresses: list[str], exc: Exception) -> None:
        """Attaching at addresses attached before failed: tell clients once, do not retry."""
        error = " ".join(str(exc).split("Stack backtrace", 1)[0].split())
        refused = self.unattachable[name]
        for address in addresses:
            refused[address] = REUSED_ADDRESS.format(address=address, error=error)
            logger.error("not taking in a worker of mesh %r: %s", name, refused[address])
        self.publish({**self.state(), "unattachable": {a: refused[a] for a in addresses}})
