"""Gateway overhead against calling torchmonarch directly, on the same worker processes.

    python benchmarks/gateway.py [--quick] [--json FILE] [--hosts 2]
    python benchmarks/gateway.py --compare-with main [--rounds 3] [--json FILE]

Measures, for the direct path (this process attaches to the workers with attach_to_workers)
and the proxy path (monarch-proxy -> gateway process -> the same workers):
- p50 and p99 latency of ``call_one`` on a small value;
- calls per second with 64 calls in flight;
- MB/s of a 64 MiB payload round trip (echoed back; MB = 10^6 bytes of payload / round trip);
- p50 of a chained one-liner, ``hosts.spawn_procs().spawn("c", Echo).echo.call(1).get()``
  (its intermediate meshes are garbage at once: new processes, so milliseconds to seconds);
- p50 of ``call_one`` on an actor that is passed an actor mesh and calls it.
Each figure is the median of several runs; the table shows proxy/direct ratios.

``--compare-with REF`` measures the proxy path of another commit (checked out in a temporary
git worktree; its monarch-proxy and monarch-gateway put first on the import path of the client
and the gateway) against this tree, in the same run: the two alternate, round after round, and
the medians are compared (after/before ratios first).

The gateway and the workers keep freed memory for reuse (see monarch_proxy.memory); this
process does too, so the direct path and the proxy client get the same treatment.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from bench_actors import Echo, Forward
from results import save_json

from monarch_gateway.local import LocalCluster
from monarch_proxy import keep_freed_memory

PAYLOAD = 64 * 1024 * 1024
WINDOW = 64


def latencies(call: Callable[[], Any], n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        call()
        out.append(time.perf_counter() - start)
    return out


def throughput(submit: Callable[[], Any], wait: Callable[[Any], Any], n: int) -> float:
    """Calls per second with WINDOW calls in flight at all times."""
    window: collections.deque[Any] = collections.deque()
    start = time.perf_counter()
    for _ in range(n):
        if len(window) == WINDOW:
            wait(window.popleft())
        window.append(submit())
    while window:
        wait(window.popleft())
    return n / (time.perf_counter() - start)


def bulk(echo: Callable[[bytes], bytes], runs: int) -> float:
    blob = b"\x5a" * PAYLOAD
    rates = []
    for _ in range(runs):
        start = time.perf_counter()
        back = echo(blob)
        rates.append(PAYLOAD / 1e6 / (time.perf_counter() - start))
        assert len(back) == PAYLOAD
    return statistics.median(rates)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(
    name: str,
    one: Any,
    mesh_call_one: Callable[[Any], Any],
    wait: Callable[[Any], Any],
    args: argparse.Namespace,
    hosts: Any = None,
    procs: Any = None,
) -> dict[str, float]:
    def call() -> Any:
        return wait(mesh_call_one(1))

    latencies(call, 50)  # warm up
    p50s, p99s, rates = [], [], []
    for _ in range(args.repeats):
        lat = latencies(call, args.calls)
        p50s.append(percentile(lat, 0.5) * 1e3)
        p99s.append(percentile(lat, 0.99) * 1e3)
        rates.append(throughput(lambda: mesh_call_one(1), wait, args.calls * 4))
    mb_s = bulk(lambda blob: wait(mesh_call_one(blob)), args.bulk_runs)
    result = {
        "p50_ms": statistics.median(p50s),
        "p99_ms": statistics.median(p99s),
        "calls_per_s": statistics.median(rates),
        "mb_s": mb_s,
    }
    if hosts is not None and procs is not None:
        try:  # a proxy from before issue 11 fails both (handle race; meshes not picklable)
            result["chained_p50_ms"] = chained_p50_ms(hosts, args)
            forward = procs.spawn("forward", Forward).slice(hosts=0, gpus=0)
            lat = latencies(lambda: forward.forward.call_one(one, 1).get(), args.calls // 10)
            result["mesh_arg_p50_ms"] = percentile(lat, 0.5) * 1e3
        except Exception as exc:
            print(f"  {name}: chained / mesh-argument lines failed: {exc!r}", flush=True)
    print(
        f"  {name:6s} p50 {result['p50_ms']:.3f} ms  p99 {result['p99_ms']:.3f} ms  "
        f"{result['calls_per_s']:.0f} calls/s  {mb_s:.0f} MB/s  "
        f"chained {result.get('chained_p50_ms', 0):.0f} ms  "
        f"mesh arg {result.get('mesh_arg_p50_ms', 0):.3f} ms",
        flush=True,
    )
    return result


def chained_p50_ms(hosts: Any, args: argparse.Namespace) -> float:
    """``hosts.spawn_procs().spawn().echo.call()``; its processes are stopped untimed."""
    times = []
    for _ in range(args.chains):
        start = time.perf_counter()
        procs = hosts.spawn_procs(per_host={"gpus": 1})
        procs.spawn("c", Echo).echo.call(1).get()
        times.append(time.perf_counter() - start)
        procs.stop().get()
    return percentile(times, 0.5) * 1e3


def direct_path(cluster: LocalCluster, args: argparse.Namespace) -> dict[str, float]:
    from monarch.actor import attach_to_workers

    from monarch_gateway.app import configure_monarch

    configure_monarch(cluster.addresses, stream_output=False)
    hosts = attach_to_workers(workers=cluster.addresses, ca="trust_all_connections", name="direct")
    hosts.initialized.get()
    procs = hosts.spawn_procs(per_host={"gpus": 1})
    one = procs.spawn("echo", Echo).slice(hosts=0, gpus=0)
    return measure("direct", one, one.echo.call_one, lambda f: f.get(), args, hosts, procs)


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proxy_path(cluster: LocalCluster, args: argparse.Namespace) -> dict[str, float]:
    with cluster.connect() as job:
        procs = job.hosts.spawn_procs(per_host={"gpus": 1})
        one = procs.spawn("echo", Echo).slice(hosts=0, gpus=0)
        result = measure("proxy", one, one.echo.call_one, lambda f: f.get(), args, job.hosts, procs)
        # CPU per call of the gateway and of this client: steadier than calls/s on a busy
        # machine, since other processes' load does not count.
        assert cluster.gateway is not None
        n = args.calls * 8
        gateway0, client0 = process_cpu_s(cluster.gateway.pid), time.process_time()
        throughput(lambda: one.echo.call_one(1), lambda f: f.get(), n)
        result["gateway_cpu_us_per_call"] = (
            (process_cpu_s(cluster.gateway.pid) - gateway0) / n * 1e6
        )
        result["client_cpu_us_per_call"] = (time.process_time() - client0) / n * 1e6
        print(
            f"  CPU per call: gateway {result['gateway_cpu_us_per_call']:.0f} us, "
            f"client {result['client_cpu_us_per_call']:.0f} us",
            flush=True,
        )
        return result


ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("packages/monarch-proxy/src", "packages/monarch-gateway/src")


def run_proxy_only(tree: Path, args: argparse.Namespace) -> dict[str, float]:
    """One ``--proxy-only`` run in a child process importing the proxy and gateway of ``tree``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [*(str(tree / s) for s in SOURCES), env.get("PYTHONPATH", "")]
    )
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "proxy.json"
        argv = [sys.executable, __file__, "--proxy-only", "--json", str(out)]
        argv += ["--hosts", str(args.hosts)] + (["--quick"] if args.quick else [])
        subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL)
        return dict(json.loads(out.read_text()))


