"""Bad input and faults: every one gets a clear error, and the gateway keeps serving others."""

from __future__ import annotations

import os
import signal
import ssl
import struct
import time

import actors
import pytest
import trustme
from tcp_relay import TcpRelay
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as raw_connect

from monarch_gateway.local import LocalCluster
from monarch_proxy import (
    AuthenticationError,
    FrameTooLargeError,
    GatewayConnection,
    JobState,
    TransportError,
    WorkerLostError,
)
from monarch_proxy.protocol.frames import Frame, FrameKind, decode


def raw(cluster: LocalCluster, token: str | None = None):
    return raw_connect(
        cluster.url,
        additional_headers={"Authorization": f"Bearer {token or cluster.token}"},
        max_size=None,
    )


def still_serves(cluster: LocalCluster) -> None:
    with cluster.connect() as job:
        mesh = job.hosts.spawn_procs(per_host={"gpus": 1}).spawn("probe", actors.Worker)
        assert list(mesh.echo.call("ok").get(timeout=60).values()) == ["ok", "ok"]


@pytest.fixture(scope="module")
def small_frames():
    with LocalCluster(2, gateway_args=["--max-frame-size", str(1 << 20)]).start() as c:
        yield c


@pytest.mark.parametrize("token", ["wrong-token", None])
def test_wrong_or_missing_token_is_refused(cluster, token, monkeypatch):
    monkeypatch.delenv("MONARCH_GATEWAY_TOKEN", raising=False)
    with pytest.raises(AuthenticationError, match="HTTP 401"):
        GatewayConnection.open(cluster.url, token)


def test_malformed_frames_get_a_protocol_error_and_others_keep_working(cluster):
    for garbage in (b"\x02\x00", b"\xff" * 40, Frame(FrameKind.REPLY, 1, 1).encode()):
        ws = raw(cluster)
        ws.send(Frame(FrameKind.HELLO, meta={"versions": [1, 1]}).encode())
        assert decode(ws.recv(timeout=10)).kind is FrameKind.WELCOME
        ws.send(garbage)
        error = decode(ws.recv(timeout=10))
        assert error.kind is FrameKind.ERROR and error.meta["code"] == "protocol"
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=10)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1002
    ws = raw(cluster)
    ws.send(b"not a hello at all")
    assert "bad HELLO" in decode(ws.recv(timeout=10)).meta["message"]
    still_serves(cluster)


def test_unknown_protocol_version_is_refused_with_the_supported_range(cluster):
    ws = raw(cluster)
    ws.send(Frame(FrameKind.HELLO, meta={"versions": [7, 9]}).encode())
    error = decode(ws.recv(timeout=10))
    assert error.meta["code"] == "version_mismatch"
    assert "7..9" in error.meta["message"] and "1..1" in error.meta["message"]
    still_serves(cluster)


def test_oversize_frames(small_frames):
    # A well-behaved client refuses locally, and its connection stays usable.
    with small_frames.connect() as job:
        mesh = job.hosts.spawn_procs(per_host={"gpus": 1}).spawn("big", actors.Worker)
        with pytest.raises(FrameTooLargeError, match="1048576-byte limit"):
            mesh.echo.call(b"x" * (2 << 20))
        assert list(mesh.echo.call("small").get(timeout=60).values()) == ["small"] * 2
    # A client that sends one anyway is disconnected; the gateway keeps serving.
    ws = raw(small_frames)
    ws.send(Frame(FrameKind.HELLO, meta={"versions": [1, 1]}).encode())
    decode(ws.recv(timeout=10))
    ws.send(struct.pack("!BBHIQQ", 2, 0, 0, 0, 1, 0) + b"x" * (3 << 20))
    with pytest.raises(ConnectionClosed) as info:
        ws.recv(timeout=10)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1009
    still_serves(small_frames)


