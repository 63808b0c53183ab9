"""Errors raised by k8s_testenv.

K8sTestenvError
├── MissingToolError (also FileNotFoundError)  a required program (go, etcd) is absent
├── BuildError                                 `go build` of the control plane failed
└── StartupError (also TimeoutError)           a component exited or never became healthy
"""

from __future__ import annotations

__all__ = ["BuildError", "K8sTestenvError", "MissingToolError", "StartupError"]


class K8sTestenvError(Exception):
    """Root of every error this package raises."""


class MissingToolError(K8sTestenvError, FileNotFoundError):
    """A program the test environment needs is not installed; `tool` names it."""

    def __init__(self, tool: str, hint: str) -> None:
        super().__init__(f"k8s-testenv needs `{tool}`, which was not found. {hint}")
        self.tool = tool
        self.hint = hint


class BuildError(K8sTestenvError):
    """Building a binary from the Go modules failed; `output` is the tail of go's output."""

    def __init__(self, target: str, output: str) -> None:
        super().__init__(f"building {target} failed:\n{output}")
        self.target = target
        self.output = output


class StartupError(K8sTestenvError, TimeoutError):
    """A component died or did not become healthy; `log_tail` holds the end of its log."""

    def __init__(self, component: str, reason: str, log_tail: str = "") -> None:
        message = f"{component} failed to start: {reason}"
        if log_tail:
            message += f"\n--- last lines of the {component} log ---\n{log_tail}"
        super().__init__(message)
        self.component = component
        self.reason = reason
        self.log_tail = log_tail
