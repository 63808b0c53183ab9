"""The two session state machines, driven directly: no sockets, no gateway."""

import pytest

from monarch_proxy.errors import FrameTooLargeError, ProtocolError, ProtocolVersionError
from monarch_proxy.protocol.client import ClientSession
from monarch_proxy.protocol.events import (
    Departed,
    Failed,
    Logged,
    Rejected,
    Released,
    Replied,
    Requested,
    Streamed,
    Welcomed,
)
from monarch_proxy.protocol.frames import Frame, FrameKind, decode
from monarch_proxy.protocol.server import ServerSession, error_frame, negotiate


def open_pair(max_frame_size=1 << 20):
    client = ClientSession()
    hello = decode(client.hello())
    server = ServerSession("s1", negotiate(hello), max_frame_size=max_frame_size)
    [welcome] = client.receive(server.welcome(resumed=False))
    assert isinstance(welcome, Welcomed)
    return client, server


def test_handshake_negotiates_the_highest_common_version():
    hello = Frame(FrameKind.HELLO, meta={"versions": [1, 5]})
    assert negotiate(hello, supported=(1, 3)) == 3
    with pytest.raises(ProtocolVersionError, match="2..3"):
        negotiate(Frame(FrameKind.HELLO, meta={"versions": [2, 3]}), supported=(1, 1))
    with pytest.raises(ProtocolError, match="versions"):
        negotiate(Frame(FrameKind.HELLO, meta={}))
    with pytest.raises(ProtocolError, match="must be HELLO"):
        negotiate(Frame(FrameKind.REQUEST))


def test_welcome_sets_session_and_size_limit():
    client, server = open_pair(max_frame_size=4096)
    assert client.session_id == "s1" and client.version == 1 and client.max_frame_size == 4096
    with pytest.raises(FrameTooLargeError):
        client.request("endpoint.call", {}, b"x" * 5000)
    # The refused request used no id: the next one is still 1.
    rid, _ = client.request("job.meshes", {})
    assert rid == 1


def test_requests_are_multiplexed_and_replies_match_by_id():
    client, server = open_pair()
    ids = []
    for op in ("a", "b", "c"):
        rid, data = client.request(op, {"k": op}, op.encode())
        [event] = server.receive(data)
        assert event == Requested(rid, op, {"op": op, "k": op}, event.payload)
        assert bytes(event.payload) == op.encode()
        ids.append(rid)
    # Replies may come back in any order.
    [r3] = client.receive(server.reply(ids[2], {"v": 3}, b"three"))
    [r1] = client.receive(server.failure(ids[0], {"category": "gateway", "message": "no"}))
    assert isinstance(r3, Replied) and r3.id == ids[2] and bytes(r3.payload) == b"three"
    assert isinstance(r1, Failed) and r1.id == ids[0]
    assert client.pending_ids == [ids[1]]


def test_stream_items_then_final_reply():
    client, server = open_pair()
    rid, data = client.request("endpoint.call", {"method": "stream"})
    server.receive(data)
    events = [*client.receive(server.item(rid, {}, b"1")),
              *client.receive(server.item(rid, {}, b"2")),
              *client.receive(server.reply(rid, {}))]
    assert [type(e) for e in events] == [Streamed, Streamed, Replied]


def test_acks_free_the_replay_buffer():
    client, server = open_pair()
    rid, data = client.request("x", {})
    server.receive(data)
    client.receive(server.reply(rid, {}, b"r" * 100))
    assert server.unacked_bytes > 100
    ack = client.ack()
    assert ack is not None and client.ack() is None  # nothing new to acknowledge
    server.receive(ack)
    assert server.unacked_bytes == 0


def test_acks_ride_on_requests():
    client, server = open_pair()
    rid, data = client.request("x", {})
    server.receive(data)
    client.receive(server.reply(rid, {}))
    _, data = client.request("y", {})
    assert decode(data).seq == 1
    server.receive(data)
    assert server.unacked_bytes == 0


def test_resume_replays_missed_replies_and_unreceived_requests():
    client, server = open_pair()
    r1, d1 = client.request("one", {})
    r2, d2 = client.request("two", {})
    server.receive(d1)  # d2 was lost with the connection
    lost_reply = server.reply(r1, {"v": 1})  # never reached the client
    del lost_reply

    # Reconnect: the client asks to resume, the server replays, the client re-sends request 2.
    hello = decode(client.hello())
    assert hello.meta["session"] == "s1" and hello.meta["last_seq"] == 0
    missed = server.resume(hello)
    [welcome] = client.receive(server.welcome(resumed=True))
    assert welcome.resumed and welcome.replay == [d2]
    [replied] = client.receive(missed[0])
    assert isinstance(replied, Replied) and replied.id == r1
    [requested] = server.receive(d2)
    assert requested.id == r2
    # A request sent twice (before and after the drop) is only served once.
    assert server.receive(d2) == []


def test_duplicate_and_out_of_order_reliable_frames():
    client, server = open_pair()
    ids = [client.request(str(i), {})[0] for i in range(3)]
    frames = [server.reply(i, {}) for i in ids]
    assert client.receive(frames[1])  # seq 2 arrives before seq 1
    assert client.receive(frames[0])
    assert client.receive(frames[0]) == []  # replayed duplicate is dropped
    assert decode(client.ack()).seq == 2
    assert client.receive(frames[2])
    assert decode(client.ack()).seq == 3


def test_resume_without_the_session_reports_not_resumed():
    client, _ = open_pair()
    client.request("x", {})
    fresh = ServerSession("s2", 1)
    [welcome] = client.receive(fresh.welcome(resumed=False))
    assert not welcome.resumed and welcome.replay == []


def test_server_rejects_protocol_violations():
    _, server = open_pair()
    with pytest.raises(ProtocolError, match="unexpected HELLO"):
        server.receive(Frame(FrameKind.HELLO, meta={"versions": [1, 1]}).encode())
    with pytest.raises(ProtocolError, match="unexpected REPLY"):
        server.receive(Frame(FrameKind.REPLY, 1).encode())
    with pytest.raises(ProtocolError, match="skips ahead"):
        server.receive(Frame(FrameKind.REQUEST, 5, meta={"op": "x"}).encode())
    with pytest.raises(ProtocolError, match="no op"):
        server.receive(Frame(FrameKind.REQUEST, 1).encode())
    with pytest.raises(ProtocolError, match="acknowledged seq 9"):
        server.receive(Frame(FrameKind.ACK, seq=9).encode())
    with pytest.raises(ProtocolError, match="handles"):
        server.receive(Frame(FrameKind.RELEASE, meta={"handles": ["a"]}).encode())


def test_release_and_bye_events():
    client, server = open_pair()
    assert server.receive(client.release([3, 4])) == [Released([3, 4])]
    assert server.receive(client.bye()) == [Departed()]


def test_client_rejects_answers_to_unknown_requests_and_surfaces_errors():
    client, server = open_pair()
    with pytest.raises(ProtocolError, match="not pending"):
        client.receive(server.reply(42, {}))
    [rejected] = client.receive(error_frame("version_mismatch", "nope"))
    assert rejected == Rejected("version_mismatch", "nope")
    [logged] = client.receive(ServerSession.log("stderr", "boom\n"))
    assert logged == Logged("stderr", "boom\n")
    with pytest.raises(ProtocolError, match="client-only"):
        client.receive(Frame(FrameKind.REQUEST, 1).encode())
