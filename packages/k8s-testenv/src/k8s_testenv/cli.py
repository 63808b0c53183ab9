"""``k8s-testenv``: build the control plane, bring a cluster up, tear it down."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from k8s_testenv import procs
from k8s_testenv.build import KUBE_VERSION, build_binaries
from k8s_testenv.cluster import STATE_FILE, start_cluster, stop_cluster
from k8s_testenv.exceptions import K8sTestenvError, MissingToolError
from k8s_testenv.kubelet.agent import NodeSpec

__all__ = ["main"]


def _default_dir() -> Path:
    """``$K8S_TESTENV_DIR``, so clusters side by side need no ``--dir`` on each command."""
    env = os.environ.get("K8S_TESTENV_DIR")
    return Path(env) if env else Path(tempfile.gettempdir()) / f"k8s-testenv-{os.getuid()}"


def _running(workdir: Path) -> bool:
    state = workdir / STATE_FILE
    if not state.exists():
        return False
    return any(procs.alive(pid) for pid in json.loads(state.read_text()).get("pids", {}).values())


def _cmd_build(args: argparse.Namespace) -> int:
    binaries = build_binaries(force=args.force)
    for name, path in vars(binaries).items():
        print(f"{name}: {path}")
    return 0


def _cmd_up(args: argparse.Namespace) -> int:
    workdir: Path = args.dir
    if _running(workdir):
        print(f"k8s-testenv: a cluster is already running in {workdir}; run `k8s-testenv down` first",
              file=sys.stderr)  # fmt: skip
        return 1
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    nodes = [
        NodeSpec(name=f"node-{i}", cpu=args.cpu, memory=args.memory, gpus=args.gpus)
        for i in range(args.nodes)
    ]
    cluster = start_cluster(workdir=workdir, nodes=nodes, tie_to_parent=False, timeout=args.timeout)
    kubeconfig = cluster.kubeconfig
    if args.kubeconfig:
        shutil.copyfile(kubeconfig, args.kubeconfig)
        kubeconfig = args.kubeconfig
    # only the exports on stdout, so `eval "$(k8s-testenv up)"` sets them
    print(f"k8s-testenv: Kubernetes {KUBE_VERSION} is up at {cluster.server} ({len(nodes)} nodes)",
          file=sys.stderr)  # fmt: skip
    print(f"export KUBECONFIG={kubeconfig}")
    if cluster.kubectl_path is not None:
        # kubectl of the server's version first on PATH; plugins named kubectl-* still resolve
        print(f"export PATH={cluster.kubectl_path.parent}:$PATH")
    return 0


def _cmd_down(args: argparse.Namespace) -> int:
    workdir: Path = args.dir
    if not (workdir / STATE_FILE).exists():
        print(f"k8s-testenv: no cluster in {workdir}")
        return 0
    stop_cluster(workdir, remove=True)
    print(f"k8s-testenv: stopped the cluster in {workdir}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="k8s-testenv",
        description="A real Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager, "
        "kube-scheduler, built from source) with a process kubelet, on loopback. "
        '`eval "$(k8s-testenv up)"` starts one and sets KUBECONFIG and PATH (kubectl); '
        "K8S_TESTENV_DIR sets the default --dir.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build (or reuse) the binaries with Go")
    build.add_argument(
        "--force", action="store_true", help="run go build even if the cache looks fresh"
    )
    build.set_defaults(run=_cmd_build)
    up = sub.add_parser("up", help="start a cluster in the background and write a kubeconfig")
    up.add_argument(
        "--dir", type=Path, default=_default_dir(), help="cluster folder (default: %(default)s)"
    )
    up.add_argument("--kubeconfig", type=Path, help="also copy the kubeconfig here")
    up.add_argument("--nodes", type=int, default=2, help="number of nodes (default: %(default)s)")
    up.add_argument(
        "--gpus", type=int, default=8, help="nvidia.com/gpu per node (default: %(default)s)"
    )
    up.add_argument("--cpu", default="32", help="cpu capacity per node (default: %(default)s)")
    up.add_argument(
        "--memory", default="128Gi", help="memory capacity per node (default: %(default)s)"
    )
    up.add_argument("--timeout", type=float, default=180, help="start-up timeout in seconds")
    up.set_defaults(run=_cmd_up)
    down = sub.add_parser("down", help="stop the cluster and remove its folder")
    down.add_argument(
        "--dir", type=Path, default=_default_dir(), help="cluster folder (default: %(default)s)"
    )
    down.set_defaults(run=_cmd_down)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.run(args))
    except MissingToolError as exc:
        print(f"k8s-testenv: error: {exc}", file=sys.stderr)
        return 2
    except K8sTestenvError as exc:
        print(f"k8s-testenv: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