def test_client_that_drops_mid_call_resumes_and_gets_its_result(cluster):
    with TcpRelay(cluster.url) as relay:
        conn = GatewayConnection.open(relay.url, cluster.token)
        job = JobState.fetch(conn)
        mesh = job.hosts.spawn_procs(per_host={"gpus": 1}).spawn("resumer", actors.Worker)
        session = conn.session_id
        slow = mesh.sleep.call(1.5)
        time.sleep(0.5)
        relay.drop_all()  # the connection dies mid-call, as behind a flaky ingress
        assert list(slow.get(timeout=60).values()) == [1.5, 1.5]
        assert relay.accepted >= 2 and conn.session_id == session  # same session, resumed
        # Calls made after the drop work on the resumed session too.
        assert list(mesh.echo.call("after").get(timeout=60).values()) == ["after"] * 2
        job.close()


def test_calls_sent_while_disconnected_are_delivered_after_resume(cluster):
    with TcpRelay(cluster.url) as relay:
        job = JobState.fetch(GatewayConnection.open(relay.url, cluster.token))
        mesh = job.hosts.spawn_procs(per_host={"gpus": 1}).spawn("queued", actors.Worker)
        relay.pause()  # new connections wait; existing ones are cut
        relay.drop_all()
        futures = [mesh.echo.call(i) for i in range(5)]
        time.sleep(0.3)
        relay.resume()
        assert [list(f.get(timeout=60).values()) for f in futures] == [[i, i] for i in range(5)]
        job.close()


def test_session_that_cannot_be_resumed_fails_its_calls(tmp_path):
    with LocalCluster(1, resume_grace_s=0.5).start() as c, TcpRelay(c.url) as relay:
        conn = GatewayConnection.open(relay.url, c.token, resume_grace_s=10)
        job = JobState.fetch(conn)
        mesh = job.hosts.spawn_procs(per_host={"gpus": 1}).spawn("expired", actors.Worker)
        relay.pause()
        relay.drop_all()
        future = mesh.sleep.call_one(0.1)
        time.sleep(1.5)  # longer than the gateway's grace: the session is gone
        relay.resume()
        with pytest.raises(TransportError, match="no longer holds this session"):
            future.get(timeout=30)
        job.close()


def test_worker_killed_mid_call_fails_the_call_naming_the_worker():
    with LocalCluster(2).start() as c, c.connect() as job:
        mesh = job.hosts.spawn_procs(per_host={"gpus": 1}).spawn("victims", actors.Worker)
        on_host1 = mesh.slice(hosts=1).sleep.call_one(60)
        everywhere = mesh.sleep.call(60)
        time.sleep(0.5)
        c.kill_worker(1)
        started = time.monotonic()
        for future in (on_host1, everywhere):
            with pytest.raises(WorkerLostError) as info:
                future.get(timeout=30)
            assert c.addresses[1] in str(info.value) and "host 1" in str(info.value)
        assert time.monotonic() - started < 30
        with pytest.raises(WorkerLostError, match="is dead"):
            mesh.echo.call(1).get(timeout=30)


def test_graceful_shutdown_finishes_running_calls():
    with LocalCluster(1).start() as c:
        job = c.connect()
        mesh = job.hosts.spawn_procs(per_host={"gpus": 1}).spawn("finishing", actors.Worker)
        running = mesh.sleep.call_one(1.0)
        time.sleep(0.2)
        assert c.gateway is not None
        os.kill(c.gateway.pid, signal.SIGTERM)
        assert running.get(timeout=30) == 1.0
        assert c.gateway.wait(timeout=30) == 0
        with pytest.raises(TransportError):
            mesh.echo.call_one(1).get(timeout=30)
        job.close()


def test_tls(tmp_path):
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    args = ["--tls-cert", str(tmp_path / "server.pem"), "--tls-key", str(tmp_path / "server.pem")]
    with LocalCluster(1, gateway_args=args).start() as c:
        assert c.url.startswith("wss://")
        context = ssl.create_default_context()
        ca.configure_trust(context)
        with c.connect(ssl=context) as job:
            mesh = job.hosts.spawn_procs(per_host={"gpus": 1}).spawn("tls", actors.Worker)
            assert mesh.echo.call_one("secure").get(timeout=60) == "secure"
        with pytest.raises(TransportError, match="CERTIFICATE_VERIFY_FAILED"):
            c.connect()  # an untrusted certificate is refused
