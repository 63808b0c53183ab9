"""kubectl torchrun: submit the current directory as a TorchrunJob, and manage jobs.

    kubectl torchrun submit --queue Q --gpus N [--nodes N] "python train.py ..."
    kubectl torchrun list | logs [-f] JOB | describe JOB | suspend JOB | resume JOB | delete JOB
    kubectl torchrun sync JOB        # hot reload: push the directory into the running job

submit creates the job (spec.workspace.version: the tree's root hash), then pushes the
directory (honouring .gitignore/.syncignore) with monarch-sync to the namespace's
workspace cache through a port-forward, the laptop's only path into the cluster; the cache
answers with what it lacks, so after an edit only the changed bytes travel. It prints the
job's name on stdout, everything else on stderr. The kubeconfig comes from KUBECONFIG
(or --kubeconfig), --context and -n/--namespace as for kubectl.

Exit status as kubectl's: 0 on success, 1 on any error (usage errors included: error:
on stderr, with a hint to --help).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import secrets
import sys
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from monarch_k8s.errors import INSTALL_COMMAND
from monarch_k8s.operator.kube import api_message
from monarch_k8s.torchrun import names
from monarch_k8s.torchrun.cache import (
    LIVE_ANNOTATION,
    SYNC_PORT,
    TOKEN_KEY,
    TOKEN_SECRET,
    cache_labels,
)
from monarch_sync import SyncError

__all__ = ["PluginError", "main"]

PROG = "kubectl torchrun"
RANK_ANNOTATION = "batch.kubernetes.io/job-completion-index"
CACHE_WAIT_S = 300.0
NOT_INSTALLED = (
    f"the cluster has no TorchrunJob resource ({names.API_VERSION}): install the CRDs and the "
    f"operator with `{INSTALL_COMMAND}`"
)


class PluginError(Exception):
    """Printed as ``error: <message>`` and exit status 1."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # kubectl's shape and exit status for usage
        self.exit(1, f"error: {message}\nSee '{PROG} --help' for usage.\n")


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- cluster access ---------------------------------------------------------------------------


class Cluster:
    """The kubeconfig's cluster, in one namespace."""

    def __init__(self, kubeconfig: str | None, context: str | None, namespace: str | None):
        from kubernetes import config

        # read at call time (the client's default is fixed when it is imported); a list of
        # files separated by ":" is merged, as kubectl does
        kubeconfig = kubeconfig or os.environ.get("KUBECONFIG") or None
        try:
            _, active = config.list_kube_config_contexts(config_file=kubeconfig)
            if context:
                contexts, _ = config.list_kube_config_contexts(config_file=kubeconfig)
                active = next((c for c in contexts if c["name"] == context), None)
                if active is None:
                    raise PluginError(f'context "{context}" does not exist')
            self.configuration = client.Configuration()
            config.load_kube_config(
                config_file=kubeconfig, context=context, client_configuration=self.configuration
            )
        except config.ConfigException as exc:
            raise PluginError(f"no usable kubeconfig: {exc}") from None
        self.namespace = namespace or (active.get("context") or {}).get("namespace") or "default"
        self.api = client.ApiClient(self.configuration)
        self.core = client.CoreV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)

    def new_client(self) -> client.ApiClient:
        return client.ApiClient(self.configuration)

    def job(self, name: str) -> dict[str, Any]:
        try:
            obj: Any = self.custom.get_namespaced_custom_object(
                names.GROUP, names.VERSION, self.namespace, names.JOB_PLURAL, name
            )
        except ApiException as exc:
            if exc.status == 404:
                raise PluginError(
                    f'torchrunjobs.{names.GROUP} "{name}" not found in namespace "{self.namespace}"'
                ) from None
            raise
        return dict(obj)

    def patch_job(self, name: str, patch: dict[str, Any]) -> None:
        self.job(name)  # a clear "not found" first
        self.custom.patch_namespaced_custom_object(
            names.GROUP, names.VERSION, self.namespace, names.JOB_PLURAL, name, patch
        )

    def pods(self, job: str) -> list[Any]:
        """The job's worker pods by rank (not its etcd's, which carries the job's label too)."""
        selector = f"{names.JOB_LABEL}={job},{names.ROLE_LABEL}=worker"
        items = self.core.list_namespaced_pod(self.namespace, label_selector=selector).items
        return sorted(items, key=rank)

    def cache_pod(self, timeout: float) -> str:
        """The Ready workspace cache pod's name (the operator starts it for the first job)."""
        selector = ",".join(f"{k}={v}" for k, v in cache_labels().items())
        deadline = time.monotonic() + timeout
        said = False
        while True:
            pods: list[Any] = self.core.list_namespaced_pod(
                self.namespace, label_selector=selector
            ).items
            for pod in pods:
                ready = any(
                    c.type == "Ready" and c.status == "True" for c in (pod.status.conditions or [])
                )
                if ready and pod.metadata.deletion_timestamp is None:
                    return str(pod.metadata.name)
            if time.monotonic() > deadline:
                raise PluginError(
                    f"the workspace cache ({selector}) is not Ready in namespace "
                    f'"{self.namespace}" after {timeout:.0f}s: is the operator installed and '
                    f"running? (kubectl get pods -n monarch-system; kubectl describe "
                    f"deploy/torchrun-workspace -n {self.namespace})"
                )
            if not said:
                _log(f"waiting for the workspace cache in namespace {self.namespace} ...")
                said = True
            time.sleep(0.2)

    def token(self) -> str:
        import base64

        try:
            secret = self.core.read_namespaced_secret(TOKEN_SECRET, self.namespace)
        except ApiException as exc:
            raise PluginError(
                f"cannot read the workspace token Secret {TOKEN_SECRET}: HTTP {exc.status}"
            ) from None
        return base64.b64decode((secret.data or {})[TOKEN_KEY]).decode()


