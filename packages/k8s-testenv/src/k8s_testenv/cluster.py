"""Start and stop a real control plane: etcd, kube-apiserver, kube-controller-manager,
kube-scheduler and the process kubelet, all on free loopback ports.

Everything lives in one folder (``workdir``): etcd data, keys, the token file, logs, the
kubeconfig, the kubelet's pod sandboxes and ``state.json``, which lists the process groups so
:func:`stop_cluster` can tear down a cluster started by another process.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from k8s_testenv import procs, storage
from k8s_testenv.build import KUBE_VERSION, Binaries, ensure_binaries
from k8s_testenv.exceptions import K8sTestenvError, StartupError
from k8s_testenv.kubelet.agent import KubeletConfig, NodeSpec
from k8s_testenv.kubelet.api import RestClient
from k8s_testenv.kubelet.network import pick_pod_network
from k8s_testenv.kubelet.runtime import KubeletSettings

if TYPE_CHECKING:
    import kubernetes.client

__all__ = ["Cluster", "default_nodes", "start_cluster", "stop_cluster"]

STATE_FILE = "state.json"


def default_nodes() -> list[NodeSpec]:
    """Two GPU nodes, so scheduling, GPU requests and spreading have something to act on."""
    return [NodeSpec(name=f"node-{i}", cpu="32", memory="128Gi", gpus=8) for i in range(2)]


@dataclass
class Cluster:
    """A running test cluster. ``stop()`` (or the context manager) tears it down."""

    workdir: Path
    kubeconfig: Path
    server: str
    token: str
    nodes: list[NodeSpec]
    pids: dict[str, int] = field(default_factory=dict)
    remove_workdir: bool = True
    #: kubectl of the server's version (the one on PATH may be years older)
    kubectl_path: Path | None = None

    def rest(self) -> RestClient:
        """A plain JSON client (what the kubelet uses)."""
        return RestClient(
            self.server, self.token, ca_file=str(self.workdir / "certs" / "apiserver.crt")
        )

    def api_client(self) -> kubernetes.client.ApiClient:
        """An official ``kubernetes`` client configured from this cluster's kubeconfig."""
        from kubernetes import config

        return config.new_client_from_config(config_file=str(self.kubeconfig))

    def kubectl_env(self) -> dict[str, str]:
        """The environment to run kubectl in: this cluster's kubeconfig, and the binaries'
        folder first on PATH, so the matching kubectl (and plugins ``kubectl-*``) are found."""
        if self.kubectl_path is None:
            raise K8sTestenvError("this Cluster was made without binaries: no kubectl")
        path = f"{self.kubectl_path.parent}{os.pathsep}{os.environ.get('PATH', '')}"
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig), "PATH": path}

    def kubectl(
        self,
        *args: str,
        input: bytes | None = None,
        timeout: float = 120,
        cwd: Path | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run the cluster's kubectl with ``args`` (in ``cwd``); the result carries its exit
        code and output."""
        env = self.kubectl_env()  # raises when there is no kubectl
        return subprocess.run(
            [str(self.kubectl_path), *args],
            env=env,
            input=input,
            capture_output=True,
            timeout=timeout,
            cwd=cwd,
        )

    def logs(self, component: str, lines: int = 50) -> str:
        return procs.log_tail(self.workdir / "logs" / f"{component}.log", lines)

    def stop(self) -> None:
        stop_cluster(self.workdir, remove=self.remove_workdir)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _write_keys(certs: Path) -> tuple[Path, Path]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private, public = certs / "sa.key", certs / "sa.pub"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private, public


def _kubeconfig(server: str, token: str, ca: Path) -> dict[str, Any]:
    # kube-apiserver writes a self-signed serving certificate and its CA into --cert-dir
    ca_data = base64.b64encode(ca.read_bytes()).decode()
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "k8s-testenv",
                "cluster": {"server": server, "certificate-authority-data": ca_data},
            }
        ],
        "users": [{"name": "admin", "user": {"token": token}}],
        "contexts": [
            {
                "name": "k8s-testenv",
                "context": {"cluster": "k8s-testenv", "user": "admin", "namespace": "default"},
            }
        ],
        "current-context": "k8s-testenv",
    }


class _Launcher:
    def __init__(self, workdir: Path, *, tie_to_parent: bool) -> None:
        self.workdir = workdir
        self.logs = workdir / "logs"
        self.tie_to_parent = tie_to_parent
        self.pids: dict[str, int] = {}

    def start(self, name: str, argv: list[str]) -> int:
        pid = procs.spawn(argv, log=self.logs / f"{name}.log", tie_to_parent=self.tie_to_parent)
        self.pids[name] = pid
        self.save()
        return pid

    def save(self, **extra: Any) -> None:
        path = self.workdir / STATE_FILE
        state = json.loads(path.read_text()) if path.exists() else {}
        state.update(extra, pids=self.pids)
        path.write_text(json.dumps(state, indent=2))

    def wait(self, name: str, check: Any, timeout: float) -> None:
        why = procs.wait_for(check, timeout=timeout, pid=self.pids[name])
        if why is not None:
            raise StartupError(name, why, procs.log_tail(self.logs / f"{name}.log"))


def start_cluster(
    *,
    workdir: Path | None = None,
    nodes: list[NodeSpec] | None = None,
    binaries: Binaries | None = None,
    kubelet_settings: KubeletSettings | None = None,
    tie_to_parent: bool = True,
    timeout: float = 120.0,
) -> Cluster:
    """Start a cluster and return once nodes are Ready and the ``default`` ServiceAccount exists.

    ``tie_to_parent`` (the default, for tests) makes every component die with this process;
    ``k8s-testenv up`` turns it off. Binaries are built first if needed (slow only once).
    """
    binaries = binaries or ensure_binaries()
    nodes = nodes or default_nodes()
    own_dir = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="k8s-testenv-")) if workdir is None else workdir
    for sub in ("logs", "certs", "etcd"):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    launcher = _Launcher(workdir, tie_to_parent=tie_to_parent)
    try:
        return _start(
            launcher, binaries, nodes, kubelet_settings or KubeletSettings(), timeout, own_dir
        )
    except BaseException:
        # the error carries the failing component's log tail; K8S_TESTENV_KEEP=1 keeps the rest
        stop_cluster(workdir, remove=own_dir)
        raise


def _start(
    launcher: _Launcher,
    binaries: Binaries,
    nodes: list[NodeSpec],
    settings: KubeletSettings,
    timeout: float,
    own_dir: bool,
) -> Cluster:
    workdir = launcher.workdir
    certs = workdir / "certs"
    ports = {
        name: procs.free_port()
        for name in ("etcd", "peer", "apiserver", "kcm", "scheduler", "kubelet")
    }
    token = secrets.token_hex(16)
    sa_key, sa_pub = _write_keys(certs)
    tokens = certs / "tokens.csv"
    tokens.write_text(f'{token},admin,admin,"system:masters"\n')
    server = f"https://127.0.0.1:{ports['apiserver']}"
    ca_file = certs / "apiserver.crt"
    rest = RestClient(server, token, ca_file=str(ca_file))

    etcd_url = f"http://127.0.0.1:{ports['etcd']}"
    peer_url = f"http://127.0.0.1:{ports['peer']}"
    launcher.start("etcd", [
        str(binaries.etcd), "--name=default", f"--data-dir={workdir / 'etcd'}",
        f"--listen-client-urls={etcd_url}", f"--advertise-client-urls={etcd_url}",
        f"--listen-peer-urls={peer_url}", f"--initial-advertise-peer-urls={peer_url}",
        f"--initial-cluster=default={peer_url}", "--unsafe-no-fsync=true", "--log-level=warn",
    ])  # fmt: skip
    launcher.wait("etcd", lambda: _http_ok(f"{etcd_url}/health"), timeout)

    launcher.start("kube-apiserver", [
        str(binaries.kube_apiserver), f"--etcd-servers={etcd_url}",
        "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
        f"--secure-port={ports['apiserver']}", f"--cert-dir={certs}",
        f"--token-auth-file={tokens}", "--authorization-mode=RBAC",
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
        f"--service-account-key-file={sa_pub}", f"--service-account-signing-key-file={sa_key}",
        "--service-cluster-ip-range=10.0.0.0/24", "--allow-privileged=true",
        "--kubelet-preferred-address-types=InternalIP",
        # the lease reconciler refuses a loopback advertise address (as in kwok)
        "--endpoint-reconciler-type=none", "--profiling=false",
    ])  # fmt: skip
    launcher.wait("kube-apiserver", lambda: rest.text("/readyz") == "ok", timeout)
    storage.create_default_class(rest)
    kubeconfig = workdir / "kubeconfig"
    kubeconfig.write_text(json.dumps(_kubeconfig(server, token, ca_file), indent=2))
    # the host-path provisioner's /tmp/hostpath_pv is the cluster's pv/ for these two
    in_pv_ns = storage.provisioner_prefix(workdir / "pv")
    launcher.save(server=server, kubeconfig=str(kubeconfig), pv_in_workdir=bool(in_pv_ns))

    common = [
        f"--kubeconfig={kubeconfig}", f"--authentication-kubeconfig={kubeconfig}",
        f"--authorization-kubeconfig={kubeconfig}", "--bind-address=127.0.0.1", "--leader-elect=false",
    ]  # fmt: skip
    launcher.start("kube-controller-manager", [
        *in_pv_ns, str(binaries.kube_controller_manager), *common, f"--secure-port={ports['kcm']}",
        f"--service-account-private-key-file={sa_key}", f"--root-ca-file={certs / 'apiserver.crt'}",
        "--enable-hostpath-provisioner",
    ])  # fmt: skip
    launcher.start("kube-scheduler", [
        str(binaries.kube_scheduler), *common, f"--secure-port={ports['scheduler']}",
    ])  # fmt: skip
    kubelet_config = KubeletConfig(
        server=server, token=token, ca_file=str(ca_file), workdir=str(workdir / "kubelet"),
        port=ports["kubelet"],
        cert=str(certs / "apiserver.crt"), key=str(certs / "apiserver.key"),
        kube_version=KUBE_VERSION, nodes=nodes, settings=settings, pod_network=pick_pod_network(),
        streaming_binary=str(binaries.kubelet_streaming),
    )  # fmt: skip
    config_path = workdir / "kubelet.json"
    config_path.write_text(json.dumps(kubelet_config.to_dict(), indent=2))
    launcher.start(
        "kubelet", [*in_pv_ns, sys.executable, "-m", "k8s_testenv.kubelet", str(config_path)]
    )

    launcher.wait("kube-controller-manager", lambda: _https_ok(ports["kcm"]), timeout)
    launcher.wait("kube-scheduler", lambda: _https_ok(ports["scheduler"]), timeout)
    launcher.wait("kubelet", lambda: _nodes_ready(rest, nodes), timeout)
    launcher.wait(
        "kube-controller-manager",
        lambda: bool(rest.get("/api/v1/namespaces/default/serviceaccounts/default")),
        timeout,
    )
    return Cluster(
        workdir=workdir, kubeconfig=kubeconfig, server=server, token=token, nodes=nodes,
        pids=dict(launcher.pids), remove_workdir=own_dir, kubectl_path=binaries.kubectl,
    )  # fmt: skip


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as resp:
        return bool(resp.status == 200)


def _https_ok(port: int) -> bool:
    # the controllers serve /healthz with an in-memory self-signed certificate
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    url = f"https://127.0.0.1:{port}/healthz"
    with urllib.request.urlopen(url, timeout=2, context=context) as resp:
        return bool(resp.read() == b"ok")


def _nodes_ready(rest: RestClient, nodes: list[NodeSpec]) -> bool:
    items = rest.get("/api/v1/nodes").get("items", [])
    ready = {
        n["metadata"]["name"]
        for n in items
        if any(
            c["type"] == "Ready" and c["status"] == "True"
            for c in n.get("status", {}).get("conditions", [])
        )
        and not any(t.get("effect") == "NoSchedule" for t in n.get("spec", {}).get("taints", []))
    }
    return {n.name for n in nodes} <= ready


def _remove_provisioned(workdir: Path) -> None:
    try:
        config = json.loads((workdir / "kubeconfig").read_text())
        rest = RestClient(
            config["clusters"][0]["cluster"]["server"],
            config["users"][0]["user"]["token"],
            ca_file=str(workdir / "certs" / "apiserver.crt"),
        )
        storage.remove_provisioned(rest)
    except Exception:  # best effort: the API server may already be gone
        pass


def stop_cluster(workdir: Path, *, remove: bool = True) -> None:
    """Stop every process of the cluster in ``workdir`` and (optionally) delete the folder.

    Order: the kubelet first (it kills its pods), then any pod process group it left behind,
    then the controllers, the API server and etcd.
    """
    state_path = workdir / STATE_FILE
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    pids: dict[str, int] = state.get("pids", {})
    if "kubelet" in pids:
        procs.stop_groups([pids["kubelet"]], grace=10)
    pgid_dir = workdir / "kubelet" / "pgids"
    if pgid_dir.is_dir():
        procs.stop_groups([int(p.name) for p in pgid_dir.iterdir() if p.name.isdigit()], grace=0)
    if state.get("pv_in_workdir") is False and "kube-apiserver" in pids:
        _remove_provisioned(workdir)
    for name in ("kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd"):
        if name in pids:
            procs.stop_groups([pids[name]], grace=10)
    if remove and not os.environ.get("K8S_TESTENV_KEEP"):
        shutil.rmtree(workdir, ignore_errors=True)
    elif state_path.exists():
        state_path.write_text(
            json.dumps({**json.loads(state_path.read_text()), "pids": {}, "stopped": time.time()})
        )
