"""The root README's Kubernetes sections, run as a user would.

The ``bash`` blocks under "Kubernetes from a laptop" and "torchrun scripts on Kubernetes" are
read from README.md and each command (a line, with its ``\\`` continuations) runs in ``bash``
from the repository root, the shell's exports and folder carried to the next one. Three mappings
only: ``uv run --all-packages`` is dropped (this session's venv already holds every package, and
its ``bin`` is first on PATH), ``uv sync --all-packages --group ddp`` becomes a check that torch
is importable here (nox synced the session's venv with that group; the test must not sync
another), and ``JOB`` becomes the name ``kubectl torchrun submit`` printed.
Everything else is verbatim, so a README that drifts from what works fails here.

The cluster gets its own folder through ``K8S_TESTENV_DIR`` (other clusters may run on this
machine) and ``k8s-testenv down`` runs whatever happens. Binaries: ``K8S_TESTENV_BIN_DIR`` or
``tools/k8s-testenv/bin``, built by ``ensure_binaries`` (Go) when missing, as the packages'
integration tests do.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from k8s_testenv.build import ensure_binaries

ROOT = Path(__file__).resolve().parents[2]
SECTIONS = ("## Kubernetes from a laptop", "## torchrun scripts on Kubernetes")
UV_RUN = "uv run --all-packages "
# nox's integration session made its venv with these groups; here the line checks it did
UV_SYNC = ("uv sync --all-packages --group ddp", 'python -c "import torch"')

pytestmark = pytest.mark.timeout(600)


def readme_commands(section: str) -> list[str]:
    """The section's bash commands, one per logical line, comments kept (bash drops them)."""
    text = (ROOT / "README.md").read_text()
    found = re.search(rf"^{re.escape(section)}[^\n]*\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert found, f"README.md has no section {section!r}"
    body = found.group(1)
    blocks = re.findall(r"```bash\n(.*?)```", body, flags=re.S)
    assert blocks, f"README.md has no bash block under {section!r}"
    joined = "\n".join(blocks).replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip()]


class Shell:
    """One command per ``bash`` run; exports and the current folder carry over, as in a
    terminal. Prints every command and, when one fails, the tail of its output."""

    def __init__(self, folder: Path, env: dict[str, str]):
        self.state = folder / "shell-env.sh"
        self.cwd = folder / "shell-cwd"
        self.state.write_text("".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items()))
        self.cwd.write_text(str(ROOT))

    def run(self, command: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
        command = command.replace(UV_RUN, "").replace(*UV_SYNC)
        print(f"$ {command}", flush=True)
        script = (
            f'set -eo pipefail; source {self.state}; cd "$(cat {self.cwd})"\n{command}\n'
            f"export -p > {self.state}; pwd > {self.cwd}"
        )
        proc = subprocess.Popen(
            ["bash", "-c", script],
            env={"HOME": os.environ.get("HOME", "/root")},  # all else from the state file
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # a timeout ends the command's children too
        )
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
        tail = "\n".join((stdout + stderr).splitlines()[-40:])
        print(tail, flush=True)  # shown by pytest when the test fails
        if proc.returncode != 0:
            pytest.fail(f"`{command}` exited {proc.returncode} (-9: ran past {timeout:.0f} s); "
                        f"its output ends:\n{tail}")  # fmt: skip
        return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def test_readme_kubernetes_sections_run_as_written(tmp_path: Path) -> None:
    binaries = ensure_binaries()  # builds them with Go when missing; never skips
    cluster_dir = tmp_path / "cluster"
    env = {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "K8S_TESTENV_DIR": str(cluster_dir),
        "K8S_TESTENV_BIN_DIR": str(binaries.kubectl.parent),
        # never another cluster's: a README that sets no KUBECONFIG fails here
        "KUBECONFIG": str(tmp_path / "no-kubeconfig"),
        "PYTHONUNBUFFERED": "1",
    }
    env.update(
        {k: v for k, v in os.environ.items() if k in ("VIRTUAL_ENV", "PYTHONPATH", "TMPDIR")}
    )
    shell = Shell(tmp_path, env)
    try:
        laptop = readme_commands(SECTIONS[0])
        assert "k8s-testenv up" in laptop[0], laptop
        shell.run(laptop[0])
        kubeconfig = shell.run('echo "$KUBECONFIG"').stdout.strip()
        assert kubeconfig == f"{cluster_dir}/kubeconfig", "`up` set no KUBECONFIG"
        for command in laptop[1:-1]:
            shell.run(command)
        ran = shell.run(laptop[-1], timeout=300)
        hello = ran.stdout + ran.stderr
        assert "kubernetes_hello.py" in laptop[-1]
        pods = set(re.findall(r"rank \d+ on pod (\S+)", hello))
        assert len(pods) == 2, f"answers from {len(pods)} pods, not 2:\n{hello[-3000:]}"
        assert "deleted" in hello.lower(), f"no cleanup reported:\n{hello[-3000:]}"

        job = ""
        for command in readme_commands(SECTIONS[1]):
            if "JOB" in command:
                assert job, "the README uses JOB before `kubectl torchrun submit` printed it"
                command = re.sub(r"\bJOB\b", job, command)
            ran = shell.run(command, timeout=300)
            out = ran.stdout + ran.stderr
            if "kubectl torchrun submit" in command:  # the name on stdout, progress on stderr
                job = ran.stdout.strip().splitlines()[-1] if ran.stdout.strip() else ""
            if " logs -f " in command:
                # each line prefixed with its node's rank; train.py prints each process's rank
                nodes = {int(n) for n in re.findall(r"^\[rank (\d+)\] ", out, flags=re.M)}
                assert nodes == {0, 1}, f"lines from nodes {sorted(nodes)}:\n{out[-3000:]}"
                ranks = {int(r) for r in re.findall(r"^\[rank \d+\] rank (\d)/4 ", out, flags=re.M)}
                assert ranks == {0, 1, 2, 3}, f"ranks {sorted(ranks)} started:\n{out[-3000:]}"
                assert "[rank 0] step 40 loss" in out, f"the job did not finish:\n{out[-3000:]}"
    finally:
        subprocess.run(
            ["k8s-testenv", "down", "--dir", str(cluster_dir)],
            env={**os.environ, "PATH": env["PATH"]},
            timeout=120,
        )
