"""The inner loop: edit code on the laptop, see it running in every actor.

    python benchmarks/iteration.py [--hosts 16] [--runs 5] [--json FILE]

Starts N worker hosts (each with a monarch-sync agent) and a gateway on this machine, spawns one
actor per host from a synced module, then repeatedly edits that module and times
edit -> sync (differential push to every host) -> hot reload (in every actor process) -> call
(every actor answers with the new code). Prints each phase's median and saves JSON.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from results import save_json

from monarch_gateway.local import start_local

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
    with start_local(hosts=args.hosts, sync=True, stream_output=False) as job:
        startup_s = time.perf_counter() - started
        first = job.sync(str(workspace))
        procs = job.hosts.spawn_procs(per_host={"procs": 1})
        model = procs.spawn("model", "iterpkg.model:Model")
        assert set(model.version.call().get(timeout=120).values()) == {0}
        phases: dict[str, list[float]] = {"sync_s": [], "reload_s": [], "call_s": [], "total_s": []}
        for version in range(1, args.runs + 1):
            t0 = time.perf_counter()
            write_workspace(workspace, version, args.files)
            result = job.sync(str(workspace))
            t1 = time.perf_counter()
            values = set(model.version.call().get(timeout=120).values())
            t2 = time.perf_counter()
            assert values == {version}, values
            assert result.changed == ["iterpkg/model.py"]
            phases["sync_s"].append(result.push_s)
            phases["reload_s"].append(result.reload_s)
            phases["call_s"].append(t2 - t1)
            phases["total_s"].append(t2 - t0)
    figures = {
        "hosts": args.hosts,
        "files": args.files + 2,
        "runs": args.runs,
        "startup_s": startup_s,
        "first_sync_s": first.push_s,
        **{f"median_{k}": statistics.median(v) for k, v in phases.items()},
        "runs_detail": phases,
    }
    print(
        f"{args.hosts} worker hosts, {args.files + 2} files; cluster start {startup_s:.1f} s, "
        f"first full sync {first.push_s:.2f} s"
    )
    print(f"{'phase':22s} {'median':>8s}  runs")
    for key, values in phases.items():
        print(
            f"{key:22s} {statistics.median(values):8.3f}  " + " ".join(f"{v:.3f}" for v in values)
        )
    print("edit -> sync -> reload -> call (total_s) is the figure to watch; target ~1 s")
    if args.json:
        save_json(args.json, figures)


if __name__ == "__main__":
    main()
