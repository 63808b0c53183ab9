"""Actors for test_fidelity_*.py: meshes as arguments and results, keywords, bootstrap."""

from __future__ import annotations

import os

from monarch.actor import Actor, current_rank, endpoint, this_proc


class Relay(Actor):
    """Receives meshes (and containers of them) and calls through them."""

    @endpoint
    def describe(self, value: object) -> str:
        return type(value).__name__

    @endpoint
    def relay(self, mesh: object, value: object) -> list[object]:
        return list(mesh.echo.call(value).get().values())  # type: ignore[attr-defined]

    @endpoint
    def relay_nested(self, box: dict[str, list[object]], value: object) -> list[list[object]]:
        return [list(m.echo.call(value).get().values()) for m in box["meshes"]]  # type: ignore[attr-defined]

    @endpoint
    def value_mesh(self, mesh: object, value: object) -> object:
        return mesh.echo.call(value).get()  # type: ignore[attr-defined]

    @endpoint
    def spawn_child(self, label: str) -> object:
        from actors import Worker

        return this_proc().spawn("child", Worker, label)

    @endpoint
    def own_procs(self) -> object:
        return this_proc()


class Keywords(Actor):
    def __init__(self, by_value: object = None, **rest: object) -> None:
        self.seen = {"by_value": by_value, **rest}

    @endpoint
    def seen_keywords(self) -> dict[str, object]:
        return self.seen


class Moody(Actor):
    @endpoint
    def fail_on(self, gpus: int) -> int:
        rank = current_rank()["gpus"]
        if rank == gpus:
            raise ValueError(f"rank {rank} fails on purpose")
        return rank

    @endpoint
    def env(self, name: str) -> str | None:
        return os.environ.get(name)

    @endpoint
    def pid(self) -> int:
        return os.getpid()


def set_marker() -> None:
    os.environ["FIDELITY_BOOTSTRAP"] = "ran"
