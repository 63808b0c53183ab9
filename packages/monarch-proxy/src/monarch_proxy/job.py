"""The job contract every launcher implements, modelled on Monarch's ``JobTrait``.

    with SomeJob(...) as job:        # LocalJob, monarch_k8s.KubernetesJob, a SkyPilot job...
        state = job.state()          # apply() if needed, wait, connect; the same JobState after
        state.hosts.spawn_procs(per_host={"gpus": 8})
    # leaving the block is job.kill()

A launcher subclasses :class:`Job` and writes four hooks:

- ``_is_running()``: do the job's resources exist and run now? (by ``name``: a second ``Job``
  object, even in another process, with the name of a running job reuses it)
- ``_create()``: create them; ``apply()`` calls it only when ``_is_running()`` is false, so
  ``apply()`` is idempotent. It must not wait for them to be ready.
- ``_connect()``: wait until they are ready and return a connected
  :class:`~monarch_proxy.JobState`.
- ``_kill()``: tear down what this job created (and say so when it leaves something alone).

As in Monarch, ``state()`` returns the cached ``JobState`` while its connection is open, and
``kill()`` closes it before ``_kill()``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Self

from monarch_proxy.meshes import JobState


class Job(ABC):
    """A set of named host meshes that can be created, connected to and torn down."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._state: JobState | None = None

    # -- the hooks a launcher writes --------------------------------------------------------

    @abstractmethod
    def _is_running(self) -> bool:
        """Whether the job's resources exist now (created by this object or another)."""

    @abstractmethod
    def _create(self) -> None:
        """Create the resources; called by :meth:`apply` only when they do not exist."""

    @abstractmethod
    def _connect(self) -> JobState:
        """Wait for the resources to be ready and return a connected JobState."""

    @abstractmethod
    def _kill(self) -> None:
        """Tear down what this job created."""

    # -- the contract -----------------------------------------------------------------------

    def apply(self) -> Self:
        """Create the job's resources unless they are running already; do not wait."""
        if not self._is_running():
            self._create()
        return self

    def state(self) -> JobState:
        """The job's host meshes (``state.hosts``, ``state["hosts"]``): applies the job if it
        is not running, waits and connects; later calls return the same JobState while its
        connection is open."""
        if self._state is not None and state_is_open(self._state):
            return self._state
        self.apply()
        self._state = self._connect()
        return self._state

    def kill(self) -> None:
        """Close the connection, then tear down what this job created."""
        state, self._state = self._state, None
        try:
            if state is not None:
                state.close()
        finally:
            self._kill()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


def state_is_open(state: JobState) -> bool:
    """Whether ``state``'s connection is neither closed nor failed."""
    connection = state.connection
    return not connection._closing and connection._closed_by is None
