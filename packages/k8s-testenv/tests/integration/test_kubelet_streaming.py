"""The kubelet's streaming API through the real API server: port-forward, exec, cp, attach.

Clients are the ones users run: kubectl v1.37 (WebSocket to the API server, which speaks SPDY
to the kubelet) and the official Python client (WebSocket through to the kubelet for
port-forward, and for exec when it offers only the v4 protocol).
"""

from __future__ import annotations

import fcntl
import hashlib
import http.client
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from k8s_testenv import Cluster
from k8s_testenv.testing import pid_alive, wait_until
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from kubernetes.stream import portforward, stream

pytestmark = pytest.mark.timeout(180)

PODSERVER = str(Path(__file__).with_name("podserver.py"))
BIG = 64 << 20  # 64 MiB
BIG_BODY = bytes(range(256)) * (BIG // 256)  # what podserver's GET /bytes/BIG answers


def web_pod(workdir: str) -> dict[str, Any]:
    """An HTTP server, a container reading its stdin, and one that has already exited."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "web"},
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "server",
                    "image": "python",
                    "command": [sys.executable, PODSERVER],
                    "workingDir": workdir,
                    "env": [
                        {
                            "name": "POD_IP",
                            "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}},
                        },
                        {"name": "MY_VAR", "value": "from-the-spec"},
                    ],
                },
                {"name": "cat", "image": "busybox", "command": ["cat"], "stdin": True},
                {"name": "done", "image": "busybox", "command": ["true"]},
            ],
        },
    }


@pytest.fixture
def web(k8s_cluster: Cluster, k8s_api: client.ApiClient, k8s_namespace: str, tmp_path: Path) -> str:
    """Start the web pod in the test's namespace and wait until the server answers."""
    core = client.CoreV1Api(k8s_api)
    core.create_namespaced_pod(k8s_namespace, web_pod(str(tmp_path)))

    def settled() -> bool:
        pod = core.read_namespaced_pod("web", k8s_namespace)
        states = {s.name: s.state for s in pod.status.container_statuses or []}
        if not (states.get("done") and states["done"].terminated):
            return False
        if not all(states.get(c) and states[c].running for c in ("server", "cat")):
            return False
        try:
            urllib.request.urlopen(f"http://{pod.status.pod_ip}:8080/", timeout=2).close()
        except OSError:
            return False
        return True

    wait_until(settled, timeout=60, what="web pod serving")
    return k8s_namespace


def get(conn: http.client.HTTPConnection, path: str) -> bytes:
    conn.request("GET", path)
    resp = conn.getresponse()
    assert resp.status == 200
    return resp.read()


# -- port-forward ---------------------------------------------------------------------------


def test_python_client_port_forward_streams_concurrently_and_reports_a_closed_port(
    k8s_cluster: Cluster, web: str
) -> None:
    def fetch(path: str) -> bytes:
        # one ApiClient per thread: stream/portforward swap the client's request method
        with k8s_cluster.api_client() as api:
            core = client.CoreV1Api(api)
            pf = portforward(core.connect_get_namespaced_pod_portforward, "web", web, ports="8080")
            conn = http.client.HTTPConnection("web", 8080, timeout=60)
            conn.sock = pf.socket(8080)
            try:
                return get(conn, path)
            finally:
                conn.close()
                pf.close()

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(fetch, ["/"] * 4 + [f"/bytes/{BIG}"]))
    assert all(json.loads(a)["env"]["MY_VAR"] == "from-the-spec" for a in answers[:4])
    assert answers[4] == BIG_BODY

    # one connection, two ports: nothing listens on 9999, and 8080 keeps working
    core = client.CoreV1Api(k8s_cluster.api_client())
    pf = portforward(core.connect_get_namespaced_pod_portforward, "web", web, ports="9999,8080")
    try:
        closed = pf.socket(9999)
        closed.settimeout(30)
        assert closed.recv(1) == b""
        error = wait_until(lambda: pf.error(9999), timeout=30, what="the error stream")
        assert "error forwarding port 9999 to pod" in error
        assert "connect: connection refused" in error
        conn = http.client.HTTPConnection("web", 8080, timeout=30)
        conn.sock = pf.socket(8080)
        assert json.loads(get(conn, "/"))["hostname"] == "web"
        assert pf.error(8080) is None
    finally:
        pf.close()
        core.api_client.close()


