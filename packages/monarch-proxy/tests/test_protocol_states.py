"""Both protocol cores as state machines, driven with literal bytes in every state.

For each side and state, every frame kind is either accepted (as ``states.ACCEPTS`` says) or
fails the connection with a code; ``receive`` never raises. Then the caps, the resume decision
(fencing), JSON that Python's parser would take or choke on, and a seeded fuzz run of 100,000
frames against each core. No sockets, no clock.
"""

from __future__ import annotations

import json
import random
import struct

import pytest

from monarch_proxy.errors import ProtocolError, SessionLimitError, SessionSupersededError
from monarch_proxy.protocol.client import ClientSession
from monarch_proxy.protocol.events import ConnectionFailed, Departed, Hello, Welcomed
from monarch_proxy.protocol.frames import FLAG_MORE, Frame, FrameKind, decode
from monarch_proxy.protocol.names import CloseCode, ErrorCode, Op
from monarch_proxy.protocol.server import Limits, ServerHandshake, ServerSession
from monarch_proxy.protocol.states import ACCEPTS, Side, State

K = FrameKind


def raw(kind: int, meta: bytes = b"", ident: int = 0, seq: int = 0, flags: int = 0) -> bytes:
    """A frame spelled out: the 24-byte header of frames.py, then meta, no payload."""
    return struct.pack("!BBHIQQ", kind, flags, 0, len(meta), ident, seq) + meta


# One well-formed frame of each kind, as a peer would send it (ids and seqs that fit a session
# holding request 1 and nothing acknowledged yet).
SAMPLES: dict[FrameKind, bytes] = {
    K.HELLO: raw(1, b'{"versions":[1,1]}'),
    K.REQUEST: raw(2, b'{"op":"job.meshes"}', ident=1),
    K.RELEASE: raw(3, b'{"handles":[4]}'),
    K.ACK: b"\x04\x00\x00\x00" + b"\x00" * 20,
    K.BYE: b"\x05" + b"\x00" * 23,
    K.WELCOME: raw(
        16,
        b'{"version":1,"session":"s9","resumed":false,"max_frame_size":4096,"last_request":0}',
    ),
    K.REPLY: raw(17, ident=1, seq=1),
    K.FAILURE: raw(18, b'{"category":"gateway","message":"no"}', ident=1, seq=1),
    K.ITEM: raw(19, ident=1, seq=1),
    K.LOG: raw(20, b'{"stream":"stdout"}') + b"hi\n",
    K.ERROR: raw(21, b'{"code":"protocol","message":"bye"}'),
    K.MEMBERS: raw(22, b'{"whole":true}'),
}


def assert_failing(events, match: str, code: int = CloseCode.PROTOCOL_ERROR) -> None:
    assert events and isinstance(events[-1], ConnectionFailed), events
    assert events[-1].close_code == code
    with pytest.raises(ProtocolError, match=match):
        raise events[-1].error


def assert_error_frame_sent(failed: ConnectionFailed, code: ErrorCode) -> dict:
    assert failed.message is not None
    frame = decode(failed.message)
    assert frame.kind is K.ERROR and frame.meta["code"] == code
    return frame.meta


def server_in(state: State):
    """A server-side core in ``state``, and the connection id to feed it from."""
    if state is State.HANDSHAKE:
        return ServerHandshake(), None
    session = ServerSession("s1", 1, limits=Limits(max_frame_size=1 << 20))
    session.attach(7, Hello(1, None, 0))
    if state is State.CLOSED:
        session.receive(b"\xff" * 24, 7)
    assert session.state is state
    return session, 7


def client_in(state: State) -> ClientSession:
    client = ClientSession()
    client.hello()
    client.request(Op.JOB_MESHES, {})
    if state is not State.HANDSHAKE:
        client.receive(SAMPLES[K.WELCOME])
    if state is State.CLOSED:
        client.receive(b"\x00")
    assert client.state is state
    return client


def receive(core, connection, data):
    return core.receive(data) if connection is None else core.receive(data, connection)


@pytest.mark.parametrize("state", list(State))
@pytest.mark.parametrize("kind", list(SAMPLES))
def test_server_accepts_exactly_what_its_table_allows(state, kind):
    core, connection = server_in(state)
    events = receive(core, connection, SAMPLES[kind])
    if state is State.CLOSED:
        assert events == []  # closed: every later byte is ignored
    elif kind in ACCEPTS[Side.SERVER][state]:
        assert not any(isinstance(e, ConnectionFailed) for e in events), events
    else:
        assert_failing(events, kind.name)
        assert core.state is State.CLOSED


