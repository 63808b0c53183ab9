"""Agents as real processes: one is killed (or frozen) mid-push; the rest must finish."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sync_helpers import TOKEN, snapshot

from monarch_sync import cli, push


@pytest.fixture
def agent_procs(tmp_path: Path) -> Iterator[list[tuple[subprocess.Popen[str], str, Path]]]:
    procs = []
    for i in range(4):
        root = tmp_path / f"agent{i}"
        p = subprocess.Popen(
            [sys.executable, "-m", "monarch_sync.cli", "agent", "--listen", "127.0.0.1:0",
             "--root", str(root), "--stall-timeout", "2"],
            stdout=subprocess.PIPE, text=True, env={**os.environ, "MONARCH_SYNC_TOKEN": TOKEN},
        )  # fmt: skip
        assert p.stdout is not None
        line = p.stdout.readline()  # "monarch-sync agent listening on HOST:PORT, root ..."
        procs.append((p, line.split(" on ")[1].split(",")[0], root))
    yield procs
    for p, _, _ in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGCONT)
            p.kill()
        p.wait()


def big_workspace(src: Path) -> None:
    src.mkdir()
    (src / "big.bin").write_bytes(random.Random(3).randbytes(24_000_000))
    for i in range(20):
        (src / f"m{i}.py").write_text(f"x = {i}\n")


@pytest.mark.parametrize("how", ["kill", "freeze"])
def test_node_lost_mid_push_children_reattach_and_finish(
    tmp_path: Path, agent_procs: list[tuple[subprocess.Popen[str], str, Path]], how: str
) -> None:
    src = tmp_path / "src"
    big_workspace(src)
    peers = [addr for _, addr, _ in agent_procs]
    victim = agent_procs[1][0]
    sent = 0
    lost = False

    def lose_node_after_a_quarter(peer: str, index: int, data: bytes) -> bytes:
        nonlocal sent, lost
        sent += len(data)
        if sent > 6_000_000 and not lost:
            # Not recorded in victim.returncode: the fixture must still see a stopped agent as
            # running, to continue and kill it.
            victim.send_signal(signal.SIGKILL if how == "kill" else signal.SIGSTOP)
            lost = True
        return data

    # A chain, so the lost node has a live child that must be re-attached to an ancestor.
    report = asyncio.run(
        push(src, peers, TOKEN, fanout=1, fault=lose_node_after_a_quarter,
             cache_dir=tmp_path / "c", stall_timeout=2)
    )  # fmt: skip
    assert [n.peer for n in report.failed] == [peers[1]], (peers, report.format())
    assert report.client_bytes == report.tree_bytes  # orphans were fed by an ancestor, not us
    for i in (0, 2, 3):
        assert snapshot(agent_procs[i][2] / "current") == snapshot(src)
    assert "stalled" in (report.failed[0].error or "") or how == "kill"
    # The orphans were tried again first (it may only have been the connection), then moved.
    assert "reconnect" in (report.failed[0].error or "")
    moved = [(n.peer, n.moved_from, n.moved_reason) for n in report.moved]
    assert moved == [(peers[2], peers[1], "lost"), (peers[3], peers[1], "lost")]
    assert report.nodes[2].parent == peers[0]


def test_cli_push_exit_status_and_report(
    tmp_path: Path,
    agent_procs: list[tuple[subprocess.Popen[str], str, Path]],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.py").write_text("a = 1\n")
    peers_file = tmp_path / "peers"
    peers_file.write_text("\n".join(addr for _, addr, _ in agent_procs[:2]) + "\n# comment\n")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("MONARCH_SYNC_TOKEN", TOKEN)
    code = cli.main(["push", str(src), "--peers-file", str(peers_file)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.count("ok ") == 2
    code = cli.main(
        ["push", str(src), "--to", f"{agent_procs[2][1]},127.0.0.1:1",
         "--json", str(tmp_path / "r.json")]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 1
    assert "FAILED 127.0.0.1:1" in out
    assert (tmp_path / "r.json").exists()
    assert (agent_procs[2][2] / "current" / "a.py").read_text() == "a = 1\n"


def test_read_peers_from_stdin(monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("h1:1, h2:2\nh3:3 # x\n"))
    assert cli.read_peers("h0:0", "-") == ["h0:0", "h1:1", "h2:2", "h3:3"]
    with pytest.raises(ValueError):
        cli.read_peers("nohost", None)


def test_agent_path_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["path", "--root", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "current")
    assert os.environ.get("MONARCH_SYNC_TOKEN") is None or True