def kubectl_port_forward(
    cluster: Cluster, namespace: str, port: int
) -> tuple[subprocess.Popen[bytes], int]:
    """Start ``kubectl port-forward pod/web :<port>``; return it and the local port it picked."""
    proc = subprocess.Popen(
        [str(cluster.kubectl_path), "-n", namespace, "port-forward", "pod/web", f":{port}"],
        env=cluster.kubectl_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    match = re.search(rf"Forwarding from 127\.0\.0\.1:(\d+) -> {port}", line)
    if match is None:
        proc.kill()
        raise AssertionError(f"kubectl port-forward printed {line!r}")
    return proc, int(match.group(1))


@pytest.fixture
def kubectl_forward(
    k8s_cluster: Cluster, web: str
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    proc, local = kubectl_port_forward(k8s_cluster, web, 8080)
    try:
        yield proc, local
    finally:
        proc.terminate()
        proc.wait(10)


def test_kubectl_port_forward_carries_concurrent_requests_and_64_mib_both_ways(
    kubectl_forward: tuple[subprocess.Popen[bytes], int],
) -> None:
    _, port = kubectl_forward

    def fetch(path: str) -> bytes:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            return get(conn, path)
        finally:
            conn.close()

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(fetch, ["/"] * 7 + [f"/bytes/{BIG}"]))
    assert len({json.loads(a)["pid"] for a in answers[:7]}) == 1
    assert answers[7] == BIG_BODY

    upload = os.urandom(BIG)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/sha256", body=upload)
    assert conn.getresponse().read().decode() == hashlib.sha256(upload).hexdigest()
    conn.close()


def test_kubectl_port_forward_to_a_closed_port_reports_the_kubelets_error(
    k8s_cluster: Cluster, web: str
) -> None:
    proc, port = kubectl_port_forward(k8s_cluster, web, 9999)
    err = b""
    try:
        with pytest.raises((ConnectionError, http.client.HTTPException)):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            get(conn, "/")
        # kubectl prints the kubelet's error (and then, upstream, gives up on the connection;
        # when it exits is kubectl's business and varies with load, so read until the error)
        assert proc.stderr is not None
        deadline = time.monotonic() + 60
        while b"connection refused" not in err and time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stderr], [], [], 1)
            if ready:
                chunk = os.read(proc.stderr.fileno(), 65536)
                if not chunk:
                    break
                err += chunk
    finally:
        proc.kill()
        proc.wait()
    assert "error forwarding port 9999 to pod" in err.decode()
    assert "connect: connection refused" in err.decode()


# -- exec -----------------------------------------------------------------------------------


def test_kubectl_exec_runs_in_the_container_and_returns_the_exit_code(
    k8s_cluster: Cluster, k8s_api: client.ApiClient, web: str, tmp_path: Path
) -> None:
    script = 'echo "$MY_VAR $(hostname) $(pwd)"; exit 3'
    done = k8s_cluster.kubectl("-n", web, "exec", "web", "-c", "server", "--", "sh", "-c", script)
    assert done.returncode == 3, done.stderr
    assert done.stdout.decode().split() == ["from-the-spec", "web", str(tmp_path)]
    assert b"command terminated with exit code 3" in done.stderr

    data = os.urandom(1 << 20)
    done = k8s_cluster.kubectl(
        "-n", web, "exec", "-i", "web", "-c", "server", "--", "sha256sum", input=data
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()

    done = k8s_cluster.kubectl("-n", web, "exec", "web", "-c", "server", "--", "no-such-command")
    assert done.returncode == 1
    assert b'exec: "no-such-command": executable file not found in $PATH' in done.stderr

    # a container that is not running: the kubelet's answer
    done = k8s_cluster.kubectl("-n", web, "exec", "web", "-c", "done", "--", "true")
    assert done.returncode == 1
    assert b'container not found ("done")' in done.stderr

    # a container the pod does not have: the API server's answer, 400
    with pytest.raises(ApiException) as err:
        client.CoreV1Api(k8s_api).connect_get_namespaced_pod_exec(
            "web", web, container="nope", command=["true"], stdout=True
        )
    assert err.value.status == 400
    assert "container nope is not valid for pod web" in str(err.value.body)


def test_an_exec_dies_with_its_container(k8s_cluster: Cluster, web: str) -> None:
    """Like every process of a container, a command exec'd into it ends when the pod goes."""
    proc = subprocess.Popen(
        [str(k8s_cluster.kubectl_path), "-n", web, "exec", "web", "-c", "server", "--",
         "sh", "-c", "echo $$; exec sleep 300"],
        env=k8s_cluster.kubectl_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        pid = int(proc.stdout.readline())
        assert pid_alive(pid)
        done = k8s_cluster.kubectl("-n", web, "delete", "pod", "web", "--wait=false")
        assert done.returncode == 0, done.stderr
        wait_until(lambda: not pid_alive(pid), timeout=30, what="the exec'd sleep killed")
        assert proc.wait(30) == 137  # SIGKILL, as kubectl reports it
    finally:
        proc.kill()
        proc.wait()


def test_kubectl_exec_with_a_tty_sees_a_terminal_of_the_clients_size(
    k8s_cluster: Cluster, web: str
) -> None:
    parent, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 77, 0, 0))
    proc = subprocess.Popen(
        [str(k8s_cluster.kubectl_path), "-n", web, "exec", "-it", "web", "-c", "server", "--",
         "sh", "-c", "tty; stty size; exit 5"],
        env=k8s_cluster.kubectl_env(), stdin=child, stdout=child, stderr=subprocess.PIPE,
    )  # fmt: skip
    os.close(child)
    output = b""
    try:
        while True:
            try:
                chunk = os.read(parent, 4096)
            except OSError:  # EIO: kubectl closed the terminal
                break
            if not chunk:
                break
            output += chunk
    finally:
        os.close(parent)
        proc.wait(30)
    assert proc.returncode == 5
    lines = output.decode().split()
    assert lines[0].startswith("/dev/pts/")
    assert lines[1:3] == ["33", "77"]