@pytest.mark.parametrize("state", list(State))
@pytest.mark.parametrize("kind", list(SAMPLES))
def test_client_accepts_exactly_what_its_table_allows(state, kind):
    client = client_in(state)
    events = client.receive(SAMPLES[kind])
    if state is State.CLOSED:
        assert events == []
    elif kind in ACCEPTS[Side.CLIENT][state]:
        assert not any(isinstance(e, ConnectionFailed) for e in events), events
    else:
        assert_failing(events, kind.name)
        assert client.state is State.CLOSED


def test_server_transitions():
    handshake = ServerHandshake()
    assert handshake.receive(SAMPLES[K.HELLO]) == [Hello(1, None, 0)]
    assert handshake.state is State.OPEN and handshake.receive(SAMPLES[K.HELLO]) == []
    session, connection = server_in(State.OPEN)
    assert session.receive(SAMPLES[K.BYE], connection) == [Departed()]
    assert session.state is State.CLOSED
    session, connection = server_in(State.OPEN)
    assert session.detach(connection) and session.state is State.HANDSHAKE
    assert session.receive(SAMPLES[K.REQUEST], connection) == []  # detached: nothing counts
    assert session.reply(1, {}) != []  # kept for the resume


def test_client_transitions_and_sending_in_the_wrong_state():
    client = client_in(State.OPEN)
    with pytest.raises(AssertionError, match="only before WELCOME"):
        client.hello()
    client.connection_lost()
    assert client.state is State.HANDSHAKE
    assert decode(client.hello()).meta["session"] == "s9"
    client.receive(SAMPLES[K.ERROR])
    assert client.state is State.CLOSED
    with pytest.raises(AssertionError, match="closed"):
        client.request(Op.JOB_MESHES, {})


@pytest.mark.parametrize(
    ("first", "match", "code"),
    [
        (b"", "shorter than", ErrorCode.PROTOCOL),
        ("HELLO", "text messages", ErrorCode.PROTOCOL),
        (SAMPLES[K.REQUEST], "must be HELLO, not REQUEST", ErrorCode.PROTOCOL),
        (raw(1, b'{"versions":[7,9]}'), r"7\.\.9", ErrorCode.VERSION_MISMATCH),
        (raw(1, b'{"versions":[1,1],"last_seq":-1}'), "last_seq", ErrorCode.PROTOCOL),
        (raw(1, b'{"versions":[1,1],"session":5}'), "session", ErrorCode.PROTOCOL),
        (raw(33) + struct.pack("!I", 24) + SAMPLES[K.ACK], "not ACK", ErrorCode.PROTOCOL),
    ],
    ids=["empty", "text", "request", "version", "last_seq", "session", "batch"],
)
def test_bad_hellos_fail_the_connection_with_a_code(first, match, code):
    core = ServerHandshake()
    [failed] = core.receive(first)
    assert isinstance(failed, ConnectionFailed) and core.state is State.CLOSED
    assert match and assert_error_frame_sent(failed, code)
    with pytest.raises(ProtocolError, match=match):
        raise failed.error


# Finding 10: JSON that Python's json module accepts (NaN, Infinity) or that makes it raise
# something other than JSONDecodeError (5,000 digits: ValueError; deep nesting: RecursionError).
HOSTILE_JSON = [
    b'{"versions":[1,Infinity]}',
    b'{"versions":[NaN,1]}',
    b'{"versions":[1,' + b"9" * 5000 + b"]}",
    b'{"versions":' + b"[" * 50_000 + b"]" * 50_000 + b"}",
    b'{"versions":[1,1.5]}',
    b'{"versions":[1,1]',
    b'{"versions":"\xff"}',
    b"[1,1]",
]


@pytest.mark.parametrize("meta", HOSTILE_JSON, ids=range(len(HOSTILE_JSON)))
def test_finding_10_hostile_json_is_a_protocol_error_in_every_core(meta):
    [failed] = ServerHandshake().receive(raw(1, meta))
    assert_error_frame_sent(failed, ErrorCode.PROTOCOL)
    session, connection = server_in(State.OPEN)
    request = raw(2, meta.replace(b"versions", b"op"), 1)
    assert_failing(session.receive(request, connection), "JSON|no op")
    client = client_in(State.HANDSHAKE)
    assert_failing(client.receive(raw(16, meta)), "JSON|WELCOME")


