"""Notice dead workers: Monarch waits out its delivery timeout, we fail the call at once.

A killed worker's port stops accepting connections, so the gateway probes every worker's TCP
address a few times a second. The decision (how many misses make a worker dead) is a pure
function of the probe results; the asyncio part only connects and reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

logger = logging.getLogger("monarch_gateway.monitor")


#: worker address -> what its source calls it (``pod <namespace>/<name>`` from a label
#: selector), so errors name the pod; kept after the pod goes, as errors come after that
WORKER_NAMES: dict[str, str] = {}


@dataclass(frozen=True, slots=True)
class Worker:
    mesh: str
    index: int
    address: str
    generation: int = 0  # a replacement at the same address is another worker

    def describe(self) -> str:
        name = WORKER_NAMES.get(self.address)
        where = f"{name}, " if name else ""
        return f"worker {self.address} ({where}host {self.index} of mesh {self.mesh!r})"


def tcp_endpoint(address: str) -> tuple[str, int] | None:
    """Host and port to probe for a worker address; None for non-TCP transports.

    Accepts ``tcp://h:p``, ``<proc-id>@tcp://h:p`` and the bind alias
    ``tcp://advertised:p@tcp://0.0.0.0:p`` (the advertised side is the one to dial).
    """
    for part in address.split("@"):
        if part.startswith("tcp://"):
            url = urlsplit(part)
            if url.hostname and url.port:
                return url.hostname, url.port
    return None


class Liveness:
    """Consecutive failed probes per worker; a worker is dead after ``threshold`` of them."""

    def __init__(self, threshold: int = 2) -> None:
        self.threshold = threshold
        self._misses: dict[Worker, int] = {}
        self.dead: set[Worker] = set()

    def record(self, worker: Worker, reachable: bool) -> bool:
        """Record one probe; return True exactly once, when the worker is judged dead."""
        if worker in self.dead:
            return False
        misses = 0 if reachable else self._misses.get(worker, 0) + 1
        self._misses[worker] = misses
        if misses >= self.threshold:
            self.dead.add(worker)
            return True
        return False


class WorkerMonitor:
    def __init__(
        self,
        workers: list[Worker],
        on_dead: Callable[[Worker], None],
        *,
        interval_s: float = 0.25,
        timeout_s: float = 1.0,
        threshold: int = 2,
    ) -> None:
        self.workers = workers
        self.liveness = Liveness(threshold)
        self._on_dead = on_dead
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def is_dead(self, mesh: str, index: int) -> Worker | None:
        for worker in self.liveness.dead:
            if worker.mesh == mesh and worker.index == index:
                return worker
        return None

    async def _run(self) -> None:
        while True:  # the list changes as workers are replaced (see membership.py)
            probed = [(w, tcp_endpoint(w.address)) for w in self.workers]
            live = [(w, ep) for w, ep in probed if ep is not None and w not in self.liveness.dead]
            results = await asyncio.gather(*(probe(w.address, self._timeout_s) for w, _ in live))
            for (worker, _), reachable in zip(live, results, strict=True):
                if self.liveness.record(worker, reachable):
                    logger.warning("%s is unreachable; failing its calls", worker.describe())
                    self._on_dead(worker)
            await asyncio.sleep(self._interval_s)


async def probe(address: str, timeout_s: float = 1.0) -> bool:
    """Whether a worker address accepts TCP connections now (False for non-TCP addresses)."""
    endpoint = tcp_endpoint(address)
    if endpoint is None:
        return False
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(*endpoint), timeout_s)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True
