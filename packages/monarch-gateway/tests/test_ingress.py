"""One ingress for everything: workspace pushes enter through the gateway's URL and token, and
the agent beside the gateway fans out to worker agents the laptop never dials."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from tcp_relay import TcpRelay

from monarch_gateway.local import LocalCluster
from monarch_sync import Store, push

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def sync_cluster() -> Iterator[LocalCluster]:
    with LocalCluster(2, sync=True, stream_output=False).start() as c:
        yield c


def live_roots(cluster: LocalCluster) -> set[str | None]:
    """The version every agent (workers' and the gateway's) has switched to."""
    return {Store(cluster.sync_root(i)).current_hash() for i in range(cluster.hosts + 1)}


def test_a_wrong_token_is_refused_before_any_byte_reaches_the_agent(tmp_path: Path) -> None:
    accepted: list[socket.socket] = []
    listener = socket.create_server(("127.0.0.1", 0))
    agent = f"127.0.0.1:{listener.getsockname()[1]}"
    threading.Thread(target=lambda: accepted.append(listener.accept()[0]), daemon=True).start()
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.py").write_text("A = 1\n")
    with LocalCluster(1, gateway_args=["--sync-agent", agent]).start() as cluster:
        report = asyncio.run(
            push(tmp_path / "src", [], "wrong", gateway=cluster.url, cache_dir=tmp_path / "c")
        )
        assert not report.ok
        assert "refused the token" in str(report.nodes[0].error)
        assert accepted == []  # the agent never saw a connection
        # The right token is relayed to the agent (which here is a silent socket).
        asyncio.run(
            push(
                tmp_path / "src", [], cluster.token, gateway=cluster.url,
                cache_dir=tmp_path / "c", stall_timeout=1.0,
            )
        )  # fmt: skip
        assert len(accepted) == 1
    listener.close()


def test_a_gateway_without_sync_says_how_to_enable_it(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("A = 1\n")
    with LocalCluster(1).start() as cluster:
        report = asyncio.run(
            push(tmp_path, [], cluster.token, gateway=cluster.url, cache_dir=tmp_path / "c")
        )
    assert "HTTP 404" in str(report.nodes[0].error)
    assert "--sync-agent" in str(report.nodes[0].error)


def test_a_dropped_tunnel_resumes_and_resends_only_what_agents_lack(
    sync_cluster: LocalCluster, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "big.bin").write_bytes(random.Random(7).randbytes(24 * MiB))
    handed, dropped = 0, False
    with TcpRelay(sync_cluster.url) as relay:

        def drop_once(peer: str, n: int) -> float:
            """Hand bytes over at 40 MB/s, below what the tree takes, so little is in flight
            (buffered along the path) when the tunnel drops, after 16 MiB."""
            nonlocal handed, dropped
            handed += n
            if handed > 16 * MiB and not dropped:
                dropped = True
                relay.drop_all()
            return n / 40e6

        report = asyncio.run(
            push(
                src, [], sync_cluster.token, gateway=relay.url, pace=drop_once,
                cache_dir=tmp_path / "c",
            )
        )  # fmt: skip
    assert report.ok, report.format()
    gateway = next(n for n in report.nodes if n.peer == "gateway")
    assert dropped and gateway.reconnects >= 1 and relay.accepted >= 2
    assert len(report.nodes) == 3  # the gateway's agent and both workers' agents
    # Starting over would resend the 16 MiB handed before the drop; resuming resends only what
    # was still in flight (socket and WebSocket buffers along the path), which the agent lacks.
    assert report.client_bytes - report.tree_bytes < 8 * MiB, report.client_bytes
    assert live_roots(sync_cluster) == {report.root_hash}


def test_a_worker_agent_killed_mid_push_is_named_and_the_rest_finish(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "big.bin").write_bytes(random.Random(3).randbytes(24 * MiB))
    handed, killed = 0, False
    with LocalCluster(2, sync=True, stream_output=False).start() as cluster:
        victim = cluster.sync_peers[1]

        def kill_once(peer: str, n: int) -> float:
            nonlocal handed, killed
            handed += n
            if handed > 8 * MiB and not killed:
                killed = True
                os.killpg(cluster.agents[1].pid, signal.SIGKILL)
            return 0.0

        report = asyncio.run(
            push(
                src, [], cluster.token, gateway=cluster.url, pace=kill_once,
                cache_dir=tmp_path / "c",
            )
        )  # fmt: skip
    nodes = {n.peer: n for n in report.nodes}
    assert killed and set(nodes) == {"gateway", *cluster.sync_peers[:2]}
    assert not nodes[victim].ok and nodes[victim].error
    assert all(n.ok for peer, n in nodes.items() if peer != victim), report.format()


def test_two_laptops_pushing_at_once_are_serialized_never_mixed(
    sync_cluster: LocalCluster, tmp_path: Path
) -> None:
    trees = []
    for name in ("one", "two"):
        src = tmp_path / name
        src.mkdir()
        (src / "who.txt").write_text(name)
        (src / f"{name}.bin").write_bytes(random.Random(name).randbytes(4 * MiB))
        trees.append(src)

    async def both() -> list:  # type: ignore[type-arg]
        return await asyncio.gather(
            *(
                push(
                    src,
                    [],
                    sync_cluster.token,
                    gateway=sync_cluster.url,
                    cache_dir=src.with_suffix(".c"),
                )
                for src in trees
            )
        )

    reports = asyncio.run(both())
    assert all(r.ok for r in reports), [r.format() for r in reports]
    # Every agent holds one of the two versions, the same one, whole.
    roots = live_roots(sync_cluster)
    assert len(roots) == 1 and roots <= {r.root_hash for r in reports}
    live = Path(os.path.realpath(sync_cluster.sync_root(0) / "current"))
    names = sorted(p.name for p in live.iterdir())
    assert names in (["one.bin", "who.txt"], ["two.bin", "who.txt"])
    assert (live / "who.txt").read_text() + ".bin" == names[0]


CLIENT = """
import socket, sys, textwrap
from pathlib import Path

