"""The sync connection core, driven with literal bytes: no sockets, no clock, no randomness
(nonces are arguments; the fuzz generator is seeded)."""

from __future__ import annotations

import json
import random
import struct

import pytest

from monarch_sync.exceptions import DigestMismatch, InvalidState
from monarch_sync.frames import ErrorCode, FrameType, blobs_table, decode_blobs, encode_frame
from monarch_sync.manifest import chunk_digest
from monarch_sync.protocol import (
    PREAUTH_MAX,
    RECEIVE,
    BlobTags,
    Side,
    State,
    SyncConnection,
)

TOKEN = "s3cret"
A_NONCE = bytes(range(16))
C_NONCE = bytes(range(16, 32))
F, S = FrameType, State


def wire(core: SyncConnection) -> bytes:
    return b"".join(bytes(p) for p in core.data_to_send())


def agent(token: str = TOKEN) -> SyncConnection:
    return SyncConnection(Side.AGENT, token, nonce=A_NONCE)


def connector(token: str = TOKEN) -> SyncConnection:
    return SyncConnection(Side.CONNECTOR, token, nonce=C_NONCE)


def handshake(push_id: str = "p1") -> tuple[SyncConnection, SyncConnection]:
    """An agent in AWAIT_MANIFEST and a connector in AWAIT_NEED."""
    a, c = agent(), connector()
    c.receive_data(wire(a))
    assert [e.type for e in c.events_received()] == [F.CHALLENGE]
    c.send_hello(push_id, "client")
    a.receive_data(wire(c))
    assert [e.type for e in a.events_received()] == [F.HELLO]
    return a, c


def assert_failing(core: SyncConnection, code: ErrorCode) -> None:
    assert core.state is S.FAILED
    assert core.error is not None and core.error.code == code, core.error


def at(side: Side, state: State) -> tuple[SyncConnection, SyncConnection]:
    """(core on ``side`` in ``state``, its peer with keys), by the frames the table allows."""
    if state is S.AWAIT_HELLO:
        return agent(), connector()
    if state is S.AWAIT_CHALLENGE:
        return connector(), agent()
    if state is S.SEND_HELLO:
        a, c = agent(), connector()
        c.receive_data(wire(a))
        c.events_received()
        return c, a
    a, c = handshake()
    steps = {
        S.AWAIT_MANIFEST: [],
        S.AWAIT_NEED: [],
        S.RECEIVING: [(c, F.MANIFEST)],
        S.FEEDING: [(c, F.MANIFEST), (a, F.NEED)],
        S.AWAIT_FULL_MANIFEST: [(c, F.MANIFEST), (a, F.MANIFEST_WANTED)],
        S.DONE: [(c, F.MANIFEST), (a, F.NEED), (a, F.RESULT)],
    }[state]
    for sender, ftype in steps:
        sender.send(ftype, b"x")
        (a if sender is c else c).receive_data(wire(sender))
    core, peer = (a, c) if side is Side.AGENT else (c, a)
    assert core.state is state
    core.events_received()
    return core, peer


def tagged(peer: SyncConnection, ftype: FrameType, payload: bytes = b"x") -> bytes:
    """A frame with a valid tag from ``peer``, whatever its own table says."""
    if peer._send_key is None:
        return encode_frame(ftype, payload)
    peer._queue(ftype, (payload,))
    return wire(peer)


def test_agent_opens_with_challenge_literal() -> None:
    assert wire(agent()) == b"\x01\x00\x00\x00\x10" + A_NONCE + bytes(16)


def test_connector_answers_hello_with_nonce_json_and_tag() -> None:
    c = connector()
    c.receive_data(b"\x01\x00\x00\x00\x10" + A_NONCE + bytes(16))
    c.send_hello("p1", "client")
    data = wire(c)
    body = C_NONCE + b'{"push_id":"p1","sender":"client"}'
    assert data[:5] == struct.pack("!BI", F.HELLO, len(body))
    assert data[5:-16] == body and len(data) == 5 + len(body) + 16


LIVE = [
    (side, state)
    for side in Side
    for state in State
    if state is not S.FAILED
    and (state in RECEIVE[side] or state in (S.DONE, S.SEND_HELLO))
    and not (side is Side.AGENT and state in (S.SEND_HELLO,))
]


@pytest.mark.parametrize(("side", "state"), LIVE, ids=lambda v: getattr(v, "value", v))
@pytest.mark.parametrize("ftype", list(FrameType), ids=lambda f: f.name)
def test_every_state_follows_the_table(side: Side, state: State, ftype: FrameType) -> None:
    core, peer = at(side, state)
    if state in (S.AWAIT_HELLO, S.AWAIT_CHALLENGE):
        return  # pre-authentication: covered by the tests below
    allowed = RECEIVE[side].get(state, {})
    core.receive_data(tagged(peer, ftype))
    if ftype in allowed:
        assert core.error is None
        assert core.state is allowed[ftype]
        assert [e.type for e in core.events_received()] == [ftype]
    else:
        assert core.state is S.FAILED
        assert core.error is not None
        assert core.error.code in (ErrorCode.UNEXPECTED, ErrorCode.BAD_TOKEN)
        assert core.events_received() == []