def rank(pod: Any) -> int:
    value = (pod.metadata.annotations or {}).get(RANK_ANNOTATION)
    if value is None:
        value = (pod.metadata.labels or {}).get(RANK_ANNOTATION, "0")
    try:
        return int(value)
    except ValueError:
        return 0


# -- the workspace ----------------------------------------------------------------------------


def scan(src: Path) -> Any:
    """The manifest of ``src`` as a push will send it (its stat cache makes the push's rescan
    cheap)."""
    from monarch_sync import StatCache, scan_tree
    from monarch_sync.client import default_cache_dir

    cache = StatCache(default_cache_dir(src) / "stat.json")
    manifest = scan_tree(src, cache=cache)
    cache.save()  # the push scans again: from this cache, without re-reading a file
    return manifest


def changed_files(src: Path, manifest: Any) -> list[str] | None:
    """Paths that differ from the last push of ``src`` from this machine (None: no last push)."""
    from monarch_sync import Manifest
    from monarch_sync.client import default_cache_dir
    from monarch_sync.exceptions import SyncError

    try:
        last = Manifest.decode_trusted((default_cache_dir(src) / "last.manifest").read_bytes())
    except (OSError, SyncError):
        return None
    old = {e.path: e for e in last.entries}
    new = {e.path: e for e in manifest.entries}
    changed = {p for p, e in new.items() if p not in old or not e.same_content(old[p])}
    return sorted(changed | (old.keys() - new.keys()))


def upload(cluster: Cluster, src: Path, version: str, changed: list[str] | None) -> Any:
    """Push ``src`` to the namespace's workspace cache through a port-forward."""
    from monarch_k8s.tunnel import PortForward
    from monarch_sync import push
    from monarch_sync.progress import default_progress

    pod = cluster.cache_pod(CACHE_WAIT_S)
    token = cluster.token()
    forward = PortForward(cluster.new_client, cluster.namespace, lambda: (pod, SYNC_PORT))
    try:
        report = asyncio.run(push(src, [forward.address], token, progress=default_progress()))
    finally:
        forward.close()
    if not report.ok or report.root_hash != version:
        detail = "; ".join(f"{n.error}" for n in report.failed) or "the tree changed meanwhile"
        raise PluginError(f"uploading the workspace failed: {detail}")
    what = (
        "first upload"
        if changed is None
        else f"{len(changed)} changed since the last upload from here"
    )
    listed = f": {', '.join(changed[:10])}" if changed else ""
    _log(
        f"workspace {version[:12]}: {report.files} files, {report.tree_bytes} bytes; "
        f"sent {report.client_bytes} bytes ({what}{listed})"
    )
    return report


