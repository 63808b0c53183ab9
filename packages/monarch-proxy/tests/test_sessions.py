"""The two session state machines, driven directly: no sockets, no gateway."""

import pytest

from monarch_proxy.errors import FrameTooLargeError, ProtocolError, ProtocolVersionError
from monarch_proxy.protocol.client import ClientSession
from monarch_proxy.protocol.events import (
    ConnectionFailed,
    Departed,
    Failed,
    Hello,
    Logged,
    Rejected,
    Released,
    Replied,
    Requested,
    Streamed,
    Welcomed,
)
from monarch_proxy.protocol.frames import FLAG_MORE, PIECE_SIZE, SIZE_KEY, Frame, FrameKind, decode
from monarch_proxy.protocol.server import Limits, ServerSession, error_frame, negotiate
from monarch_proxy.protocol.states import State

CONNECTION = 1  # the id the server session knows the test's connection by


def feed(session, messages):
    """Deliver one message (bytes) or several (a list) and collect the events."""
    if isinstance(messages, bytes):
        messages = [messages]
    if isinstance(session, ServerSession):
        return [e for message in messages for e in session.receive(message, session.connection)]
    return [event for message in messages for event in session.receive(message)]


def hello_of(client):
    frame = decode(client.hello())
    return Hello(negotiate(frame), frame.meta.get("session"), frame.meta.get("last_seq", 0))


def open_pair(max_frame_size=1 << 20):
    client = ClientSession()
    server = ServerSession("s1", 1, limits=Limits(max_frame_size=max_frame_size))
    attached = server.attach(CONNECTION, hello_of(client))
    [welcome] = feed(client, attached.messages)
    assert isinstance(welcome, Welcomed)
    return client, server


def assert_failing(events, match):
    """The last event fails the connection for a reason matching ``match``."""
    assert events and isinstance(events[-1], ConnectionFailed), events
    with pytest.raises(ProtocolError, match=match):
        raise events[-1].error


def test_handshake_negotiates_the_highest_common_version():
    hello = Frame(FrameKind.HELLO, meta={"versions": [1, 5]})
    assert negotiate(hello, supported=(1, 3)) == 3
    with pytest.raises(ProtocolVersionError, match=r"2\.\.3"):
        negotiate(Frame(FrameKind.HELLO, meta={"versions": [2, 3]}), supported=(1, 1))
    with pytest.raises(ProtocolError, match="versions"):
        negotiate(Frame(FrameKind.HELLO, meta={}))
    with pytest.raises(ProtocolError, match="must be HELLO"):
        negotiate(Frame(FrameKind.REQUEST))


def test_welcome_sets_session_and_size_limit():
    client, _server = open_pair(max_frame_size=4096)
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
        [event] = feed(server, data)
        assert event == Requested(rid, op, {"op": op, "k": op}, event.payload)
        assert bytes(event.payload) == op.encode()
        ids.append(rid)
    # Replies may come back in any order.
    [r3] = feed(client, server.reply(ids[2], {"v": 3}, b"three"))
    [r1] = feed(client, server.failure_reply(ids[0], {"category": "gateway", "message": "no"}))
    assert isinstance(r3, Replied) and r3.id == ids[2] and bytes(r3.payload) == b"three"
    assert isinstance(r1, Failed) and r1.id == ids[0]
    assert client.pending_ids == [ids[1]]


def test_stream_items_then_final_reply():
    client, server = open_pair()
    rid, data = client.request("endpoint.call", {"method": "stream"})
    feed(server, data)
    events = [
        *feed(client, server.item(rid, {}, b"1")),
        *feed(client, server.item(rid, {}, b"2")),
        *feed(client, server.reply(rid, {})),
    ]
    assert [type(e) for e in events] == [Streamed, Streamed, Replied]


def test_acks_free_the_replay_buffer():
    client, server = open_pair()
    rid, data = client.request("x", {})
    feed(server, data)
    feed(client, server.reply(rid, {}, b"r" * 100))
    assert server.unacked_bytes > 100
    ack = client.ack()
    assert ack is not None and client.ack() is None  # nothing new to acknowledge
    feed(server, ack)
    assert server.unacked_bytes == 0


def test_acks_ride_on_requests():
    client, server = open_pair()
    rid, data = client.request("x", {})
    feed(server, data)
    feed(client, server.reply(rid, {}))
    _, data = client.request("y", {})
    assert decode(data[0]).seq == 1
    feed(server, data)
    assert server.unacked_bytes == 0


def test_resume_replays_missed_replies_and_unreceived_requests():
    client, server = open_pair()
    r1, d1 = client.request("one", {})
    r2, d2 = client.request("two", {})
    feed(server, d1)  # d2 was lost with the connection
    lost_reply = server.reply(r1, {"v": 1})  # never reached the client
    del lost_reply

    # Reconnect: the client asks to resume, the server replays, the client re-sends request 2.
    client.connection_lost()
    hello = hello_of(client)
    assert hello.session_id == "s1" and hello.last_seq == 0
    attached = server.attach(2, hello)
    assert attached.resumed and attached.fenced == CONNECTION and attached.replayed == 1
    welcome_message, *missed = attached.messages
    [welcome] = feed(client, welcome_message)
    assert welcome.resumed and welcome.replay == d2
    [replied] = feed(client, missed[0])
    assert isinstance(replied, Replied) and replied.id == r1
    [requested] = feed(server, d2)
    assert requested.id == r2
    # A request sent twice (before and after the drop) is only served once.
    assert feed(server, d2) == []