@pytest.mark.parametrize("ftype", [f for f in FrameType if f is not F.HELLO])
def test_agent_accepts_only_hello_first(ftype: FrameType) -> None:
    a = agent()
    a.receive_data(encode_frame(ftype, b"{}"))
    assert_failing(a, ErrorCode.UNEXPECTED)
    assert wire(a).startswith(b"\x01")  # only the challenge: no keys, no ERROR


def test_heartbeats_before_hello_fail_the_connection() -> None:
    a = agent()
    a.receive_data(encode_frame(F.HEARTBEAT))
    assert_failing(a, ErrorCode.UNEXPECTED)


def test_preauth_frame_cap_is_checked_on_the_header() -> None:
    a = agent()
    a.receive_data(struct.pack("!BI", F.HELLO, PREAUTH_MAX + 1))
    assert_failing(a, ErrorCode.TOO_LARGE)


def test_wrong_token_fails_both_sides() -> None:
    a, c = agent("other"), connector()
    c.receive_data(wire(a))
    c.events_received()
    c.send_hello("p1", "client")
    a.receive_data(wire(c))
    assert_failing(a, ErrorCode.BAD_TOKEN)
    c.receive_data(wire(a))  # the agent's ERROR does not verify under our token
    assert_failing(c, ErrorCode.BAD_TOKEN)


@pytest.mark.parametrize("push_id", ["../..", "/abs", "", "a" * 65, "a b", "é"])
def test_bad_push_id_is_refused(push_id: str) -> None:
    a, c = agent(), connector()
    c.receive_data(wire(a))
    with pytest.raises(ValueError):
        c.send_hello(push_id, "client")
    c.send_hello("ok", "client")
    hello = wire(c)
    body = C_NONCE + json.dumps({"push_id": push_id, "sender": "client"}).encode()
    from monarch_sync import protocol

    _, c2a = protocol._keys(TOKEN, A_NONCE, C_NONCE)
    forged = encode_frame(F.HELLO, body, protocol._tag(c2a, 0, F.HELLO, body))
    assert hello != forged
    a.receive_data(forged)
    assert_failing(a, ErrorCode.BAD_PUSH_ID)


def test_relay_frame_after_handshake_fails_with_bad_mac() -> None:
    a, _ = handshake()
    a.receive_data(encode_frame(F.MANIFEST, b"the relay's tree"))  # any tag the relay picks
    assert_failing(a, ErrorCode.BAD_MAC)
    assert a.events_received() == []
    err = wire(a)
    assert err[0] == F.ERROR  # tagged for the real peer
    a.receive_data(b"\x00" * 100)  # ignored from now on
    assert a.events_received() == [] and wire(a) == b""


def test_replayed_frame_fails_with_bad_mac() -> None:
    a, c = handshake()
    c.send(F.MANIFEST, b"m")
    frame = wire(c)
    a.receive_data(frame)
    assert a.state is S.RECEIVING
    a.receive_data(frame)
    assert_failing(a, ErrorCode.BAD_MAC)


def blobs_frame(c: SyncConnection, tags: BlobTags, index: int = 0) -> bytearray:
    """A BLOBS frame from ``c`` (made FEEDING) carrying blob ``index`` with its tag."""
    data = BLOB_DATA[index]
    c.state = S.FEEDING  # skip the NEED round trip
    c.send(F.BLOBS, blobs_table([(index, len(data), tags.seal(index, data))]), data)
    return bytearray(wire(c))


BLOB_DATA = [b"abc", b"xyz"]
BLOBS = [(chunk_digest(d), len(d)) for d in BLOB_DATA]
TABLE = 5 + 2  # frame header, blob count: the table's entries start here


@pytest.mark.parametrize(
    "offset",
    [TABLE + 3, TABLE + 7, TABLE + 8, TABLE + 23],  # index, size, first and last tag byte
)
def test_blobs_frame_tag_covers_the_table_and_the_blob_tags(offset: int) -> None:
    a, c = at(Side.AGENT, S.RECEIVING)
    frame = blobs_frame(c, BlobTags(TOKEN, "p1", "root", BLOBS))
    frame[offset] ^= 1
    a.receive_data(bytes(frame))
    assert_failing(a, ErrorCode.BAD_MAC)


def test_blobs_frame_length_is_covered() -> None:
    a, c = at(Side.AGENT, S.RECEIVING)
    frame = blobs_frame(c, BlobTags(TOKEN, "p1", "root", BLOBS))
    longer = frame[:1] + struct.pack("!I", len(frame) - 5 - 16 + 1) + frame[5:-16] + b"!"
    a.receive_data(bytes(longer + frame[-16:]))
    assert_failing(a, ErrorCode.BAD_MAC)


