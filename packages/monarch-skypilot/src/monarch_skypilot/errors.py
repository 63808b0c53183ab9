"""Typed errors of :class:`~monarch_skypilot.SkyPilotJob`, each naming what to do next.

    SkyPilotJobError
    ├── InvalidJobError            the arguments cannot make a task (also a ValueError)
    ├── NoCloudAccessError         no cloud is enabled here: run `sky check`
    ├── ResourcesUnavailableError  no candidate had capacity; ``failover_history`` says where
    ├── ClusterNotUpError          the cluster never came up (or went away); ``status`` is why
    ├── WorkersNotListeningError   nodes are up but workers never listened; ``log_tail`` shows why
    ├── CudaRequiredError          the image needs CUDA and the node has no GPU
    └── BatchJobError              a managed (batch) job failed or could not be found

SkyPilot's own exceptions are translated in one place (:func:`translate`), so callers never see
an API-server traceback for a setup problem.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "BatchJobError",
    "ClusterNotUpError",
    "CudaRequiredError",
    "InvalidJobError",
    "NoCloudAccessError",
    "ResourcesUnavailableError",
    "SkyPilotJobError",
    "WorkersNotListeningError",
    "translate",
]


class SkyPilotJobError(Exception):
    """Base of SkyPilotJob's own errors."""


class InvalidJobError(SkyPilotJobError, ValueError):
    """The job's arguments are inconsistent (a bad mesh size, a mode that cannot work, ...)."""


class NoCloudAccessError(SkyPilotJobError):
    """SkyPilot has no enabled cloud (or Kubernetes context) to launch on."""


class ResourcesUnavailableError(SkyPilotJobError):
    """Every candidate resource was tried and none had capacity.

    ``failover_history`` holds one line per attempt (cloud/region: reason), in order.
    """

    def __init__(self, message: str, failover_history: list[str]) -> None:
        super().__init__(message)
        self.failover_history = failover_history


class ClusterNotUpError(SkyPilotJobError, TimeoutError):
    """The cluster did not reach UP (``status`` is the last one seen) or does not exist."""

    def __init__(self, message: str, cluster: str, status: str | None) -> None:
        super().__init__(message)
        self.cluster = cluster
        self.status = status


class WorkersNotListeningError(SkyPilotJobError, TimeoutError):
    """The cluster is up but its workers (or gateway) never listened; ``log_tail`` is the last
    lines of the node's worker log."""

    def __init__(self, message: str, log_tail: str) -> None:
        super().__init__(message)
        self.log_tail = log_tail


class CudaRequiredError(SkyPilotJobError):
    """A node without a GPU ran an image or wheel that needs ``libcuda.so.1``."""


class BatchJobError(SkyPilotJobError):
    """A managed job (batch mode) failed, was cancelled, or is unknown to the controller."""

    def __init__(self, message: str, status: str | None = None) -> None:
        super().__init__(message)
        self.status = status


CUDA_MARKERS = ("libcuda.so", "CUDA driver", "no CUDA-capable device")


def cuda_missing(log_tail: str) -> bool:
    return any(marker in log_tail for marker in CUDA_MARKERS)


def _history(exc: BaseException) -> list[str]:
    lines = []
    for item in getattr(exc, "failover_history", None) or []:
        lines.append(f"{type(item).__name__}: {item}".strip())
    return lines


def translate(exc: BaseException, cluster: str, candidates: list[Any] | None = None) -> Exception:
    """SkyPilot's exception as ours, or ``exc`` itself when it is not a setup problem we know."""
    name = type(exc).__name__
    text = str(exc).replace("\x1b[1m", "").replace("\x1b[0m", "")
    if name == "NoCloudAccessError":
        return NoCloudAccessError(
            f"SkyPilot has no cloud enabled to launch cluster {cluster!r} on ({text.strip()}). "
            "Run `sky check` to see which clouds are set up and how to enable one "
            "(credentials, or a Kubernetes context), then call state() again."
        )
    if name == "ResourcesUnavailableError":
        history = _history(exc)
        tried = "; ".join(str(c) for c in candidates or []) or "the requested resources"
        detail = "\n  ".join(history) if history else text.strip()
        return ResourcesUnavailableError(
            f"no capacity for cluster {cluster!r} in any candidate ({tried}).\n  {detail}\n"
            "Add candidates (other regions, clouds or accelerators) to resources=, allow spot "
            "(use_spot=True) or on-demand, or retry later.",
            history or [text.strip()],
        )
    if name in ("ClusterNotUpError", "ClusterDoesNotExist"):
        return ClusterNotUpError(
            f"cluster {cluster!r} is not up: {text.strip()}. `sky status {cluster}` shows it; "
            "state() launches it again, kill() removes what is left.",
            cluster,
            None,
        )
    if name == "ApiServerConnectionError":
        return SkyPilotJobError(
            f"cannot reach the SkyPilot API server ({text.strip()}): `sky api status`, "
            "`sky api start` for a local one, or `sky api login` for a remote one"
        )
    if isinstance(exc, Exception):
        return exc
    raise exc