def test_duplicate_and_out_of_order_reliable_frames():
    client, server = open_pair()
    ids = [client.request(str(i), {})[0] for i in range(3)]
    frames = [server.reply(i, {}) for i in ids]
    assert feed(client, frames[1])  # seq 2 arrives before seq 1
    assert feed(client, frames[0])
    assert feed(client, frames[0]) == []  # replayed duplicate is dropped
    assert decode(client.ack()).seq == 2
    assert feed(client, frames[2])
    assert decode(client.ack()).seq == 3


def test_resume_without_the_session_reports_not_resumed_and_the_lost_requests():
    client, _ = open_pair()
    rid, _ = client.request("x", {})
    client.connection_lost()
    fresh = ServerSession("s2", 1)
    [welcome] = feed(client, fresh.attach(CONNECTION, hello_of(client)).messages)
    assert not welcome.resumed and welcome.replay == [] and welcome.lost == [rid]
    assert client.pending_ids == [] and client.session_id == "s2"


@pytest.mark.parametrize(
    ("frame", "match"),
    [
        (Frame(FrameKind.HELLO, meta={"versions": [1, 1]}), "unexpected HELLO"),
        (Frame(FrameKind.REPLY, 1), "unexpected REPLY"),
        (Frame(FrameKind.REQUEST, 1 << 20, meta={"op": "x"}), "far ahead"),
        (Frame(FrameKind.REQUEST, 1), "no op"),
        (Frame(FrameKind.ACK, seq=9), "acknowledged seq 9"),
        (Frame(FrameKind.RELEASE, meta={"handles": ["a"]}), "handles"),
    ],
)
def test_server_fails_the_connection_on_protocol_violations(frame, match):
    _, server = open_pair()
    assert_failing(feed(server, frame.encode()), match)
    assert server.state is State.CLOSED
    assert feed(server, Frame(FrameKind.ACK).encode()) == []  # later bytes are ignored


def test_release_and_bye_events():
    client, server = open_pair()
    assert feed(server, client.release([3, 4])) == [Released([3, 4])]
    assert feed(server, client.bye()) == [Departed()]


def test_client_rejects_answers_to_unknown_requests_and_surfaces_errors():
    client, server = open_pair()
    [logged] = feed(client, ServerSession.log("stderr", "boom\n"))
    assert logged == Logged("stderr", "boom\n")
    assert_failing(feed(client, server.reply(42, {})), "not pending")
    client, _ = open_pair()
    [rejected] = feed(client, error_frame("version_mismatch", "nope"))
    assert rejected == Rejected(
        "version_mismatch", "nope", {"code": "version_mismatch", "message": "nope"}
    )
    assert client.state is State.CLOSED
    client, _ = open_pair()
    assert_failing(feed(client, Frame(FrameKind.REQUEST, 1).encode()), "sent REQUEST while")


def test_large_frames_travel_in_pieces_and_interleave():
    client, server = open_pair(max_frame_size=64 << 20)
    big_payload = bytes(range(256)) * (14 * 1024)  # 3.5 MiB: four pieces
    big_id, big = client.request("big", {}, big_payload)
    small_id, small = client.request("small", {}, b"s")
    assert len(big) == 4 and len(small) == 1
    assert all(len(piece) <= PIECE_SIZE + 100 for piece in big)
    # The small request overtakes the big one's last pieces.
    events = feed(server, [big[0], big[1], *small, big[2], big[3]])
    assert [e.id for e in events] == [small_id, big_id]
    assert bytes(events[1].payload) == big_payload and SIZE_KEY not in events[1].meta
    assert server.last_request == 2
    # And replies come back the same way.
    [reply] = feed(client, server.reply(big_id, {"ok": 1}, big_payload))
    assert bytes(reply.payload) == big_payload and reply.meta == {"ok": 1}


def test_half_received_frames_are_dropped_when_the_connection_is_lost():
    client, server = open_pair(max_frame_size=64 << 20)
    _rid, pieces = client.request("x", {}, b"y" * (3 << 20))
    feed(server, pieces[:2])
    client.connection_lost()
    server.attach(2, hello_of(client))  # a new connection: the pieces so far are gone
    assert feed(server, pieces) != []  # the replay assembles from the start


@pytest.mark.parametrize("bad", ["orphan", "overflow", "short", "oversize"])
def test_malformed_pieces_are_protocol_errors(bad):
    _, server = open_pair(max_frame_size=2 << 20)
    pieces = Frame(FrameKind.REQUEST, 1, 0, {"op": "x"}, b"z" * (3 << 19)).pieces()
    first, last = decode(pieces[0]), pieces[1]
    if bad == "orphan":
        messages, error = [last], "without a first piece"
    elif bad == "overflow":
        messages, error = [pieces[0], last, last], "without a first piece|do not add up"
    elif bad == "short":
        cut = last[:-10]
        messages, error = [pieces[0], cut], "do not add up"
    else:
        huge = Frame(
            FrameKind.REQUEST,
            1,
            0,
            {"op": "x", SIZE_KEY: 9 << 20},
            b"z",
        ).encode()
        huge = huge[:1] + bytes([FLAG_MORE]) + huge[2:]
        messages, error = [huge], "over the"
    del first
    assert_failing(feed(server, messages), error)