def compare(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="gateway-bench-") as tmp:
        before_tree = Path(tmp) / "before"
        git = ["git", "-C", str(ROOT)]
        subprocess.run(
            [*git, "worktree", "add", "--detach", str(before_tree), args.compare_with],
            check=True,
            capture_output=True,
        )
        runs: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
        try:
            for round_ in range(args.rounds):
                order = [("before", before_tree), ("after", ROOT)]
                for label, tree in order if round_ % 2 == 0 else order[::-1]:  # interleaved
                    runs[label].append(run_proxy_only(tree, args))
                    print(f"round {round_ + 1} {label}: {runs[label][-1]}", flush=True)
        finally:
            subprocess.run([*git, "worktree", "remove", "--force", str(before_tree)], check=False)
    keys: tuple[str, ...] = (
        "gateway_cpu_us_per_call",
        "client_cpu_us_per_call",
        "calls_per_s",
        "p50_ms",
        "p99_ms",
        "mb_s",
    )
    keys += tuple(
        k
        for k in ("chained_p50_ms", "mesh_arg_p50_ms")
        if all(k in r for rs in runs.values() for r in rs)
    )
    medians = {
        label: {k: statistics.median(r[k] for r in results) for k in keys}
        for label, results in runs.items()
    }
    ratios = {k: medians["after"][k] / medians["before"][k] for k in keys}
    print(f"\n{'metric':24s} {'after/before':>12s} {'before':>10s} {'after':>10s}")
    for k in keys:
        print(f"{k:24s} {ratios[k]:12.3f} {medians['before'][k]:10.3f} {medians['after'][k]:10.3f}")
    if args.json:
        save_json(
            args.json,
            {
                "ratios_after_over_before": ratios,
                "before": medians["before"],
                "after": medians["after"],
                "before_ref": args.compare_with,
                "runs": runs,
                "config": {"quick": args.quick, "rounds": args.rounds, "hosts": args.hosts},
            },
        )


