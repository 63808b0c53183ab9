"""``kubectl-torchrun``'s checks that need no cluster: each refuses with ``error:`` and exit
status 1 (as kubectl) before any request; the kubeconfig names an address nothing listens on,
so a request would fail differently."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from monarch_k8s.torchrun.plugin import job_name, main


@pytest.fixture
def kubeconfig(tmp_path: Path) -> Path:
    config = {
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "k", "cluster": {"server": "https://127.0.0.1:1"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u", "namespace": "team"}}],
    }  # fmt: skip
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(config))
    return path


def plugin(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    kubeconfig: Path,
    *args: str,
    cwd: Path | None = None,
) -> tuple[int, str, str]:
    """Run the plugin in this process: (exit status, stdout, stderr)."""
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    if cwd is not None:
        monkeypatch.chdir(cwd)
    try:
        code = main(list(args))
    except SystemExit as exit:  # usage errors and --help, from argparse
        code = int(exit.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["submit", "--queue", "q", "python train.py"], "give --gpus N"),
        (["submit", "--queue", "q", "--gpus", "3", "--nodes", "2", "x"], "does not split"),
        (["submit", "--queue", "q", "--gpus", "1", " "], "the command is empty"),
        (
            ["submit", "--queue", "q", "--gpus", "1", "--dir", "/nonexistent", "x"],
            "not a directory",
        ),
        (["--context", "other", "list"], 'context "other" does not exist'),
        (["submit", "--gpus", "1", "x"], "--queue"),
        (["nonsense"], "invalid choice"),
    ],
)
def test_refusals_say_what_to_change_and_exit_1(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    kubeconfig: Path,
    args: list[str],
    message: str,
) -> None:
    code, _, err = plugin(capsys, monkeypatch, kubeconfig, *args)
    assert code == 1 and err.startswith("error: ") and message in err, err


def test_a_symlink_leaving_the_workspace_is_refused_before_anything_is_created(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    kubeconfig: Path,
    tmp_path: Path,
) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "escape").symlink_to("/etc")
    args = ("submit", "--queue", "q", "--gpus", "1", "python x.py")
    code, out, err = plugin(capsys, monkeypatch, kubeconfig, *args, cwd=ws)
    assert code == 1 and err.startswith("error: ") and "escape" in err
    assert "created" not in err and out == ""


def test_help_exits_0(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, kubeconfig: Path
) -> None:
    code, out, _ = plugin(capsys, monkeypatch, kubeconfig, "--help")
    assert code == 0 and "kubectl torchrun submit" in out


def test_job_names_are_dns_labels_from_the_folder() -> None:
    name = job_name(Path("/home/me/My_Project.v2"))
    assert name.startswith("my-project-v2-") and len(name) == len("my-project-v2-") + 6
    assert job_name(Path("/")).startswith("job-")
