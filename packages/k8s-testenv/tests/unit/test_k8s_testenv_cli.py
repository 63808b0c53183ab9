"""The CLI's contract: help, and a clear non-zero exit naming the missing tool."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from k8s_testenv import build, cli
from k8s_testenv.build import find_go
from k8s_testenv.exceptions import MissingToolError

TOOLS = Path(build.__file__).resolve().parents[4] / "tools" / "k8s-testenv"


@pytest.fixture
def no_go(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A checkout of the Go module with no binaries built, on a machine without Go."""
    tools = tmp_path / "tools"
    shutil.copytree(TOOLS, tools, ignore=shutil.ignore_patterns("bin"))
    monkeypatch.setenv("K8S_TESTENV_TOOLS_DIR", str(tools))
    monkeypatch.delenv("K8S_TESTENV_BIN_DIR", raising=False)
    monkeypatch.delenv("GO", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(build, "GO_FALLBACKS", ())
    return tools


def test_help_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert all(command in out for command in ("build", "up", "down"))


def test_missing_go_is_named(no_go: Path) -> None:
    with pytest.raises(MissingToolError) as err:
        find_go()
    assert err.value.tool == "go"


@pytest.mark.parametrize("command", [["build"], ["up", "--nodes", "1"]])
def test_cli_exits_non_zero_naming_go_when_it_is_missing(
    no_go: Path, tmp_path: Path, command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    if command[0] == "up":
        command += ["--dir", str(tmp_path / "cluster")]
    assert cli.main(command) == 2
    err = capsys.readouterr().err
    assert "needs `go`, which was not found" in err


@pytest.mark.parametrize(("present", "missing"), [((), "etcd"), (("etcd",), "etcd-v2")])
def test_prebuilt_binary_folder_without_an_etcd_names_it(
    present: tuple[str, ...],
    missing: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name in (*build.KUBE_COMPONENTS, *present):
        (tmp_path / name).write_text("#!/bin/sh\n")
        (tmp_path / name).chmod(0o755)
    monkeypatch.setenv("K8S_TESTENV_BIN_DIR", str(tmp_path))
    monkeypatch.delenv("K8S_TESTENV_ETCD", raising=False)
    assert cli.main(["up", "--dir", str(tmp_path / "cluster")]) == 2
    assert f"needs `{missing}`" in capsys.readouterr().err


def test_down_without_a_cluster_is_a_no_op(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["down", "--dir", str(tmp_path)]) == 0
    assert "no cluster" in capsys.readouterr().out


def test_fingerprint_covers_every_go_file_under_cmd(no_go: Path) -> None:
    before = build._fingerprint(no_go)
    helper = no_go / "cmd" / "kubelet-streaming" / "runtime.go"
    helper.write_text(helper.read_text() + "\n// changed\n")
    assert build._fingerprint(no_go) != before


def test_fingerprint_covers_the_etcd_v2_module(no_go: Path) -> None:
    before = build._fingerprint(no_go)
    mod = no_go / "etcd-v2" / "go.mod"
    mod.write_text(mod.read_text().replace("v3.5.21", "v3.5.22"))
    assert build._fingerprint(no_go) != before