def main() -> None:
    keep_freed_memory()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls; under a minute")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--hosts", type=int, default=2)
    parser.add_argument("--proxy-only", action="store_true", help="measure the proxy path only")
    parser.add_argument("--compare-with", metavar="REF", help="git ref to compare this tree with")
    parser.add_argument("--rounds", type=int, default=3, help="before/after pairs to run")
    args = parser.parse_args()
    args.calls = 300 if args.quick else 1000
    args.repeats = 3 if args.quick else 5
    args.bulk_runs = 3 if args.quick else 7
    args.chains = 3 if args.quick else 7
    if args.compare_with:
        compare(args)
        return

    with LocalCluster(args.hosts, stream_output=False).start() as cluster:
        print(f"workers: {cluster.addresses}", flush=True)
        proxy = proxy_path(cluster, args)
        if args.proxy_only:
            if args.json:
                save_json(args.json, proxy)
            return
        direct = direct_path(cluster, args)

    figures: dict[str, Any] = {
        "direct_p50_ms": direct["p50_ms"],
        "proxy_p50_ms": proxy["p50_ms"],
        "added_p50_ms": proxy["p50_ms"] - direct["p50_ms"],
        "direct_p99_ms": direct["p99_ms"],
        "proxy_p99_ms": proxy["p99_ms"],
        "direct_calls_per_s": direct["calls_per_s"],
        "proxy_calls_per_s": proxy["calls_per_s"],
        "calls_per_s_ratio": proxy["calls_per_s"] / direct["calls_per_s"],
        "direct_mb_s": direct["mb_s"],
        "proxy_mb_s": proxy["mb_s"],
        "mb_s_ratio": proxy["mb_s"] / direct["mb_s"],
        "direct_chained_p50_ms": direct["chained_p50_ms"],
        "proxy_chained_p50_ms": proxy["chained_p50_ms"],
        "direct_mesh_arg_p50_ms": direct["mesh_arg_p50_ms"],
        "proxy_mesh_arg_p50_ms": proxy["mesh_arg_p50_ms"],
        "config": {
            "quick": args.quick,
            "calls": args.calls,
            "repeats": args.repeats,
            "window": WINDOW,
            "payload_bytes": PAYLOAD,
            "hosts": args.hosts,
            "machine": platform.machine(),
            "python": platform.python_version(),
        },
    }
    rows = [
        ("call_one p50 (ms)", direct["p50_ms"], proxy["p50_ms"], "<= direct + 1.0"),
        ("call_one p99 (ms)", direct["p99_ms"], proxy["p99_ms"], ""),
        (f"calls/s, {WINDOW} in flight", direct["calls_per_s"], proxy["calls_per_s"], ">= 3000"),
        ("64 MiB round trip (MB/s)", direct["mb_s"], proxy["mb_s"], ">= 0.5 x direct"),
        ("chained one-liner p50 (ms)", direct["chained_p50_ms"], proxy["chained_p50_ms"], ""),
        ("mesh as argument p50 (ms)", direct["mesh_arg_p50_ms"], proxy["mesh_arg_p50_ms"], ""),
    ]
    print(f"\n{'metric':30s} {'direct':>10s} {'proxy':>10s} {'ratio':>7s}  target")
    for label, d, p, target in rows:
        print(f"{label:30s} {d:10.3f} {p:10.3f} {p / d:7.2f}  {target}")
    print(f"added p50 latency: {figures['added_p50_ms']:.3f} ms")
    if args.json:
        save_json(args.json, figures)


if __name__ == "__main__":
    main()
