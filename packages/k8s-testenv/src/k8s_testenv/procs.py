"""Start and reliably stop the cluster's processes.

Every component runs in its own session, so its process-group id equals its pid and one
``killpg`` reaches anything it forked. The pids are written to ``state.json`` in the cluster
folder, which is all :func:`stop_groups` needs: ``k8s-testenv down`` works from another
process, and a test session that crashed can still be cleaned up.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from k8s_testenv.kubelet.runtime import kill_on_parent_death

__all__ = ["alive", "free_port", "log_tail", "spawn", "stop_groups", "wait_for"]


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def spawn(
    argv: Sequence[str], *, log: Path, tie_to_parent: bool, env: dict[str, str] | None = None
) -> int:
    """Start ``argv`` in a new session with output to ``log``; return its pid (= pgid).

    ``tie_to_parent`` (test fixtures) has the kernel kill the child when the *calling thread*
    exits (PR_SET_PDEATHSIG), so call it from a thread that lives as long as the cluster, such
    as the main thread. The CLI leaves it off so the cluster outlives ``k8s-testenv up``.
    """
    with log.open("ab") as out:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
            preexec_fn=kill_on_parent_death if tie_to_parent else None,
        )
    _children[proc.pid] = proc
    return proc.pid


# Popen objects of our own children, kept so they can be reaped (no zombies in long sessions).
_children: dict[int, subprocess.Popen[bytes]] = {}


def alive(pid: int) -> bool:
    """Whether ``pid`` is still running (reaping it if it is our own exited child)."""
    proc = _children.get(pid)
    if proc is not None:
        return proc.poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a group whose only member is our zombie child counts as gone
    return alive(pgid) or any(_in_group(pid, pgid) for pid in _pids())


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _in_group(pid: int, pgid: int) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return False
    return int(fields[2]) == pgid and fields[0] != "Z"


def stop_groups(pgids: Sequence[int], *, grace: float) -> None:
    """SIGTERM the process groups, wait up to ``grace`` seconds, then SIGKILL what is left."""
    for pgid in pgids:
        _signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_group_alive(g) for g in pgids):
        time.sleep(0.05)
    for pgid in pgids:
        _signal_group(pgid, signal.SIGKILL)
    for pgid in pgids:
        proc = _children.pop(pgid, None)
        if proc is not None:
            proc.wait()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def wait_for(
    check: Callable[[], bool], *, timeout: float, pid: int | None = None, interval: float = 0.1
) -> str | None:
    """Poll ``check`` until true; return None, or why it gave up ("exited" / "timed out")."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return None
        except Exception:  # not up yet: connection refused, 5xx, ...
            pass
        if pid is not None and not alive(pid):
            return "the process exited"
        if time.monotonic() > deadline:
            return f"not healthy after {timeout:.0f}s"
        time.sleep(interval)