def test_finding_9_a_resume_fences_the_old_connection():
    session, old = server_in(State.OPEN)
    session.receive(SAMPLES[K.REQUEST], old)
    reply = session.reply(1, {}, b"r")
    attached = session.attach(8, Hello(1, "s1", 0))
    assert attached.fenced == old and attached.resumed
    assert attached.messages[1:] == reply  # the new connection gets the reply, once
    # The old connection's requests no longer run, and it gets nothing more.
    assert session.receive(raw(2, b'{"op":"job.meshes"}', ident=2), old) == []
    assert session.detach(old) is False and session.state is State.OPEN
    failed = ServerSession.superseded()
    assert isinstance(failed.error, SessionSupersededError)
    assert assert_error_frame_sent(failed, ErrorCode.SUPERSEDED)
    assert failed.close_code == CloseCode.POLICY_VIOLATION


def test_finding_8_unacked_replies_are_capped():
    session = ServerSession("s1", 1, limits=Limits(max_unacked_bytes=10_000))
    session.attach(1, Hello(1, None, 0))
    for i in range(1, 10):
        session.receive(raw(2, b'{"op":"x"}', ident=i), 1)
    assert session.reply(1, {}, b"x" * 6000) != []
    session.receive(raw(4, seq=1), 1)  # acknowledged: freed
    assert session.unacked_bytes == 0
    session.reply(2, {}, b"x" * 6000)
    [error] = session.reply(3, {}, b"x" * 6000)  # never acknowledged: over the cap
    meta = decode(error).meta
    assert meta["code"] == ErrorCode.UNACKED_LIMIT and meta["limit"] == "unacked_bytes"
    assert meta["max_size"] == 10_000 and meta["size"] > 10_000
    assert session.state is State.CLOSED and session.unacked_bytes == 0
    assert isinstance(session.failure, SessionLimitError)
    assert session.reply(4, {}) == []


def test_finding_8_half_sent_frames_are_capped():
    session = ServerSession("s1", 1, limits=Limits(max_frame_size=1 << 20, max_partial_frames=3))
    session.attach(1, Hello(1, None, 0))
    events = []
    for i in range(1, 5):
        first = raw(2, b'{"op":"x","$size":1000}', ident=i, flags=FLAG_MORE) + b"p"
        events += session.receive(first, 1)
    assert_failing(events, "partial_frames reached 4", CloseCode.POLICY_VIOLATION)
    assert assert_error_frame_sent(events[-1], ErrorCode.PARTIAL_LIMIT)["max_size"] == 3
    # Declared bytes count too: two frames that would hold 3 MiB where 2 are allowed.
    session = ServerSession(
        "s1", 1, limits=Limits(max_frame_size=2 << 20, max_partial_bytes=2 << 20)
    )
    session.attach(1, Hello(1, None, 0))
    big = b'{"op":"x","$size":1500000}'
    events = session.receive(raw(2, big, ident=1, flags=FLAG_MORE), 1)
    events += session.receive(raw(2, big, ident=2, flags=FLAG_MORE), 1)
    assert_failing(events, "partial_bytes", CloseCode.POLICY_VIOLATION)


def test_a_request_split_into_pieces_still_works_under_the_caps():
    session = ServerSession("s1", 1, limits=Limits(max_frame_size=4 << 20, max_partial_frames=1))
    session.attach(1, Hello(1, None, 0))
    pieces = Frame(K.REQUEST, 1, 0, {"op": "x"}, b"z" * (3 << 20)).pieces()
    events = [e for p in pieces for e in session.receive(p, 1)]
    assert len(events) == 1 and len(events[0].payload) == 3 << 20