def test_blob_data_is_covered_by_its_own_tag_not_the_frame_tag() -> None:
    a, c = at(Side.AGENT, S.RECEIVING)
    tags = BlobTags(TOKEN, "p1", "root", BLOBS)
    frame = blobs_frame(c, tags)
    frame[-17] ^= 1  # the last data byte: the frame passes, the blob does not
    a.receive_data(bytes(frame))
    assert a.error is None
    ((index, data, tag),) = decode_blobs(a.events_received()[-1])
    assert bytes(data) == b"abb" and not tags.verify(index, data, tag)
    assert tags.verify(0, b"abc", tag)


def test_blob_tags_bind_token_push_root_index_and_bytes() -> None:
    tags = BlobTags(TOKEN, "p1", "root", BLOBS)
    tag = tags.seal(0, b"abc")
    assert tags.verify(0, b"abc", tag)
    assert not tags.verify(0, b"abd", tag)
    assert not tags.verify(1, b"xyz", tag)  # another blob's slot
    assert not tags.verify(7, b"abc", tag)  # past the table
    for other in (
        BlobTags("other", "p1", "root", BLOBS),
        BlobTags(TOKEN, "p2", "root", BLOBS),
        BlobTags(TOKEN, "p1", "other-root", BLOBS),
    ):
        assert not other.verify(0, b"abc", tag)
    # Only bytes of the blob's digest and size are ever tagged (one message per GCM nonce).
    with pytest.raises(DigestMismatch):
        tags.seal(0, b"abd")
    with pytest.raises(DigestMismatch):
        tags.seal(0, b"abcd")


def test_send_outside_the_table_raises_and_after_the_end_is_dropped() -> None:
    a, c = handshake()
    with pytest.raises(InvalidState):
        a.send(F.BLOBS, b"")
    with pytest.raises(InvalidState):
        c.send(F.NEED, b"")
    a.send(F.ERROR, b"{}")
    assert a.state is S.DONE
    a.send(F.HEARTBEAT)
    assert wire(a)[0] == F.ERROR  # the heartbeat was dropped


@pytest.mark.parametrize("chunking", ["whole", "bytewise", "trailing"])
def test_an_exchange_parses_the_same_in_any_chunking(chunking: str) -> None:
    a, c = agent(), connector()
    c.receive_data(wire(a))
    c.events_received()
    c.send_hello("p1", "client")
    c.send(F.MANIFEST, b"m" * 300)
    data = wire(c)
    if chunking == "whole":
        a.receive_data(data)
    elif chunking == "bytewise":
        for i in range(len(data)):
            a.receive_data(data[i : i + 1])
    else:
        c.state = S.FEEDING
        c.send(F.HEARTBEAT)
        extra = wire(c)
        a.receive_data(data + extra[:3])
        assert a.state is S.RECEIVING
        a.receive_data(extra[3:])
    assert a.error is None
    types = [e.type for e in a.events_received()]
    assert types[:2] == [F.HELLO, F.MANIFEST]


def _fuzz_frame(rnd: random.Random, peer: SyncConnection) -> bytes:
    kind = rnd.random()
    ftype = rnd.choice(list(FrameType))
    payload = rnd.randbytes(rnd.randrange(0, 48))
    if kind < 0.5:  # well tagged, any type: exercises the table
        return tagged(peer, ftype, payload)
    if kind < 0.8:  # well tagged, then one byte flipped
        data = bytearray(tagged(peer, ftype, payload))
        data[rnd.randrange(len(data))] ^= 1 << rnd.randrange(8)
        return bytes(data)
    if kind < 0.95:  # untagged (a relay)
        return encode_frame(ftype, payload, rnd.randbytes(16))
    return rnd.randbytes(rnd.randrange(1, 40))  # noise, odd types and lengths


def test_fuzz_100k_frames_never_raise() -> None:
    rnd = random.Random(12)
    frames = failures = 0
    while frames < 100_000:
        side = rnd.choice(list(Side))
        state = rnd.choice([s for sd, s in LIVE if sd is side])
        core, peer = at(side, state)
        for _ in range(20):  # then a fresh core: noise often leaves a long frame pending
            if core.state is S.FAILED or frames >= 100_000:
                break
            data = _fuzz_frame(rnd, peer)
            if rnd.random() < 0.3 and len(data) > 2:  # split across receive_data calls
                cut = rnd.randrange(1, len(data))
                core.receive_data(data[:cut])
                core.receive_data(data[cut:])
            else:
                core.receive_data(data)
            frames += 1
            for event in core.events_received():
                assert event.type in FrameType
            if core.state is S.DONE:
                break
        if core.state is S.FAILED:
            failures += 1
            assert core.error is not None and core.error.code in set(ErrorCode)
    assert failures > 1000  # the generator does reach failing paths
