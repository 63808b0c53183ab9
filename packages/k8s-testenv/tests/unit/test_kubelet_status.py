"""The kubelet's pure decisions: restart policy, back-off, phase and conditions."""

from __future__ import annotations

import pytest
from k8s_testenv.kubelet.status import (
    ContainerRecord,
    Phase,
    RestartPolicy,
    State,
    backoff_delay,
    container_status,
    init_outcome,
    pod_conditions,
    pod_phase,
    should_restart,
)


def running(name: str = "c", ready: bool = True) -> ContainerRecord:
    return ContainerRecord(name, state=State.RUNNING, started_at=1.0, ready=ready)


def exited(code: int, name: str = "c") -> ContainerRecord:
    return ContainerRecord(
        name, state=State.TERMINATED, exit_code=code, started_at=1.0, finished_at=2.0
    )


def crash_looping(last_code: int, name: str = "c") -> ContainerRecord:
    return ContainerRecord(name, reason="CrashLoopBackOff", last_termination=(last_code, 1.0, 2.0))


@pytest.mark.parametrize(
    ("policy", "code", "expected"),
    [
        (RestartPolicy.ALWAYS, 0, True),
        (RestartPolicy.ALWAYS, 1, True),
        (RestartPolicy.ON_FAILURE, 0, False),
        (RestartPolicy.ON_FAILURE, 3, True),
        (RestartPolicy.NEVER, 0, False),
        (RestartPolicy.NEVER, 1, False),
    ],
)
def test_restart_follows_the_pod_restart_policy(
    policy: RestartPolicy, code: int, expected: bool
) -> None:
    assert should_restart(policy, code) is expected


def test_backoff_doubles_from_the_base_up_to_the_cap() -> None:
    delays = [backoff_delay(n, base=10, cap=300) for n in range(7)]
    assert delays == [10, 20, 40, 80, 160, 300, 300]


def test_pod_with_a_waiting_container_is_pending() -> None:
    assert pod_phase(RestartPolicy.ALWAYS, [], [running(), ContainerRecord("b")]) is Phase.PENDING


def test_pod_with_running_containers_is_running() -> None:
    assert pod_phase(RestartPolicy.NEVER, [], [running(), exited(0, "b")]) is Phase.RUNNING


@pytest.mark.parametrize(
    ("policy", "codes", "phase"),
    [
        (RestartPolicy.NEVER, [0, 0], Phase.SUCCEEDED),
        (RestartPolicy.NEVER, [0, 1], Phase.FAILED),
        (RestartPolicy.ON_FAILURE, [0, 0], Phase.SUCCEEDED),
        (RestartPolicy.ON_FAILURE, [0, 1], Phase.RUNNING),
        (RestartPolicy.ALWAYS, [0, 0], Phase.RUNNING),
    ],
)
def test_phase_once_every_container_stopped(
    policy: RestartPolicy, codes: list[int], phase: Phase
) -> None:
    records = [exited(code, f"c{i}") for i, code in enumerate(codes)]
    assert pod_phase(policy, [], records) is phase


def test_container_in_crash_backoff_counts_as_stopped_not_waiting() -> None:
    assert pod_phase(RestartPolicy.ALWAYS, [], [crash_looping(1)]) is Phase.RUNNING


def test_init_containers_run_in_order_before_the_app() -> None:
    inits = [exited(0, "first"), ContainerRecord("second")]
    state, record = init_outcome(RestartPolicy.ALWAYS, inits)
    assert (state, record and record.name) == ("run", "second")
    assert pod_phase(RestartPolicy.ALWAYS, inits, [ContainerRecord("app")]) is Phase.PENDING


def test_failed_init_container_fails_a_never_pod() -> None:
    inits = [exited(2, "setup")]
    assert init_outcome(RestartPolicy.NEVER, inits)[0] == "failed"
    assert pod_phase(RestartPolicy.NEVER, inits, [ContainerRecord("app")]) is Phase.FAILED


def test_failed_init_container_is_retried_for_other_policies() -> None:
    assert init_outcome(RestartPolicy.ON_FAILURE, [exited(2, "setup")])[0] == "run"


def conditions(phase: Phase, records: list[ContainerRecord], **kw: object) -> dict[str, str]:
    return {c["type"]: c["status"] for c in pod_conditions(phase, [], records, now=100.0, **kw)}  # type: ignore[arg-type]


def test_ready_needs_every_container_ready() -> None:
    assert conditions(Phase.RUNNING, [running(), running("b", ready=False)])["Ready"] == "False"
    assert conditions(Phase.RUNNING, [running(), running("b")]) == {
        "PodReadyToStartContainers": "True",
        "Initialized": "True",
        "Ready": "True",
        "ContainersReady": "True",
        "PodScheduled": "True",
    }


def test_completed_pod_is_not_ready_with_reason_pod_completed() -> None:
    conds = pod_conditions(Phase.SUCCEEDED, [], [exited(0)], now=5.0)
    ready = next(c for c in conds if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "PodCompleted")


def test_transition_time_is_kept_while_status_does_not_change() -> None:
    first = pod_conditions(Phase.RUNNING, [], [running()], now=0.0)
    again = pod_conditions(Phase.RUNNING, [], [running()], now=500.0, previous=first)
    assert again == first
    flipped = pod_conditions(Phase.RUNNING, [], [running(ready=False)], now=500.0, previous=first)
    ready = next(c for c in flipped if c["type"] == "Ready")
    assert ready["lastTransitionTime"] == "1970-01-01T00:08:20Z"


def test_container_status_shows_exit_code_and_previous_run() -> None:
    record = exited(3)
    record.restart_count = 2
    record.last_termination = (1, 0.0, 1.0)
    status = container_status(record, image="busybox")
    assert status["state"]["terminated"]["exitCode"] == 3
    assert status["state"]["terminated"]["reason"] == "Error"
    assert status["lastState"]["terminated"]["exitCode"] == 1
    assert (status["restartCount"], status["ready"], status["started"]) == (2, False, False)
