"""MonarchMesh from a laptop: KubernetesJob.state() to actors answering, the edit loop through a
port-forward, and the operator's reconcile latency, on a k8s-testenv cluster.

    python benchmarks/monarchmesh.py [--replicas 1,8,32] [--iteration-replicas 8] [--json FILE]

For each size N: a KubernetesJob with N replicas (a gateway and a sync agent per worker, made
by the operator running as a pod from the install manifests) is timed from ``state()`` through
its phases: API objects created, pods Running, pods Ready (workers listening), workers
attached to the gateway (reached through a port-forward made with the Python client), and the
first call (spawn one actor per host and call it). Baseline, same run: the local default
(``start_local(hosts=N)``: N worker processes and a gateway on this machine, no Kubernetes) to
its first answer. Then edit -> sync -> reload -> call through the port-forward on
``--iteration-replicas`` hosts (median of ``--runs``), and the reconcile latency (spec change to
StatefulSet updated) from ``monarch_k8s.testing.reconcile_latency``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from results import save_json

# benchmarks/k8s_testenv.py shares its name with the package: drop this folder from sys.path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from k8s_testenv import start_cluster  # noqa: E402

from monarch_gateway.local import start_local  # noqa: E402
from monarch_k8s import KubernetesJob, MeshSpec  # noqa: E402
from monarch_k8s.testing import install_with_kubectl, reconcile_latency  # noqa: E402

MODULE = """
from monarch.actor import Actor, endpoint

class Model(Actor):
    @endpoint
    def version(self):
        return {version}
"""


def write_module(root: Path, version: int) -> None:
    (root / "benchpkg").mkdir(parents=True, exist_ok=True)
    (root / "benchpkg" / "__init__.py").write_text("")
    (root / "benchpkg" / "model.py").write_text(MODULE.format(version=version))


def first_call(host_mesh: Any, hosts: int) -> Any:
    model = host_mesh.spawn_procs(per_host={"procs": 1}).spawn("m", "benchpkg.model:Model")
    values = model.version.call().get(timeout=600).values()
    assert len(list(values)) == hosts
    return model


def namespace(api: Any, name: str) -> str:
    import kubernetes.client as k8s

    core = k8s.CoreV1Api(api)
    core.create_namespace({"metadata": {"name": name}})
    for _ in range(300):
        try:
            core.read_namespaced_service_account("default", name)
            return name
        except k8s.ApiException:
            time.sleep(0.1)
    raise TimeoutError(f"namespace {name} has no default ServiceAccount")


def time_job(
    api: Any, ns: str, replicas: int, src: Path, runs: int, iterate: bool
) -> dict[str, Any]:
    job = KubernetesJob(
        compute=MeshSpec(replicas=replicas), namespace=ns, api_client=api,
        sync_dirs=[str(src)], timeout=1800, log=None,
    )  # fmt: skip
    started = time.perf_counter()
    try:
        state = job.state()
        model = first_call(state.workers, replicas)
        figures: dict[str, Any] = {**job.timings, "first_call": time.perf_counter() - started}
        if iterate:
            loops = []
            for version in range(1, runs + 1):
                write_module(src, version)
                t0 = time.perf_counter()
                job.sync()
                answers = set(model.version.call().get(timeout=120).values())
                loops.append(time.perf_counter() - t0)
                assert answers == {version}, answers
            figures["iteration_s"] = statistics.median(loops)
    finally:
        job.kill(timeout=600)
        write_module(src, 0)
    return figures


def time_local(hosts: int, src: Path) -> float:
    started = time.perf_counter()
    with start_local(hosts=hosts, sync=True, stream_output=False) as job:
        job.sync(str(src))
        first_call(job.hosts, hosts)
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", default="1,8,32", help="comma-separated mesh sizes")
    parser.add_argument("--iteration-replicas", type=int, default=8)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--reconcile-samples", type=int, default=30)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    sizes = [int(n) for n in args.replicas.split(",")]
    src = Path(tempfile.mkdtemp(prefix="monarchmesh-bench-"))
    write_module(src, 0)

    cluster = start_cluster()
    try:
        install_with_kubectl(cluster)
        api = cluster.api_client()
        phases: dict[int, dict[str, Any]] = {}
        time_job(api, namespace(api, "warmup"), 1, src, 0, iterate=False)  # warm caches, unrecorded
        for n in sorted(set(sizes) | {args.iteration_replicas}):
            ns = namespace(api, f"bench{n}")
            phases[n] = time_job(api, ns, n, src, args.runs, iterate=n == args.iteration_replicas)
            line = ", ".join(f"{k} {v:.2f}" for k, v in phases[n].items())
            print(f"{n} replicas: {line}", flush=True)
        reconcile = reconcile_latency(
            api, namespace(api, "benchreconcile"), samples=args.reconcile_samples
        )
    finally:
        cluster.stop()
    local = {n: time_local(n, src) for n in sizes}

    state_to_answer = {n: round(phases[n]["first_call"], 3) for n in sizes}
    figures = {
        "state_to_answer_s": state_to_answer,
        "local_state_to_answer_s": {n: round(s, 3) for n, s in local.items()},
        "phases_s": {n: {k: round(v, 3) for k, v in p.items()} for n, p in phases.items()},
        "iteration_s": round(phases[args.iteration_replicas]["iteration_s"], 3),
        "iteration_replicas": args.iteration_replicas,
        "reconcile_p50_ms": round(reconcile["reconcile_p50_ms"], 1),
        "reconcile_p99_ms": round(reconcile["reconcile_p99_ms"], 1),
    }
    for n in sizes:
        print(
            f"state() -> answer, {n} replicas: {state_to_answer[n] / local[n]:.1f}x the local "
            f"default ({state_to_answer[n]:.2f} s vs {local[n]:.2f} s); phases "
            + ", ".join(f"{k} {v:.2f}" for k, v in phases[n].items() if k != "iteration_s")
        )
    print(
        f"edit -> sync -> reload -> call through the port-forward, "
        f"{args.iteration_replicas} replicas: {figures['iteration_s']:.3f} s (median of {args.runs})"
    )
    print(
        f"reconcile latency: p50 {figures['reconcile_p50_ms']} ms, p99 {figures['reconcile_p99_ms']} ms"
    )
    if args.json:
        save_json(args.json, figures)


if __name__ == "__main__":
    main()
