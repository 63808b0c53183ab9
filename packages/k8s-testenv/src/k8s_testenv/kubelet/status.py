"""Pure pod-status decisions, the part of a kubelet that needs no processes or network.

Theory of operation: the runtime keeps one :class:`ContainerRecord` per container and feeds it
observations (started, exited, probe result). Everything a kubelet *decides* from those records
lives here as plain functions: whether an exited container restarts and after what back-off,
the pod phase (the same case analysis as the real kubelet's ``getPhase``), the pod conditions,
and the JSON ``containerStatuses`` entries. No function reads a clock: ``now`` is an argument.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum, StrEnum
from typing import Any

__all__ = [
    "ContainerRecord",
    "Phase",
    "RestartPolicy",
    "State",
    "backoff_delay",
    "container_status",
    "init_outcome",
    "pod_conditions",
    "pod_phase",
    "rfc3339",
    "should_restart",
]


class Phase(StrEnum):
    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


class RestartPolicy(StrEnum):
    ALWAYS = "Always"
    ON_FAILURE = "OnFailure"
    NEVER = "Never"


class State(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    TERMINATED = "terminated"


@dataclass
class ContainerRecord:
    """What the kubelet knows about one container of one pod."""

    name: str
    state: State = State.WAITING
    reason: str = "ContainerCreating"
    exit_code: int | None = None
    started_at: float | None = None
    finished_at: float | None = None
    restart_count: int = 0
    ready: bool = False
    #: the previous run's (exit_code, started_at, finished_at), shown as lastState
    last_termination: tuple[int, float, float] | None = None
    #: when a restart is allowed (crash back-off); None while no restart is pending
    restart_at: float | None = None
    probe_successes: int = 0
    probe_failures: int = 0
    liveness_failures: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def succeeded(self) -> bool:
        return self.state is State.TERMINATED and self.exit_code == 0

    @property
    def failed(self) -> bool:
        return self.state is State.TERMINATED and self.exit_code != 0


def should_restart(policy: RestartPolicy, exit_code: int) -> bool:
    """Whether a container that exited with ``exit_code`` is started again."""
    if policy is RestartPolicy.ALWAYS:
        return True
    if policy is RestartPolicy.ON_FAILURE:
        return exit_code != 0
    return False


def backoff_delay(restart_count: int, *, base: float, cap: float) -> float:
    """Crash-loop back-off before restart number ``restart_count + 1``: base·2ⁿ, capped.

    As in the kubelet (10 s, 20 s, 40 s, … capped at 300 s); tests pass smaller values.
    """
    return float(min(cap, base * 2 ** max(restart_count, 0)))


def init_outcome(
    policy: RestartPolicy, records: Sequence[ContainerRecord]
) -> tuple[str, ContainerRecord | None]:
    """Where a pod stands with its init containers, which run one at a time in order.

    Returns ``("done", None)`` when every init container succeeded, ``("failed", rec)`` when
    ``rec`` failed and will not be retried (policy Never), else ``("run", rec)`` with the init
    container to start, watch or restart next.
    """
    for record in records:
        if record.succeeded:
            continue
        if record.failed and policy is RestartPolicy.NEVER:
            return "failed", record
        return "run", record
    return "done", None


def pod_phase(
    policy: RestartPolicy,
    init_records: Sequence[ContainerRecord],
    records: Sequence[ContainerRecord],
) -> Phase:
    """The pod phase, following the case analysis of the kubelet's ``getPhase``."""
    init_state, _ = init_outcome(policy, init_records)
    if init_state == "failed":
        return Phase.FAILED
    if init_state == "run":
        return Phase.PENDING
    running = waiting = stopped = succeeded = 0
    for record in records:
        if record.state is State.RUNNING:
            running += 1
        elif record.state is State.TERMINATED:
            stopped += 1
            succeeded += record.exit_code == 0
        elif record.last_termination is not None:
            # waiting in crash back-off counts as stopped, as in the kubelet
            stopped += 1
            succeeded += record.last_termination[0] == 0
        else:
            waiting += 1
    if waiting > 0:
        return Phase.PENDING
    if running > 0:
        return Phase.RUNNING
    if stopped > 0:
        if policy is RestartPolicy.ALWAYS:
            return Phase.RUNNING
        if stopped == succeeded:
            return Phase.SUCCEEDED
        if policy is RestartPolicy.NEVER:
            return Phase.FAILED
        return Phase.RUNNING  # OnFailure: the failed ones are about to restart
    return Phase.PENDING


def rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _condition(kind: str, ok: bool, now: float, reason: str | None = None) -> dict[str, Any]:
    cond: dict[str, Any] = {
        "type": kind,
        "status": "True" if ok else "False",
        "lastProbeTime": None,
        "lastTransitionTime": rfc3339(now),
    }
    if reason and not ok:
        cond["reason"] = reason
    return cond


def pod_conditions(
    phase: Phase,
    init_records: Sequence[ContainerRecord],
    records: Sequence[ContainerRecord],
    *,
    now: float,
    previous: Iterable[Mapping[str, Any]] = (),
    sandbox_ready: bool = True,
) -> list[dict[str, Any]]:
    """PodScheduled, PodReadyToStartContainers, Initialized, ContainersReady and Ready.

    ``lastTransitionTime`` is carried over from ``previous`` when a condition keeps its status.
    ``sandbox_ready`` is False while the pod's volumes are not set up yet.
    """
    initialized = init_outcome(RestartPolicy.NEVER, init_records)[0] == "done"
    terminal = phase in (Phase.SUCCEEDED, Phase.FAILED)
    ready = initialized and not terminal and all(r.ready for r in records)
    not_ready_reason = "PodCompleted" if terminal else "ContainersNotReady"
    fresh = [
        _condition("PodReadyToStartContainers", sandbox_ready, now),
        _condition("Initialized", initialized, now, "ContainersNotInitialized"),
        _condition("Ready", ready, now, not_ready_reason),
        _condition("ContainersReady", ready, now, not_ready_reason),
        _condition("PodScheduled", True, now),
    ]
    before = {c.get("type"): c for c in previous}
    for cond in fresh:
        old = before.get(cond["type"])
        if old and old.get("status") == cond["status"] and old.get("lastTransitionTime"):
            cond["lastTransitionTime"] = old["lastTransitionTime"]
    return fresh


def _terminated(exit_code: int, started: float, finished: float) -> dict[str, Any]:
    return {
        "exitCode": exit_code,
        "reason": "Completed" if exit_code == 0 else "Error",
        "startedAt": rfc3339(started),
        "finishedAt": rfc3339(finished),
    }


def container_status(record: ContainerRecord, *, image: str) -> dict[str, Any]:
    """The ``containerStatuses`` entry the API shows for ``record``."""
    state: dict[str, Any]
    if record.state is State.RUNNING:
        state = {"running": {"startedAt": rfc3339(record.started_at or 0.0)}}
    elif record.state is State.TERMINATED:
        state = {
            "terminated": _terminated(
                record.exit_code or 0, record.started_at or 0.0, record.finished_at or 0.0
            )
        }
    else:
        state = {"waiting": {"reason": record.reason}}
    status: dict[str, Any] = {
        "name": record.name,
        "state": state,
        "lastState": {},
        "ready": record.ready,
        "restartCount": record.restart_count,
        "image": image,
        "imageID": "",
        "started": record.state is State.RUNNING,
    }
    if record.state is State.RUNNING:
        status["containerID"] = f"process://{record.extra.get('pid', 0)}"
    if record.last_termination is not None:
        status["lastState"] = {"terminated": _terminated(*record.last_termination)}
    return status
