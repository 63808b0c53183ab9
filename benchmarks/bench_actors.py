"""Actors the benchmarks spawn; importable by name so both paths ship them the same way."""

from monarch.actor import Actor, endpoint


class Echo(Actor):
    @endpoint
    def echo(self, value: object) -> object:
        return value
