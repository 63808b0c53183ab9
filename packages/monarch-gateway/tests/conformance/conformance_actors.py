"""Actor classes of the conformance suite, importable by name on the workers and the gateway
(as the gateway tests' ``actors``, whose ``Basics`` and ``BrokenInit`` they share)."""

from __future__ import annotations

import os
from typing import Any

from actors import Basics
from monarch.actor import Actor, Port, current_rank, current_size, endpoint, this_proc


class Probe(Basics):
    def __init__(self, label: str = "probe") -> None:
        self.label = label
        self.count = 0

    @endpoint
    def rank(self) -> dict[str, int]:
        return dict(current_rank())

    @endpoint
    def sizes_here(self) -> dict[str, int]:
        return dict(current_size())

    @endpoint
    def whoami(self) -> dict[str, Any]:
        return {"label": self.label, "rank": dict(current_rank())}

    @endpoint
    def pid(self) -> int:
        return os.getpid()

    @endpoint
    def fail_at(self, rank: int, message: str) -> int:
        """Fail on the actor at flat rank ``rank`` only."""
        point = current_rank()
        if point.rank == rank:
            raise ValueError(message)
        return point.rank

    @endpoint
    def incr(self, by: int = 1) -> int:
        self.count += by
        return self.count

    @endpoint(explicit_response_port=True)
    def reply_twice(self, port: Port[int], value: int) -> None:
        port.send(value * 2)

    @endpoint
    def spawn_child(self, label: str) -> dict[str, Any]:
        """Actors spawning actors: a child on this actor's own process, called from here."""
        child = this_proc().spawn(f"child_{label}", Probe, label)
        return child.whoami.call_one().get()

    @endpoint
    def call_mesh(self, mesh: Any) -> list[Any]:
        """A mesh passed as an argument: call it from inside an actor."""
        return sorted(v["label"] for v in mesh.whoami.call().get().values())

    @endpoint
    def make_mesh(self, label: str) -> Any:
        """A mesh returned as a result."""
        return this_proc().spawn(f"made_{label}", Probe, label)

    @endpoint
    def crash(self) -> None:
        os._exit(1)


class Named(Actor):
    """Endpoints whose names are the proxy's old attribute names: they must be callable."""

    @endpoint
    def name(self) -> str:
        return "name"

    @endpoint
    def kind(self) -> str:
        return "kind"

    @endpoint
    def handle(self) -> str:
        return "handle"

    @endpoint
    def connection(self) -> str:
        return "connection"


class Collides(Actor):
    """An endpoint named like a mesh method: Monarch refuses to spawn it."""

    @endpoint
    def slice(self) -> str:  # type: ignore[override]
        return "slice"


class Kw(Actor):
    """A constructor keyword named ``by_value`` (the proxy's spawn takes one too)."""

    def __init__(self, by_value: int = 0) -> None:
        self.value = by_value

    @endpoint
    def value_of(self) -> int:
        return self.value