# Fuzzing: a seeded generator of frames, well formed and not, fed to each core.
FUZZ_FRAMES = 100_000
METAS = [
    b"",
    b"{}",
    b'{"op":"job.meshes"}',
    b'{"handles":[1,2]}',
    b'{"handles":["x"]}',
    b'{"versions":[1,1]}',
    b'{"versions":[1,1],"session":"s1","last_seq":3}',
    b'{"$size":3000}',
    b'{"op":"x","$size":70000}',
    b'{"stream":"stderr"}',
    b'{"code":"protocol","message":"m"}',
    b'{"version":1,"session":"s","resumed":true,"max_frame_size":65536,"last_request":2}',
    b'{"version":1e400,"session":"s","max_frame_size":1}',
    *HOSTILE_JSON[:3],
    b"[" * 2000,
    b"not json",
]


def fuzz_messages(rng: random.Random, n: int):
    kinds = [int(k) for k in FrameKind] + [0, 99, 255]
    for _ in range(n):
        roll = rng.random()
        if roll < 0.05:
            yield rng.randbytes(rng.randrange(0, 60))
            continue
        meta = rng.choice(METAS)
        ident, seq = rng.choice([0, 1, 2, 3, rng.randrange(1 << 64)]), rng.randrange(0, 5)
        flags = FLAG_MORE if rng.random() < 0.15 else 0
        data = raw(rng.choice(kinds), meta, ident, seq, flags) + rng.randbytes(rng.randrange(0, 40))
        if roll < 0.12:  # a bit flipped somewhere
            i = rng.randrange(len(data))
            data = data[:i] + bytes([data[i] ^ (1 << rng.randrange(8))]) + data[i + 1 :]
        elif roll < 0.18:  # a batch of two
            data = raw(33) + struct.pack("!I", len(data)) + data + struct.pack("!I", 24) + raw(4)
        yield data


def test_fuzz_the_server_core():
    rng = random.Random(1212)
    limits = Limits(max_frame_size=1 << 16, max_unacked_bytes=1 << 16, max_partial_frames=4)
    fed = failures = 0
    session, handshake = None, ServerHandshake(max_frame_size=1 << 16)
    for data in fuzz_messages(rng, FUZZ_FRAMES):
        fed += 1
        if session is None:
            events = handshake.receive(data)
            if events and isinstance(events[0], Hello):
                session = ServerSession("s1", 1, limits=limits)
                session.attach(fed, events[0])
                connection = fed
            elif events:
                failures += 1
                handshake = ServerHandshake(max_frame_size=1 << 16)
            continue
        for event in session.receive(data, connection):
            if isinstance(event, ConnectionFailed):
                assert isinstance(event.error, ProtocolError) and event.message is not None
                failures += 1
        if rng.random() < 0.02:
            session.reply(1, {}, b"r" * 900)
        assert session.unacked_bytes <= limits.max_unacked_bytes
        assert session._reassembler.partial_bytes <= limits.max_partial_bytes
        if session.state is not State.OPEN:
            session, handshake = None, ServerHandshake(max_frame_size=1 << 16)
    assert fed == FUZZ_FRAMES and failures > 1000


def test_fuzz_the_client_core():
    rng = random.Random(2121)
    fed = failures = 0
    client = client_in(State.OPEN)
    for data in fuzz_messages(rng, FUZZ_FRAMES):
        fed += 1
        for event in client.receive(data):
            if isinstance(event, ConnectionFailed):
                assert isinstance(event.error, ProtocolError)
                failures += 1
        if client.state is State.CLOSED:
            client = client_in(rng.choice([State.HANDSHAKE, State.OPEN]))
    assert fed == FUZZ_FRAMES and failures > 1000


def test_state_table_covers_every_kind_each_side_receives():
    received = {
        Side.SERVER: {K.HELLO, K.REQUEST, K.RELEASE, K.ACK, K.BYE, K.CHUNK},
        Side.CLIENT: {
            K.WELCOME,
            K.REPLY,
            K.FAILURE,
            K.ITEM,
            K.LOG,
            K.ERROR,
            K.MEMBERS,
            K.FAULT,
            K.CHUNK,
        },
    }
    for side, kinds in received.items():
        assert set().union(*ACCEPTS[side].values()) == kinds
    assert json.loads(json.dumps(list(Op)))  # op names serialize as plain strings
    assert isinstance(Welcomed(1, "s", False, 1).lost, list)


def test_the_protocol_cores_do_no_io():
    import ast
    from pathlib import Path

    import monarch_proxy.protocol as protocol

    for path in Path(protocol.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            for name in names:
                assert name.split(".")[0] not in {"asyncio", "websockets", "socket"}, path
