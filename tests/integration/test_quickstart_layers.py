"""Packages composed: the proxy alone drives a gateway started from the gateway package."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quickstart_prints_results_from_every_worker():
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py"), "--hosts", "3"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    answers = [line for line in out.splitlines() if "hello laptop from" in line]
    assert len(answers) == 6  # 3 hosts x 2 procs, each with its coordinates
    assert {line[: line.index("}") + 1] for line in answers} == {
        str({"hosts": h, "gpus": g}) for h in range(3) for g in range(2)
    }
    assert "6 actors answered on 3 worker hosts" in out
    assert out.count("greeting laptop") == 6  # worker stdout streamed back to this process


def test_proxy_client_runs_without_monarch_importable(tmp_path):
    """A client process that cannot import monarch still drives the real mesh."""
    script = tmp_path / "client.py"
    script.write_text(
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'monarch' or name.startswith('monarch.'):\n"
        "            raise ImportError('monarch is blocked in this client')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import monarch_proxy\n"
        "job = monarch_proxy.connect(sys.argv[1], sys.argv[2])\n"
        "procs = job.hosts.spawn_procs(per_host={'gpus': 2})\n"
        "mesh = procs.spawn('w', 'monarch_gateway_testing_actors:Pinger')\n"
        "print(sorted(mesh.ping.call().get(timeout=60).values()))\n"
        "job.close()\n"
    )
    (tmp_path / "monarch_gateway_testing_actors.py").write_text(
        "from monarch.actor import Actor, endpoint, current_rank\n"
        "class Pinger(Actor):\n"
        "    @endpoint\n"
        "    def ping(self):\n"
        "        return current_rank().rank\n"
    )
    sys.path.insert(0, str(tmp_path))  # the workers and gateway import the actor module by name
    try:
        from monarch_gateway.local import LocalCluster

        with LocalCluster(2).start() as cluster:
            out = subprocess.run(
                [sys.executable, str(script), cluster.url, cluster.token],
                capture_output=True,
                text=True,
                timeout=300,
                cwd=tmp_path,
            )
    finally:
        sys.path.remove(str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[0, 1, 2, 3]"
