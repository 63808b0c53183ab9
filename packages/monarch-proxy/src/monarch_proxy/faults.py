"""Supervision events on the laptop: Monarch's ``unhandled_fault_hook``, honoured through the proxy.

Monarch calls ``monarch.actor.unhandled_fault_hook(failure)`` in the client when an actor or
process of a mesh fails and no call was there to raise it (a failed ``broadcast``, an actor that
crashed between calls). The gateway forwards such events to the session that owns the mesh as
they happen, and the proxy calls the hook here, on the connection's thread:

- ``monarch_proxy.faults.unhandled_fault_hook``, if the user replaced it;
- else ``monarch.actor.unhandled_fault_hook``, if torchmonarch is imported in this process and
  the user replaced Monarch's default there (so existing Monarch code keeps working);
- else the default here, which logs the report. Deliberate difference: Monarch's default exits
  the client process; a laptop driving a shared gateway keeps going.

A hook that raises makes the fault unhandled, as in Monarch: the report is written to stderr and
the main thread gets a ``KeyboardInterrupt``.
"""

from __future__ import annotations

import _thread
import logging
import sys
from dataclasses import dataclass, field
from typing import Any

__all__ = ["MeshFailure", "default_fault_hook", "report_fault", "unhandled_fault_hook"]

logger = logging.getLogger("monarch_proxy")


@dataclass(frozen=True)
class MeshFailure:
    """What failed, shaped like Monarch's ``MeshFailure``: ``mesh_name``, ``report()``, ``str``."""

    mesh_name: str
    _report: str
    error: BaseException | None = field(default=None, compare=False)
    crashed_ranks: tuple[int, ...] = ()

    def report(self) -> str:
        return self._report

    def __str__(self) -> str:
        return f"MeshFailure(mesh_name={self.mesh_name}, event={self._report})"


def default_fault_hook(failure: MeshFailure) -> None:
    logger.error("unhandled mesh failure: %s", failure.report())


unhandled_fault_hook = default_fault_hook


def _user_hook() -> Any:
    here = sys.modules[__name__].unhandled_fault_hook
    if here is not default_fault_hook:
        return here
    monarch_actor = sys.modules.get("monarch.actor")
    theirs = getattr(monarch_actor, "unhandled_fault_hook", None)
    default = getattr(
        sys.modules.get("monarch._src.actor.supervision"), "unhandled_fault_hook", None
    )
    if theirs is not None and theirs is not default:
        return theirs
    return default_fault_hook


def report_fault(failure: MeshFailure) -> None:
    """Run the fault hook for ``failure``; a hook that raises interrupts the main thread."""
    try:
        _user_hook()(failure)
    except BaseException as exc:
        sys.stderr.write(f"Unhandled monarch error: {failure.report()}\n({exc!r})\n")
        sys.stderr.flush()
        _thread.interrupt_main()
