"""Regressions for issue 12's gateway findings (8-11), each tried as a hostile client would.

One gateway with small per-session caps serves every test; a well-behaved client keeps working
after each attack.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import actors
import pytest
from tcp_relay import TcpRelay
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as raw_connect

from monarch_gateway.local import LocalCluster
from monarch_proxy import (
    GatewayConnection,
    JobState,
    SessionLimitError,
    SessionSupersededError,
)
from monarch_proxy.protocol.frames import (
    FLAG_MORE,
    HEADER,
    Frame,
    FrameKind,
    decode,
    decode_message,
)
from monarch_proxy.protocol.names import CloseCode, ErrorCode

MiB = 1 << 20
CAPS = {"--max-unacked-bytes": 32 * MiB, "--max-outbox-bytes": MiB, "--max-partial-frames": 8}


@pytest.fixture(scope="module")
def capped():
    args = [str(v) for flag, value in CAPS.items() for v in (flag, value)]
    with LocalCluster(1, gateway_args=args).start() as c:
        yield c


def raw(cluster: LocalCluster, token: str | None = None, **options):
    return raw_connect(
        cluster.url,
        additional_headers={"Authorization": f"Bearer {token or cluster.token}"},
        max_size=None,
        **options,
    )


def hello(ws, **meta) -> Frame:
    ws.send(Frame(FrameKind.HELLO, meta={"versions": [1, 1], **meta}).encode())
    return decode_message(ws.recv(timeout=10), max_size=1 << 30)[0]  # WELCOME, maybe + replay


def assert_closed_with(ws, code: ErrorCode, close: CloseCode) -> dict:
    """The next frame is an ERROR with ``code``, then the connection closes with ``close``."""
    error = decode(ws.recv(timeout=30))
    while error.kind is not FrameKind.ERROR:  # replies already on their way come first
        error = decode(ws.recv(timeout=30))
    assert error.meta["code"] == code, error.meta
    with pytest.raises(ConnectionClosed) as info:
        while True:
            ws.recv(timeout=30)
    assert info.value.rcvd is not None and info.value.rcvd.code == close
    return error.meta


def still_serves(cluster: LocalCluster) -> None:
    with cluster.connect() as job:
        mesh = job.hosts.spawn_procs(per_host={"gpus": 1}).spawn("bystander", actors.Worker)
        assert mesh.echo.call_one("ok").get(timeout=60) == "ok"


def gateway_log(cluster: LocalCluster) -> str:
    return (Path(cluster.log_dir) / "gateway.log").read_text()


def rss_mib(cluster: LocalCluster) -> float:
    assert cluster.gateway is not None
    status = Path(f"/proc/{cluster.gateway.pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if "VmRSS" in line)) / 1024


def echo_mesh(job: JobState, name: str):
    return job.hosts.spawn_procs(per_host={"gpus": 1}).spawn(name, actors.Worker)


def test_finding_8_unacked_replies_are_capped_per_session(capped):
    bystander = capped.connect()
    bystander_mesh = echo_mesh(bystander, "calm")
    conn = GatewayConnection.open(capped.url, capped.token)
    job = JobState.fetch(conn)
    mesh = echo_mesh(job, "hoarder")
    conn._session._take_ack = lambda: 0  # a client that reads but never acknowledges
    conn._session.ack = lambda: None
    futures = [mesh.echo.call_one(b"x" * MiB) for _ in range(40)]
    with pytest.raises(SessionLimitError) as info:
        for future in futures:
            future.get(timeout=60)
    assert info.value.limit == "unacked_bytes" and info.value.max_size == 32 * MiB
    assert "--max-unacked-bytes" in str(info.value)
    assert bystander_mesh.echo.call_one("fine").get(timeout=60) == "fine"
    bystander.close()
    job.close()


def test_finding_8_outbox_of_a_client_that_never_reads_is_capped(capped):
    baseline = rss_mib(capped)
    conn = GatewayConnection.open(capped.url, capped.token, on_log=None)
    job = JobState.fetch(conn)
    chatter = job.hosts.spawn_procs(per_host={"gpus": 1}).spawn("deaf", actors.Chatter)
    assert conn._ws is not None
    transport = conn._ws.transport
    transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    conn._loop.call_soon_threadsafe(transport.pause_reading)  # it sends, but never reads
    chatter.chatter.call_one(32 * 1024)  # 32 MiB of output for this session
    waiting = chatter.pause.call_one(30)  # still running when the session is closed
    deadline = time.monotonic() + 60
    while "outbox_bytes reached" not in gateway_log(capped) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "outbox_bytes reached" in gateway_log(capped)
    assert rss_mib(capped) - baseline < 200
    conn._loop.call_soon_threadsafe(transport.resume_reading)
    with pytest.raises(SessionLimitError) as info:
        waiting.get(timeout=60)
    assert info.value.limit == "outbox_bytes" and info.value.max_size == MiB
    job.close()
    still_serves(capped)


def test_finding_8_half_sent_frames_are_capped(capped):
    ws = raw(capped)
    assert hello(ws).kind is FrameKind.WELCOME
    for rid in range(1, 20):  # first pieces only: each announces 1 MiB that never comes
        meta = json.dumps({"op": "job.members", "$size": MiB}).encode()
        try:
            ws.send(HEADER.pack(FrameKind.REQUEST, FLAG_MORE, 0, len(meta), rid, 0) + meta + b"z")
        except ConnectionClosed:  # the cap was hit and the close overtook our sending: read why
            break
    meta = assert_closed_with(ws, ErrorCode.PARTIAL_LIMIT, CloseCode.POLICY_VIOLATION)
    assert meta["limit"] == "partial_frames" and meta["max_size"] == 8
    still_serves(capped)


def test_finding_9_resume_fences_old_connection(capped):
    first = raw(capped)
    welcome = hello(first)
    session = welcome.meta["session"]
    first.send(Frame(FrameKind.REQUEST, 1, 0, {"op": "job.members"}).encode())
    assert decode(first.recv(timeout=10)).kind is FrameKind.REPLY
    second = raw(capped)
    resumed = hello(second, session=session, last_seq=1)
    assert resumed.meta["resumed"] is True and resumed.meta["last_request"] == 1
    assert_closed_with(first, ErrorCode.SUPERSEDED, CloseCode.POLICY_VIOLATION)
    # The new connection gets its replies, each once; the old one got nothing more.
    second.send(Frame(FrameKind.REQUEST, 2, 1, {"op": "job.members"}).encode())
    reply = decode(second.recv(timeout=10))
    assert (reply.kind, reply.id, reply.seq) == (FrameKind.REPLY, 2, 2)
    with pytest.raises(TimeoutError):
        second.recv(timeout=0.5)
    second.close()
    assert session not in gateway_log(capped)  # a session id is a credential: never logged


def test_finding_9_a_fenced_proxy_client_fails_with_a_typed_error(capped):
    conn = GatewayConnection.open(capped.url, capped.token)
    job = JobState.fetch(conn)
    thief = raw(capped)
    welcome = hello(thief, session=conn.session_id, last_seq=0)
    assert welcome.meta.get("resumed") is True, welcome
    with pytest.raises(SessionSupersededError):
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            job.members()
            time.sleep(0.05)
    thief.close()


@pytest.mark.parametrize(
    "meta",
    [
        b'{"versions":[1,Infinity]}',
        b'{"versions":[1,' + b"7" * 5000 + b"]}",
        b'{"versions":' + b"[" * 50_000 + b"]" * 50_000 + b"}",
    ],
    ids=["infinity", "5000-digits", "deep-nesting"],
)
def test_finding_10_malformed_json_gets_a_protocol_error_and_bystanders_see_nothing(capped, meta):
    lines: list[str] = []
    bystander = JobState.fetch(
        GatewayConnection.open(capped.url, capped.token, on_log=lambda _, t: lines.append(t))
    )
    for kind, frame_id in ((FrameKind.HELLO, 0), (FrameKind.REQUEST, 1)):
        ws = raw(capped)
        if kind is FrameKind.REQUEST:
            assert hello(ws).kind is FrameKind.WELCOME
        ws.send(HEADER.pack(kind, 0, 0, len(meta), frame_id, 0) + meta)
        assert_closed_with(ws, ErrorCode.PROTOCOL, CloseCode.PROTOCOL_ERROR)
    bystander.members()
    bystander.close()
    assert lines == []
    assert "Traceback" not in gateway_log(capped)
    still_serves(capped)


def test_finding_10_output_goes_only_to_the_session_whose_actors_wrote_it(capped):
    heard: dict[str, list[str]] = {"a": [], "b": []}
    jobs = {
        name: JobState.fetch(
            GatewayConnection.open(
                capped.url, capped.token, on_log=lambda _, text, n=name: heard[n].append(text)
            )
        )
        for name in heard
    }
    mesh = echo_mesh(jobs["a"], "talker")
    mesh.speak.call("secret-of-a").get(timeout=60)
    for job in jobs.values():
        job.close()  # flushes worker output first
    assert "stdout:secret-of-a" in "".join(heard["a"])
    assert "secret-of-a" not in "".join(heard["b"])


def test_finding_11_healthz_is_liveness_only_without_a_token(capped):
    assert capped.health(None) == {"status": "ok"}
    assert capped.health("guess") == {"status": "ok"}
    details = capped.health(capped.token)
    assert details["workers"] == 1 and "sessions" in details and "dead_workers" in details


def test_finding_11_rejected_connections_are_logged_at_a_bounded_rate(capped):
    before = gateway_log(capped).count("rejected connection")
    for _ in range(60):
        with pytest.raises(Exception, match="401"):
            raw(capped, token="wrong")
    logged = gateway_log(capped).count("rejected connection") - before
    assert 1 <= logged <= 10
    still_serves(capped)


def test_replies_missed_while_disconnected_arrive_packed_with_the_welcome(capped):
    # Found while fencing resumes: the gateway packs WELCOME and the replies it replays into one
    # message, and the client used to read only the WELCOME, so those replies were lost.
    with TcpRelay(capped.url) as relay:
        job = JobState.fetch(GatewayConnection.open(relay.url, capped.token))
        mesh = echo_mesh(job, "missed")
        relay.pause()
        relay.drop_all()
        future = mesh.sleep.call_one(0.2)
        time.sleep(0.3)  # the request is not sent yet: nothing to lose
        relay.resume()
        assert future.get(timeout=30) == 0.2
        slow = mesh.sleep.call_one(1.0)
        time.sleep(0.3)
        relay.pause()
        relay.drop_all()  # the reply is produced while the client is away
        time.sleep(1.5)
        relay.resume()
        assert slow.get(timeout=30) == 1.0
        job.close()
