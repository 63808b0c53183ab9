"""The inner loop: edit code on the laptop, see it running in every actor.

    python benchmarks/iteration.py [--hosts 16] [--runs 5] [--json FILE]

Starts N worker hosts (each with a monarch-sync agent) and a gateway on this machine, spawns one
actor per host from a synced module, then repeatedly edits that module and times
edit -> sync (differential push to every host) -> hot reload (in every actor process) -> call
(every actor answers with the new code). Edits alternate between the two ways a push can go:
through the gateway's ``/sync`` endpoint (the default, as from a laptop outside the cluster) and
directly to every agent (the baseline); each phase's median is printed per way, and saved as
JSON (``gateway_edit_push_s`` / ``direct_edit_push_s`` keyed by the number of hosts).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from results import save_json

from monarch_gateway.local import LocalCluster

MODULE = """
from monarch.actor import Actor, endpoint

class Model(Actor):
    @endpoint
    def version(self):
        return {version}
"""


def write_workspace(root: Path, version: int, filler_files: int) -> None:
    pkg = root / "iterpkg"
    pkg.mkdir(exist_ok=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "model.py").write_text(MODULE.format(version=version))
    data = root / "data"
    data.mkdir(exist_ok=True)
    for i in range(filler_files):  # an unchanged bulk that a differential sync skips
        path = data / f"f{i}.py"
        if not path.exists():
            path.write_text(f"X = {i}\n" * 200)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=16)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--files", type=int, default=500, help="unchanged files in the tree")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    workspace = Path(tempfile.mkdtemp(prefix="iteration-"))
    write_workspace(workspace, 0, args.files)
    started = time.perf_counter()
    with LocalCluster(args.hosts, sync=True, stream_output=False).start() as cluster:
        job = cluster.connect()
        startup_s = time.perf_counter() - started
        ways = {"gateway": cluster.workspace(), "direct": cluster.direct_workspace()}
        job.workspace = ways["gateway"]
        first = job.sync(str(workspace))
        ways["direct"].push(str(workspace))  # both remember the same last version
        procs = job.hosts.spawn_procs(per_host={"procs": 1})
        model = procs.spawn("model", "iterpkg.model:Model")
        assert set(model.version.call().get(timeout=120).values()) == {0}
        phases: dict[str, dict[str, list[float]]] = {
            way: {"sync_s": [], "reload_s": [], "call_s": [], "total_s": []} for way in ways
        }
        for version in range(1, 2 * args.runs + 1):
            way = "gateway" if version % 2 else "direct"  # interleaved: same conditions
            job.workspace = ways[way]
            t0 = time.perf_counter()
            write_workspace(workspace, version, args.files)
            result = job.sync(str(workspace))
            t1 = time.perf_counter()
            values = set(model.version.call().get(timeout=120).values())
            t2 = time.perf_counter()
            assert values == {version}, values
            assert result.changed == ["iterpkg/model.py"], result.changed
            phases[way]["sync_s"].append(result.push_s)
            phases[way]["reload_s"].append(result.reload_s)
            phases[way]["call_s"].append(t2 - t1)
            phases[way]["total_s"].append(t2 - t0)
        job.close()
    medians = {w: {k: statistics.median(v) for k, v in p.items()} for w, p in phases.items()}
    hosts = str(args.hosts)
    ratio = medians["gateway"]["sync_s"] / medians["direct"]["sync_s"]
    figures = {
        "hosts": args.hosts,
        "files": args.files + 2,
        "runs": args.runs,
        "ratio_gateway_vs_direct_edit_push": {hosts: ratio},
        "gateway_edit_push_s": {hosts: medians["gateway"]["sync_s"]},
        "direct_edit_push_s": {hosts: medians["direct"]["sync_s"]},
        "startup_s": startup_s,
        "first_sync_s": first.push_s,
        **{f"median_{k}": v for k, v in medians["gateway"].items()},
        **{f"direct_median_{k}": v for k, v in medians["direct"].items()},
        "runs_detail": phases,
    }
    print(
        f"{args.hosts} worker hosts, {args.files + 2} files; cluster start {startup_s:.1f} s, "
        f"first full sync {first.push_s:.2f} s"
    )
    print(f"edit push through the gateway / direct: {ratio:.2f}x (target <= 1.15x)")
    for way in ways:
        print(f"{way + ': phase':22s} {'median':>8s}  runs")
        for key, values in phases[way].items():
            print(f"{key:22s} {medians[way][key]:8.3f}  " + " ".join(f"{v:.3f}" for v in values))
    print("edit -> sync -> reload -> call (total_s, through the gateway): target < 0.5 s")
    if args.json:
        save_json(args.json, figures)


if __name__ == "__main__":
    main()