# -- commands ---------------------------------------------------------------------------------


def job_name(src: Path) -> str:
    base = re.sub(r"[^a-z0-9-]+", "-", src.resolve().name.lower()).strip("-")[:30].strip("-")
    return f"{base or 'job'}-{secrets.token_hex(3)}"


def cmd_submit(cluster: Cluster, args: argparse.Namespace) -> int:
    src = Path(args.dir)
    if not src.is_dir():
        raise PluginError(f"--dir {args.dir}: not a directory")
    command = " ".join(args.command) if len(args.command) > 1 else args.command[0]
    if not command.strip():
        raise PluginError('the command is empty: give it as one argument, e.g. "python train.py"')
    spec: dict[str, Any] = {"jobQueue": args.queue, "command": command}
    if args.nodes is not None:
        spec["numNodes"] = args.nodes
        if args.gpus is not None:
            if args.gpus % args.nodes:
                raise PluginError(f"--gpus {args.gpus} does not split over --nodes {args.nodes}")
            spec["procsPerNode"] = args.gpus // args.nodes
    elif args.gpus is not None:
        spec["numGPUs"] = args.gpus
    else:
        raise PluginError("give --gpus N (and optionally --nodes N)")
    if args.procs_per_node is not None:
        spec["procsPerNode"] = args.procs_per_node
    if args.backend or args.rdzv_backend:
        spec["distributed"] = {
            k: v for k, v in (("backend", args.backend), ("rdzvBackend", args.rdzv_backend)) if v
        }
    manifest = scan(src)
    changed = changed_files(src, manifest)
    name = args.name or job_name(src)
    body = {
        "apiVersion": names.API_VERSION,
        "kind": names.JOB_KIND,
        "metadata": {"name": name},
        "spec": {**spec, "workspace": {"version": manifest.root_hash}},
    }
    try:
        cluster.custom.create_namespaced_custom_object(
            names.GROUP, names.VERSION, cluster.namespace, names.JOB_PLURAL, body
        )
    except ApiException as exc:
        if exc.status == 404:
            raise PluginError(NOT_INSTALLED) from None
        raise PluginError(f"creating TorchrunJob {name}: {api_message(exc)}") from None
    _log(f"torchrunjob.{names.GROUP}/{name} created in namespace {cluster.namespace}")
    upload(cluster, src, manifest.root_hash, changed)
    print(name, flush=True)
    return 0


def cmd_sync(cluster: Cluster, args: argparse.Namespace) -> int:
    """Hot reload: the new version reaches every running worker's live tree."""
    cluster.job(args.job)
    src = Path(args.dir)
    manifest = scan(src)
    upload(cluster, src, manifest.root_hash, changed_files(src, manifest))
    version = manifest.root_hash
    cluster.patch_job(args.job, {"spec": {"workspace": {"version": version}}})
    deadline = time.monotonic() + args.timeout
    while True:  # workers still starting get it too (their own version first, then this one)
        pods = [p for p in cluster.pods(args.job) if p.status.phase in ("Pending", "Running")]
        live = [p for p in pods if (p.metadata.annotations or {}).get(LIVE_ANNOTATION) == version]
        if len(live) == len(pods):
            _log(f"{len(pods)}/{len(pods)} running workers hold {version[:12]}")
            return 0
        if time.monotonic() > deadline:
            raise PluginError(
                f"{len(live)}/{len(pods)} running workers hold {version[:12]} after "
                f"{args.timeout:.0f}s (kubectl logs deploy/torchrun-workspace says why)"
            )
        time.sleep(0.2)