gateway = sys.argv[1].rsplit("/", 1)[-1].split(":")
allowed = (gateway[0], int(gateway[1]))

def forbid_other_addresses(event, args):
    # The laptop may reach the gateway, and nothing else (no worker, no agent).
    if event == "socket.connect" and isinstance(args[1], tuple) and args[1][:2] != allowed:
        raise PermissionError(f"laptop tried to reach {args[1]}")

sys.addaudithook(forbid_other_addresses)
import monarch_proxy

src = Path(sys.argv[3])
(src / "laptoppkg").mkdir()
(src / "laptoppkg" / "__init__.py").write_text("")
MODEL = '''
from monarch.actor import Actor, endpoint
class Model(Actor):
    @endpoint
    def version(self):
        return {v}
'''
(src / "laptoppkg" / "model.py").write_text(MODEL.format(v=1))
job = monarch_proxy.connect(sys.argv[1], sys.argv[2])
first = job.sync(str(src))  # found lazily: monarch-sync through the gateway's /sync
model = job.hosts.spawn_procs(per_host={"procs": 1}).spawn("m", "laptoppkg.model:Model")
print("v1", sorted(model.version.call().get(timeout=120).values()))
(src / "laptoppkg" / "model.py").write_text(MODEL.format(v=22))
second = job.sync(str(src))
print("changed", second.changed, second.reloaded)
print("v2", sorted(model.version.call().get(timeout=120).values()))
print("nodes", sorted(n.peer for n in job.workspace.last_report.nodes))
job.close()
"""


def test_laptop_that_reaches_only_the_gateway_syncs_and_hot_reloads(tmp_path: Path) -> None:
    """`monarch-gateway local --sync` in its own process, its URL and token read from a pipe;
    the laptop process is forbidden (audit hook) from connecting anywhere but the gateway."""
    (tmp_path / "client.py").write_text(CLIENT)
    (tmp_path / "src").mkdir()
    local = subprocess.Popen(
        [sys.executable, "-m", "monarch_gateway", "local", "--hosts", "2", "--sync"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert local.stdout is not None
        lines = dict(local.stdout.readline().split(":", 1) for _ in range(2))
        url, token = lines["gateway"].strip(), lines["token"].strip()
        env = {**os.environ, "MONARCH_EVENT_LOOP": "asyncio"}  # every connect is audited
        out = subprocess.run(
            [sys.executable, str(tmp_path / "client.py"), url, token, str(tmp_path / "src")],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
            cwd=tmp_path,
        )
    finally:
        local.terminate()
        local.wait(timeout=60)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "v1 [1, 1]" in out.stdout
    assert "changed ['laptoppkg/model.py'] {'laptoppkg.model': 2}" in out.stdout
    assert "v2 [22, 22]" in out.stdout
    nodes = next(line for line in out.stdout.splitlines() if line.startswith("nodes"))
    assert nodes.count("127.0.0.") == 2 and "gateway" in nodes  # fanned out by the gateway