def test_python_client_exec_over_both_protocols(k8s_api: client.ApiClient, web: str) -> None:
    core = client.CoreV1Api(k8s_api)
    command = ["sh", "-c", "echo out; echo err >&2; exit 7"]
    # v5 is translated to SPDY by the API server; v4 alone reaches the kubelet as a WebSocket
    for headers in ({}, {"sec-websocket-protocol": "v4.channel.k8s.io"}):
        resp = stream(
            core.connect_get_namespaced_pod_exec, "web", web, container="server",
            command=command, stdout=True, stderr=True, stdin=False, tty=False,
            _preload_content=False, _headers=headers,
        )  # fmt: skip
        resp.run_forever(timeout=30)
        assert resp.read_stdout() == "out\n"
        assert resp.read_stderr() == "err\n"
        assert resp.returncode == 7
    resp = stream(
        core.connect_get_namespaced_pod_exec, "web", web, container="server",
        command=["sh", "-c", "test -t 0 && echo terminal"], stdout=True, stderr=False,
        stdin=False, tty=True, _preload_content=False,
    )  # fmt: skip
    resp.run_forever(timeout=30)
    assert resp.read_stdout().strip() == "terminal"
    assert resp.returncode == 0


# -- cp and attach --------------------------------------------------------------------------


def test_kubectl_cp_copies_a_folder_in_and_out(
    k8s_cluster: Cluster, web: str, tmp_path: Path
) -> None:
    source = tmp_path / "source"
    (source / "sub").mkdir(parents=True)
    (source / "a.txt").write_text("alpha\n")
    (source / "sub" / "b.bin").write_bytes(os.urandom(300_000))
    inside = tmp_path / "in-pod"
    inside.mkdir()
    done = k8s_cluster.kubectl("cp", str(source), f"{web}/web:{inside}/copy", "-c", "server")
    assert done.returncode == 0, done.stderr
    listed = k8s_cluster.kubectl(
        "-n", web, "exec", "web", "-c", "server", "--", "cat", f"{inside}/copy/a.txt"
    )
    assert listed.stdout == b"alpha\n"

    back = tmp_path / "back"
    done = k8s_cluster.kubectl("cp", f"{web}/web:{inside}/copy", str(back), "-c", "server")
    assert done.returncode == 0, done.stderr
    assert (back / "a.txt").read_text() == "alpha\n"
    assert (back / "sub" / "b.bin").read_bytes() == (source / "sub" / "b.bin").read_bytes()


def test_attach_streams_the_containers_output_and_feeds_its_stdin(
    k8s_api: client.ApiClient, web: str
) -> None:
    core = client.CoreV1Api(k8s_api)
    resp = stream(
        core.connect_get_namespaced_pod_attach, "web", web, container="cat",
        stdin=True, stdout=True, stderr=False, tty=False, _preload_content=False,
    )  # fmt: skip
    try:
        seen = ""
        deadline = time.monotonic() + 30
        while "ping-1" not in seen and time.monotonic() < deadline:
            resp.write_stdin("ping-1\n")  # again, in case the first came before the tail
            resp.update(timeout=1)
            seen += resp.read_stdout()
        assert "ping-1" in seen
    finally:
        resp.close()
    # detaching leaves the container running
    pod = core.read_namespaced_pod("web", web)
    (cat,) = [s for s in pod.status.container_statuses if s.name == "cat"]
    assert cat.state.running is not None