def age(stamp: Any) -> str:
    if stamp is None:
        return "<unknown>"
    when = stamp if isinstance(stamp, datetime) else datetime.fromisoformat(str(stamp))
    seconds = int((datetime.now(UTC) - when).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def cmd_list(cluster: Cluster, args: argparse.Namespace) -> int:
    try:
        listed: Any = cluster.custom.list_namespaced_custom_object(
            names.GROUP, names.VERSION, cluster.namespace, names.JOB_PLURAL
        )
    except ApiException as exc:
        if exc.status == 404:
            raise PluginError(NOT_INSTALLED) from None
        raise
    items = listed.get("items", [])
    if not items:
        _log(f"No resources found in {cluster.namespace} namespace.")
        return 0
    rows = [("NAME", "QUEUE", "PHASE", "WORKERS", "AGE")]
    for job in sorted(items, key=lambda j: j["metadata"]["name"]):
        status = job.get("status") or {}
        rows.append((
            job["metadata"]["name"],
            str((job.get("spec") or {}).get("jobQueue", "")),
            str(status.get("phase", "")),
            str(status.get("workersReady", "")),  # the CRD's Workers column
            age(job["metadata"].get("creationTimestamp", "").replace("Z", "+00:00") or None),
        ))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("   ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return 0


def cmd_logs(cluster: Cluster, args: argparse.Namespace) -> int:
    """Each worker's log, prefixed by its rank. With ``-f``: every worker pod as it appears
    (all nodes, a retry's new pods, a container restarted in place), until the job is done."""
    cluster.job(args.job)
    deadline = time.monotonic() + (args.timeout if args.follow else 0)
    lock = threading.Lock()

    def stream(pod: Any) -> None:
        prefix = f"[rank {rank(pod)}] "
        core = client.CoreV1Api(cluster.new_client())
        kwargs: dict[str, Any] = {"container": names.WORKER_CONTAINER}
        while True:
            try:
                if args.follow:
                    resp = core.read_namespaced_pod_log(
                        pod.metadata.name, cluster.namespace, follow=True,
                        _preload_content=False, **kwargs,
                    )  # fmt: skip
                    for line in resp:  # urllib3 yields the body line by line
                        with lock:
                            print(prefix + _text(line).rstrip("\n"), flush=True)
                    return
                text = core.read_namespaced_pod_log(pod.metadata.name, cluster.namespace, **kwargs)
                with lock:
                    for line in str(text).splitlines():
                        print(prefix + line)
                return
            except ApiException as exc:  # still initialising (workspace sync): wait with -f
                if not args.follow or time.monotonic() > deadline or exc.status != 400:
                    with lock:
                        _log(f"{prefix}no logs: {api_message(exc)}")
                    return
                time.sleep(0.5)

    streams: dict[tuple[str, int], threading.Thread] = {}
    while True:
        for pod in cluster.pods(args.job):
            key = (pod.metadata.uid, worker_restarts(pod))  # a restart in place: its new log
            if key not in streams:
                streams[key] = threading.Thread(target=stream, args=(pod,), daemon=True)
                streams[key].start()
        if not args.follow:
            break
        if streams and not any(t.is_alive() for t in streams.values()):
            phase = (cluster.job(args.job).get("status") or {}).get("phase")
            if phase in ("Succeeded", "Failed", "Suspended"):  # no worker will log again
                break
        if time.monotonic() > deadline:
            break
        time.sleep(1)
    if not streams:
        raise PluginError(f"TorchrunJob {args.job} has no worker pods (yet)")
    for t in streams.values():
        t.join()
    return 0


def worker_restarts(pod: Any) -> int:
    statuses = (pod.status.container_statuses if pod.status else None) or []
    return next((c.restart_count for c in statuses if c.name == names.WORKER_CONTAINER), 0)


def _text(line: Any) -> str:
    return line.decode(errors="replace") if isinstance(line, bytes) else str(line)


def cmd_suspend(cluster: Cluster, args: argparse.Namespace) -> int:
    suspend = args.cmd == "suspend"
    cluster.patch_job(args.job, {"spec": {"suspend": suspend}})
    print(f"torchrunjob.{names.GROUP}/{args.job} {'suspended' if suspend else 'resumed'}")
    return 0


def cmd_delete(cluster: Cluster, args: argparse.Namespace) -> int:
    cluster.job(args.job)
    cluster.custom.delete_namespaced_custom_object(
        names.GROUP, names.VERSION, cluster.namespace, names.JOB_PLURAL, args.job,
        propagation_policy="Background",
    )  # fmt: skip
    print(f'torchrunjob.{names.GROUP} "{args.job}" deleted')
    return 0


def cmd_describe(cluster: Cluster, args: argparse.Namespace) -> int:
    job = cluster.job(args.job)
    meta, spec, status = job["metadata"], job.get("spec") or {}, job.get("status") or {}
    version = (spec.get("workspace") or {}).get("version", "<none>")
    out = [
        f"Name:         {meta['name']}",
        f"Namespace:    {meta['namespace']}",
        f"Queue:        {spec.get('jobQueue', '')}",
        f"Command:      {spec.get('command', '')}",
        f"Suspend:      {bool(spec.get('suspend', False))}",
        f"Phase:        {status.get('phase', '')}",
        f"Workspace:    {version}",
        "Conditions:",
    ]
    for c in status.get("conditions") or []:
        out.append(
            f"  {c.get('type')}={c.get('status')}  {c.get('reason', '')}: {c.get('message', '')}"
        )
    out.append("Workers:")
    for pod in cluster.pods(args.job):
        live = (pod.metadata.annotations or {}).get(LIVE_ANNOTATION, "-")
        out.append(
            f"  [rank {rank(pod)}] {pod.metadata.name}  {pod.status.phase}  workspace {live[:12]}"
        )
    out.append("Events:")
    events = cluster.core.list_namespaced_event(
        cluster.namespace, field_selector=f"involvedObject.name={meta['name']}"
    ).items
    for ev in sorted(events, key=lambda e: str(e.last_timestamp or e.event_time or "")):
        out.append(f"  {ev.type}  {ev.reason}  {ev.message}")
    print("\n".join(out))
    return 0


# -- parsing ----------------------------------------------------------------------------------

COMMANDS = {
    "submit": cmd_submit,
    "sync": cmd_sync,
    "list": cmd_list,
    "logs": cmd_logs,
    "describe": cmd_describe,
    "suspend": cmd_suspend,
    "resume": cmd_suspend,
    "delete": cmd_delete,
}


def _globals(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument(
        "-n", "--namespace", default=default, help="namespace (default: the context's)"
    )
    parser.add_argument("--context", default=default, help="kubeconfig context to use")
    parser.add_argument(
        "--kubeconfig", default=default, help="kubeconfig file (default: KUBECONFIG)"
    )


def parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _globals(p, None)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND", parser_class=_Parser)

    def add(name: str, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        _globals(sp, argparse.SUPPRESS)  # accepted after the command too
        return sp

    s = add("submit", "upload this directory and submit a TorchrunJob; prints its name")
    s.add_argument("command", nargs="+", help='what each process runs, e.g. "python train.py"')
    s.add_argument("--queue", required=True, help="the TorchrunQueue")
    s.add_argument("--gpus", type=int, help="total GPUs (processes); spread over --nodes if given")
    s.add_argument("--nodes", type=int, help="number of nodes (pods)")
    s.add_argument("--procs-per-node", type=int, help="processes per node (CPU-only queues)")
    s.add_argument("--name", help="job name (default: the directory's name and a suffix)")
    s.add_argument("--backend", help="torch.distributed backend (nccl, gloo)")
    s.add_argument("--rdzv-backend", choices=["c10d", "etcd-v2", "static"])
    s.add_argument("--dir", default=".", help="the workspace to upload (default: .)")
    y = add("sync", "hot reload: push this directory into a running job's workers")
    y.add_argument("job")
    y.add_argument("--dir", default=".")
    y.add_argument("--timeout", type=float, default=120.0)
    add("list", "list TorchrunJobs")
    lg = add("logs", "print the logs of every worker, prefixed by rank")
    lg.add_argument("job")
    lg.add_argument("-f", "--follow", action="store_true", help="stream until the workers end")
    lg.add_argument("--timeout", type=float, default=600.0, help="-f: how long to wait for pods")
    for name, help in (
        ("describe", "show a job's settings, status, workers and events"),
        ("suspend", "stop a job's pods; resume recreates them"),
        ("resume", "resume a suspended job"),
        ("delete", "delete a job and what it owns"),
    ):
        add(name, help).add_argument("job")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        cluster = Cluster(args.kubeconfig, args.context, args.namespace)
        return COMMANDS[args.cmd](cluster, args)
    except PluginError as exc:
        _log(f"error: {exc}")
        return 1
    except ApiException as exc:
        _log(f"error: {api_message(exc)} (HTTP {exc.status})")
        return 1
    except (SyncError, OSError) as exc:  # a tree the scanner refuses, an unreadable file
        _log(f"error: {exc}")
        return 1
    except KeyboardInterrupt:
        return 130


def console() -> None:
    sys.exit(main())


if __name__ == "__main__":
    console()
