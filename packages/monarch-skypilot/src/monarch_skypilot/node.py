"""What every node of the cluster runs: the task's ``run`` starts this module.

    python -m monarch_skypilot.node --meshes trainers=2 --port 22222 \\
        [--gateway-port 8443 --sync-port 7878] [--batch-script train.py] \\
        --rank "$SKYPILOT_NODE_RANK" --ips "$SKYPILOT_NODE_IPS"

Every node starts a Monarch worker on ``tcp://<its IP>:<port>`` (and, in gateway mode, a
monarch-sync agent on ``<its IP>:<sync port>`` whose live tree is first on the worker's import
path). The head node (rank 0) in gateway mode also starts monarch-gateway on ``0.0.0.0:<gateway
port>`` with TLS (certificate and key from SkyPilot secrets), the bearer token (a secret too),
one ``--mesh-file`` per mesh cut from the node list, and a root sync agent for ``job.sync()``.

Starting is idempotent, so a relaunch (after a preempted node was replaced) runs the same
command everywhere: a process still alive (pid file) is kept, the head rewrites the mesh files
with the new node list, and its gateway takes the replacement in. The command then stays until
the node's worker exits, printing the worker log's last lines if it failed.

Batch mode (``--batch-script``): the head runs the client script with ``MONARCH_BATCH_JOB=1``
once every worker listens, and the other nodes stop when the head's worker does.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

CUDA_HINT = (
    "this node has no GPU but the worker needs libcuda.so.1 (a CUDA build of torchmonarch or "
    "torch): request GPUs (resources=sky.Resources(accelerators='H100:1')) or install a CPU "
    "build in setup_commands"
)
READY_TIMEOUT_S = 300.0


def log(message: str) -> None:
    print(f"[monarch-skypilot node] {message}", flush=True)


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"


def listening(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
    except OSError:
        return False
    return True


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):  # a zombie child is dead
        if Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z":
            return False
    return True


class Node:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.ips = [ip for ip in args.ips.split() if ip]
        self.rank = int(args.rank)
        if not 0 <= self.rank < len(self.ips):
            sys.exit(f"rank {self.rank} is outside the {len(self.ips)} node IPs {self.ips}")
        self.ip = self.ips[self.rank]
        self.meshes = {n: int(c) for n, c in (m.split("=") for m in args.meshes.split(","))}
        self.dir = Path(args.state_dir or Path.home() / ".monarch-skypilot").expanduser()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.token = os.environ.get("MONARCH_GATEWAY_TOKEN", "")
        self.gateway = args.gateway_port is not None
        self.children: list[subprocess.Popen[bytes]] = []

    # -- processes that outlive a relaunch ---------------------------------------------------

    def ensure(
        self, name: str, argv: list[str], env: dict[str, str], key: str = ""
    ) -> tuple[int, bool]:
        """Start ``argv`` unless the same command (and ``key``: a digest of its secrets) is
        still running; (pid, started here). A different one still running is stopped first."""
        pid_file, cmd_file = self.dir / f"{name}.pid", self.dir / f"{name}.cmd"
        command = json.dumps([argv, key])
        with contextlib.suppress(OSError, ValueError):
            pid = int(pid_file.read_text())
            if alive(pid) and cmd_file.read_text() == command:
                log(f"{name} already running (pid {pid}); kept")
                return pid, False
            if alive(pid):  # e.g. a gateway holding another launch's token: it gives way
                log(f"{name} (pid {pid}) runs with other settings; restarting it")
                os.kill(pid, signal.SIGTERM)
                deadline = time.monotonic() + 30
                while alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.1)
        with open(self.dir / f"{name}.log", "ab") as out:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env={**os.environ, **env}
            )
        self.children.append(proc)
        pid_file.write_text(str(proc.pid))
        cmd_file.write_text(command)
        log(f"started {name} (pid {proc.pid}): {' '.join(argv)}")
        return proc.pid, True

    def wait_listening(self, name: str, host: str, port: int, pid: int) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not listening(host, port):
            if not alive(pid) or time.monotonic() > deadline:
                self.fail(name, f"{name} did not listen on {host}:{port}")
            time.sleep(0.1)

    def fail(self, name: str, why: str) -> None:
        text = tail(self.dir / f"{name}.log")
        print(f"{why}; last lines of {self.dir / name}.log:\n{text}", file=sys.stderr, flush=True)
        if "libcuda.so" in text:
            print(CUDA_HINT, file=sys.stderr, flush=True)
        self.stop()
        sys.exit(1)

    def stop(self) -> None:
        for proc in self.children:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        for proc in self.children:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()

    # -- what runs here ----------------------------------------------------------------------

    def sync_agent(self, name: str, listen: str, *extra: str) -> Path:
        from monarch_sync import SyncWorkspace, synced_path

        root = self.dir / f"{name}-root"
        argv = [sys.executable, "-m", "monarch_sync.cli", "agent", "--listen", listen]
        pid, started = self.ensure(name, [*argv, "--root", str(root), *extra], {
            "MONARCH_SYNC_TOKEN": self.token,
        })  # fmt: skip
        host, _, port = listen.rpartition(":")
        self.wait_listening(name, host, int(port), pid)
        if started:  # a first, empty version: the live tree exists before a worker imports it
            empty = self.dir / "empty-workspace"
            empty.mkdir(exist_ok=True)
            SyncWorkspace([listen], self.token).push(str(empty))
        return Path(synced_path(root))

    def start_worker(self) -> int:
        env: dict[str, str] = {}
        if self.gateway and self.args.sync_port:
            live = self.sync_agent("sync-agent", f"{self.ip}:{self.args.sync_port}")
            path = os.environ.get("PYTHONPATH", "")
            env = {"MONARCH_SYNC_ROOT": str(live), "PYTHONPATH": f"{live}{os.pathsep}{path}"}
        address = f"tcp://{self.ip}:{self.args.port}"
        argv = [sys.executable, "-m", "monarch_skypilot.node", "worker", address]
        pid, _ = self.ensure("worker", argv, env)
        self.wait_listening("worker", self.ip, int(self.args.port), pid)
        log(f"worker listening on {address}")
        return pid

    def write_mesh_files(self) -> dict[str, Path]:
        """One file per mesh. On a relaunch, nodes that stayed keep their place and new nodes
        take the places of lost ones (SkyPilot may list the nodes in another order)."""
        from monarch_skypilot.task import split_nodes

        port = self.args.port
        paths = {name: self.dir / f"mesh-{name}.txt" for name in self.meshes}
        old = {name: _read_lines(path) for name, path in paths.items()}
        if all(len(old[n]) == c for n, c in self.meshes.items()):
            current = {f"tcp://{ip}:{port}" for ip in self.ips}
            placed = {a for addrs in old.values() for a in addrs if a in current}
            new = [a for a in (f"tcp://{ip}:{port}" for ip in self.ips) if a not in placed]
            layout = {n: [a if a in current else new.pop(0) for a in old[n]] for n in old}
        else:
            layout = {
                n: [f"tcp://{ip}:{port}" for ip in ips]
                for n, ips in split_nodes(self.meshes, self.ips).items()
            }
        files = {}
        for name, addresses in layout.items():
            path = paths[name]
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(f"{a}\n" for a in addresses))
            tmp.replace(path)  # the gateway never reads half a list
            files[name] = path
        return files

    def start_gateway(self) -> None:
        files = self.write_mesh_files()
        secrets = {
            "token": self.token,
            "cert.pem": os.environ.get("MONARCH_SKYPILOT_TLS_CERT", ""),
            "key.pem": os.environ.get("MONARCH_SKYPILOT_TLS_KEY", ""),
        }
        for fname, value in secrets.items():
            if not value:
                sys.exit(f"the secret for {fname} is missing: launch through SkyPilotJob")
            path = self.dir / fname
            path.touch(mode=0o600)
            path.write_text(value)
        argv = [sys.executable, "-m", "monarch_gateway", "serve"]
        for name, path in files.items():
            argv += ["--mesh-file", f"{name}={path}"]
        argv += ["--host", "0.0.0.0", "--port", str(self.args.gateway_port)]
        argv += ["--tls-cert", str(self.dir / "cert.pem"), "--tls-key", str(self.dir / "key.pem")]
        argv += ["--token-file", str(self.dir / "token")]
        env: dict[str, str] = {}
        if self.args.sync_port:
            root = f"127.0.0.1:{self.args.sync_port}"
            members = self.dir / "sync-members.json"
            live = self.sync_agent("sync-root", root, "--members-file", str(members))
            argv += ["--sync-agent", root, "--sync-port", str(self.args.sync_port)]
            argv += ["--sync-members-file", str(members)]
            pypath = os.environ.get("PYTHONPATH", "")
            env = {"MONARCH_SYNC_ROOT": str(live), "PYTHONPATH": f"{live}{os.pathsep}{pypath}"}
        digest = hashlib.sha256("".join(secrets.values()).encode()).hexdigest()
        pid, _ = self.ensure("gateway", argv, env, key=digest)
        self.wait_listening("gateway", "127.0.0.1", int(self.args.gateway_port), pid)
        log(f"gateway serving on port {self.args.gateway_port}")

    def run_batch_client(self) -> int:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not all(listening(ip, int(self.args.port)) for ip in self.ips):
            if time.monotonic() > deadline:
                self.fail("worker", "not every node's worker listened")
            time.sleep(0.2)
        env = {**os.environ, "MONARCH_BATCH_JOB": "1"}
        log(f"running the client script {self.args.batch_script}")
        return subprocess.call([sys.executable, self.args.batch_script], env=env)

    def main(self) -> int:
        worker = self.start_worker()
        if self.rank == 0 and self.gateway:
            self.start_gateway()
        if self.args.batch_script is not None:
            if self.rank == 0:
                code = self.run_batch_client()
            else:  # done when the head is (once it has started: it may come up after us)
                head = (self.ips[0], int(self.args.port))
                deadline = time.monotonic() + READY_TIMEOUT_S
                while not listening(*head) and time.monotonic() < deadline:
                    time.sleep(0.2)
                while listening(*head):
                    time.sleep(1.0)
                code = 0
            self.stop()
            return code
        while alive(worker):
            time.sleep(1.0)
        code = next((p.returncode for p in self.children if p.pid == worker), 1)
        self.fail("worker", f"the worker exited (status {code})")
        return 1


def _read_lines(path: Path) -> list[str]:
    try:
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except OSError:
        return []


def run_worker(address: str) -> None:
    from monarch.actor import run_worker_loop_forever

    run_worker_loop_forever(address=address, ca="trust_all_connections")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m monarch_skypilot.node")
    parser.add_argument("--meshes", required=True, help="NAME=COUNT,... in the job's order")
    parser.add_argument("--port", type=int, required=True, help="the Monarch worker port")
    parser.add_argument("--gateway-port", type=int, help="gateway mode: the head serves here")
    parser.add_argument("--sync-port", type=int, help="gateway mode: monarch-sync agents' port")
    parser.add_argument("--batch-script", help="batch mode: the client script the head runs")
    parser.add_argument("--rank", required=True, help="$SKYPILOT_NODE_RANK")
    parser.add_argument("--ips", required=True, help="$SKYPILOT_NODE_IPS (head first)")
    parser.add_argument("--state-dir", help="pid files, logs, secrets (~/.monarch-skypilot)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["worker"]:
        run_worker(args[1])
        return 0
    node = Node(parse(args))

    def terminated(*_: object) -> None:
        node.stop()
        sys.exit(143)

    signal.signal(signal.SIGTERM, terminated)
    return node.main()


if __name__ == "__main__":
    sys.exit(main())
