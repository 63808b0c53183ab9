"""Actors the benchmarks spawn; importable by name so both paths ship them the same way."""

from monarch.actor import Actor, endpoint


class Echo(Actor):
    @endpoint
    def echo(self, value: object) -> object:
        return value


class Forward(Actor):
    @endpoint
    def forward(self, mesh: object, value: object) -> object:
        """Call ``mesh`` (passed as an argument) from inside an actor."""
        return mesh.echo.call_one(value).get()  # type: ignore[attr-defined]
