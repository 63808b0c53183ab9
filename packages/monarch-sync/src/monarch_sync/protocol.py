"""The sync connection core, free of I/O: handshake, per-frame MAC and the frame-order table.

Theory of operation
-------------------
One :class:`SyncConnection` per TCP connection, on either side: the AGENT accepts, the
CONNECTOR (the client, or an agent feeding a child) dials. Verbs: :meth:`receive_data` and
:meth:`receive_eof` take bytes in, :meth:`events_received` hands out the frames that passed,
:meth:`send` and :meth:`send_hello` queue frames and :meth:`data_to_send` hands out the bytes
to write. Nothing here reads a clock, a socket or a random source: nonces are arguments.

Handshake and channel. The agent opens with CHALLENGE (its 16-byte nonce; the only frame whose
tag is zeros). The connector answers HELLO = its own nonce | JSON ``{"push_id", "sender"}``.
From the token and both nonces each side derives one key per direction (BLAKE3 ``derive_key``,
then keyed BLAKE3), and from HELLO on *every* frame carries a 16-byte tag over
``seq:u64 | type:u8 | length | payload``, where ``seq`` counts that direction's frames: GMAC,
i.e. AES-GCM under the direction's key with nonce ``seq | type``, the payload as associated
data and nothing encrypted (GCM binds the length). A relay that forwards a challenge and its
answer learns neither key, so it can neither inject, replay, reorder nor drop a frame without
the receiver failing the connection; the connector also learns that the agent holds the token
(its first tagged frame verifies).

Blob data. A BLOBS frame's tag covers its length and its table (:func:`~.frames.blobs_covered`),
whose entries carry each blob's own tag (:class:`BlobTags`): GMAC under a key of the push
(token, push id, root hash), nonce the blob's index. That tag is made once where the blob
enters the push and forwarded unchanged down the tree, and every node checks it (with size and
digest) before it writes or forwards the blob. So every byte is MACed once per node, not once
per hop and direction: chunk digests are XXH3-128, which catch corruption but not forgery, and
the tag is what a relay cannot forge. Why GMAC: on one core here (64-256 KiB, cached) GMAC
through ``cryptography`` (OpenSSL, AES-NI and carry-less multiply) runs at 28-40 GB/s,
AES-GCM-SIV at 1.3, Poly1305 at ~6, keyed BLAKE3 at 1.1-1.4 and HMAC-SHA256 at 1.4; TLS with
pinned certificates would need a certificate per node and copies through the ssl module.
``benchmarks/sync.py --channel`` measures the CPU cost on full pushes.

Limits before authentication: the one frame allowed (CHALLENGE, or HELLO) may be at most
``preauth_max`` bytes and is parsed from a buffer that never holds more than that; anything
else (a HEARTBEAT included) fails the connection. The hello deadline and the connection cap are
the adapter's (clocks and sockets are I/O); see :class:`~monarch_sync.agent.Agent`.

Frame order: :data:`RECEIVE` and :data:`SEND` are the whole state machine, per side: state ->
frame type -> next state. A received frame missing from the table fails the connection
(``ErrorCode.UNEXPECTED``); sending one raises :class:`~monarch_sync.exceptions.InvalidState`
(a bug here), except once the connection is over, when sends are dropped.

:meth:`receive_data` never raises. Malformed input, a bad tag or a frame out of order moves the
connection to FAILED: :attr:`error` holds the :class:`~monarch_sync.exceptions.SyncProtocolError`
(with its :class:`~monarch_sync.frames.ErrorCode`), an ERROR frame is queued for the peer when
keys exist, and every later byte is ignored. The adapter then writes what is queued and closes.
"""

from __future__ import annotations

import enum
import hmac
import json
import re
import struct
from collections.abc import Sequence
from typing import Any

import blake3
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .exceptions import DigestMismatch, FrameTooLarge, InvalidState, SyncProtocolError
from .frames import (
    HEADER,
    MAX_FRAME,
    TAG_SIZE,
    ErrorCode,
    Frame,
    FrameDecoder,
    FrameType,
    Payload,
    blobs_covered,
    blobs_table_size,
    encode_json_payload,
)
from .manifest import chunk_digest

__all__ = [
    "NONCE_SIZE",
    "PREAUTH_MAX",
    "PUSH_ID",
    "RECEIVE",
    "SEND",
    "BlobTags",
    "Side",
    "State",
    "SyncConnection",
    "valid_push_id",
]

NONCE_SIZE = 16
PREAUTH_MAX = 4096  # bytes of payload a frame may have before the peer is authenticated
PUSH_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # push ids name staging folders: nothing else
KEY_CONTEXT = "monarch-sync 2026 channel key"
BLOB_KEY_CONTEXT = "monarch-sync 2026 blob key"
MAC_NONCE = struct.Struct("!QB3x")  # seq, type: 12 bytes, never repeated under one key
BLOB_NONCE = struct.Struct("!I8x")  # a blob's index in the push's blob table
ZERO_TAG = bytes(TAG_SIZE)


def valid_push_id(push_id: object) -> bool:
    return isinstance(push_id, str) and PUSH_ID.fullmatch(push_id) is not None


class Side(enum.Enum):
    AGENT = "agent"  # accepts; sends CHALLENGE, receives the push
    CONNECTOR = "connector"  # dials; answers with HELLO, feeds the push


class State(enum.Enum):
    AWAIT_CHALLENGE = "await_challenge"  # connector: nothing received yet
    SEND_HELLO = "send_hello"  # connector: challenge in, our HELLO not sent yet
    AWAIT_HELLO = "await_hello"  # agent: challenge sent
    AWAIT_MANIFEST = "await_manifest"  # agent: peer authenticated
    AWAIT_FULL_MANIFEST = "await_full_manifest"  # agent: asked for the whole manifest
    RECEIVING = "receiving"  # agent: manifest in, NEED / blobs / results flowing
    AWAIT_NEED = "await_need"  # connector: HELLO and MANIFEST sent
    FEEDING = "feeding"  # connector: NEED in, blobs flowing
    DONE = "done"  # a RESULT or an ERROR ended the exchange
    FAILED = "failed"  # the core failed the connection (see .error)


F, S = FrameType, State

# side -> state -> frame type received -> next state. Everything not listed fails.
RECEIVE: dict[Side, dict[State, dict[FrameType, State]]] = {
    Side.AGENT: {
        S.AWAIT_HELLO: {F.HELLO: S.AWAIT_MANIFEST},
        S.AWAIT_MANIFEST: {F.MANIFEST: S.RECEIVING, F.HEARTBEAT: S.AWAIT_MANIFEST},
        S.AWAIT_FULL_MANIFEST: {
            F.MANIFEST: S.RECEIVING,
            F.HEARTBEAT: S.AWAIT_FULL_MANIFEST,
            F.ERROR: S.DONE,
        },
        S.RECEIVING: {F.BLOBS: S.RECEIVING, F.HEARTBEAT: S.RECEIVING, F.ERROR: S.DONE},
    },
    Side.CONNECTOR: {
        S.AWAIT_CHALLENGE: {F.CHALLENGE: S.SEND_HELLO},
        S.AWAIT_NEED: {
            F.NEED: S.FEEDING,
            F.MANIFEST_WANTED: S.AWAIT_NEED,
            F.NODE_DONE: S.AWAIT_NEED,
            F.HEARTBEAT: S.AWAIT_NEED,
            F.ERROR: S.DONE,
        },
        S.FEEDING: {
            F.NEED: S.FEEDING,
            F.REFETCH: S.FEEDING,
            F.NODE_DONE: S.FEEDING,
            F.HEARTBEAT: S.FEEDING,
            F.RESULT: S.DONE,
            F.ERROR: S.DONE,
        },
    },
}

# side -> state -> frame type sent -> next state.
SEND: dict[Side, dict[State, dict[FrameType, State]]] = {
    Side.AGENT: {
        S.AWAIT_HELLO: {F.CHALLENGE: S.AWAIT_HELLO},
        S.AWAIT_MANIFEST: {F.ERROR: S.DONE},
        S.AWAIT_FULL_MANIFEST: {
            F.HEARTBEAT: S.AWAIT_FULL_MANIFEST,
            F.NODE_DONE: S.AWAIT_FULL_MANIFEST,
            F.ERROR: S.DONE,
        },
        S.RECEIVING: {
            F.NEED: S.RECEIVING,
            F.REFETCH: S.RECEIVING,
            F.NODE_DONE: S.RECEIVING,
            F.HEARTBEAT: S.RECEIVING,
            F.MANIFEST_WANTED: S.AWAIT_FULL_MANIFEST,
            F.RESULT: S.DONE,
            F.ERROR: S.DONE,
        },
    },
    Side.CONNECTOR: {
        S.SEND_HELLO: {F.HELLO: S.AWAIT_NEED},
        S.AWAIT_NEED: {F.MANIFEST: S.AWAIT_NEED, F.ERROR: S.DONE},
        S.FEEDING: {F.BLOBS: S.FEEDING, F.HEARTBEAT: S.FEEDING, F.ERROR: S.DONE},
    },
}

PREAUTH = {Side.AGENT: S.AWAIT_HELLO, Side.CONNECTOR: S.AWAIT_CHALLENGE}
OVER = (S.DONE, S.FAILED)


def _keys(token: str, agent_nonce: bytes, connector_nonce: bytes) -> tuple[AESGCM, AESGCM]:
    """(agent -> connector MAC, connector -> agent MAC) for one connection."""
    base = blake3.blake3(token.encode(), derive_key_context=KEY_CONTEXT).digest()
    nonces = agent_nonce + connector_nonce
    return (
        AESGCM(blake3.blake3(b"a2c" + nonces, key=base).digest()),
        AESGCM(blake3.blake3(b"c2a" + nonces, key=base).digest()),
    )


def _tag(mac: AESGCM, seq: int, ftype: int, covered: Payload) -> bytes:
    """MAC of one frame: GMAC (AES-GCM with what the tag covers as associated data, nothing
    encrypted) under nonce ``seq:u64 | type:u8``; GCM binds the length itself."""
    return mac.encrypt(MAC_NONCE.pack(seq, ftype), b"", covered)


def _covered(ftype: FrameType, parts: tuple[Payload, ...] | list[Payload]) -> Payload:
    """What a sent frame's tag covers: the payload, or a BLOBS frame's length and table."""
    if ftype is F.BLOBS:
        head = parts[0]
        if len(head) < blobs_table_size(head):  # not the table alone: a test's odd split
            head = b"".join(parts)
        return blobs_covered(head, length=sum(len(p) for p in parts))
    return parts[0] if len(parts) == 1 else b"".join(parts)


class BlobTags:
    """The MAC of every blob of one push: GMAC under a key derived from the token, the push id
    and the root hash, nonce the blob's index in the blob table, the data as associated data.

    Made once where a blob enters the push, by the client or by an agent serving it from a
    version it already held, always over bytes first checked against the blob's size and
    digest (:meth:`seal`); forwarded unchanged; checked with size and digest by every node that
    receives it (:meth:`verify`). GCM must never tag two different messages under one nonce
    (that reveals its hash key): here a nonce is one index of one root's blob table, so one
    digest, and only bytes of that digest are ever tagged (an XXH3-128 collision planted in
    the workspace aside, and whoever writes the workspace already decides what runs).
    """

    def __init__(
        self, token: str, push_id: str, root_hash: str, blobs: Sequence[tuple[bytes, int]]
    ) -> None:
        base = blake3.blake3(token.encode(), derive_key_context=BLOB_KEY_CONTEXT).digest()
        key = blake3.blake3(f"{push_id}/{root_hash}".encode(), key=base).digest()
        self._mac = AESGCM(key)
        self.blobs = blobs

    def _tag(self, index: int, data: Payload) -> bytes:
        return self._mac.encrypt(BLOB_NONCE.pack(index), b"", data)

    def seal(self, index: int, data: Payload) -> bytes:
        """The tag of blob ``index``; raises DigestMismatch if ``data`` is not that blob."""
        digest, size = self.blobs[index]
        actual = chunk_digest(data)
        if len(data) != size or actual != digest:
            what = f"blob {index} read to send ({len(data)} of {size} bytes)"
            raise DigestMismatch(what, digest.hex(), actual.hex())
        return self._tag(index, data)

    def verify(self, index: int, data: Payload, tag: Payload) -> bool:
        """``data`` is blob ``index`` as tagged where it entered the push: size, digest, tag."""
        if not 0 <= index < len(self.blobs):
            return False
        digest, size = self.blobs[index]
        return (
            len(data) == size
            and chunk_digest(data) == digest
            and hmac.compare_digest(self._tag(index, data), tag)
        )


class SyncConnection:
    """One side of one sync connection. See the module docstring for the rules."""

    def __init__(
        self,
        side: Side,
        token: str,
        *,
        nonce: bytes,
        max_frame: int = MAX_FRAME,
        preauth_max: int = PREAUTH_MAX,
    ) -> None:
        if not token:
            raise ValueError("a sync connection needs a non-empty token")
        if len(nonce) != NONCE_SIZE:
            raise ValueError(f"a nonce is {NONCE_SIZE} bytes")
        self.side = side
        self.state = PREAUTH[side]
        self.error: SyncProtocolError | None = None
        self.hello: dict[str, Any] | None = None  # agent side: the peer's HELLO, once verified
        self.eof = False
        self._token = token
        self._nonce = nonce
        self._peer_nonce = b""
        self._send_key: AESGCM | None = None
        self._recv_key: AESGCM | None = None
        self._send_seq = self._recv_seq = 0
        self._peer_verified = False
        self._max_frame = max_frame
        self._preauth_max = preauth_max
        self._pre = bytearray()  # the one pre-authentication frame, bounded by preauth_max
        self._decoder = FrameDecoder(max_frame=max_frame)
        self._events: list[Frame] = []
        self._out: list[Payload] = []
        if side is Side.AGENT:
            self._out += [HEADER.pack(F.CHALLENGE, NONCE_SIZE), nonce, ZERO_TAG]

    # -- receiving ----------------------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the network. Never raises; then call :meth:`events_received` and
        :meth:`data_to_send`, and close the connection if :attr:`error` is set."""
        if self.state is S.FAILED or not data:
            return
        try:
            if self.state is PREAUTH[self.side]:
                data = self._receive_preauth(data)
                if not data or self.state is S.FAILED:
                    return
            self._decoder.receive_data(data)
            for frame in self._decoder.frames():
                self._receive_frame(frame)
                if self.state is S.FAILED:
                    return
        except FrameTooLarge as exc:
            self.fail(ErrorCode.TOO_LARGE, str(exc))
        except SyncProtocolError as exc:
            self.fail(ErrorCode.BAD_FRAME, str(exc))
        except (ValueError, struct.error) as exc:  # the catch-all for malformed payloads
            self.fail(ErrorCode.BAD_FRAME, f"malformed frame: {exc}")

    def receive_eof(self) -> None:
        """The peer closed its side. A connection that was not over is then lost (the adapter
        raises PeerLost); nothing is queued."""
        self.eof = True

    def events_received(self) -> list[Frame]:
        """Frames that passed the MAC and the table, in order (each handed out once)."""
        events, self._events = self._events, []
        return events

    def _receive_preauth(self, data: bytes) -> bytes:
        """Buffer the one frame allowed before keys exist; returns the bytes after it."""
        pre = self._pre
        need = HEADER.size
        take = min(len(data), need - len(pre)) if len(pre) < need else 0
        pre += data[:take]
        data = data[take:]
        if len(pre) < need:
            return b""
        ftype, size = HEADER.unpack_from(pre)
        expected = F.CHALLENGE if self.side is Side.CONNECTOR else F.HELLO
        if ftype != expected:
            name = FrameType(ftype).name if ftype in FrameType._value2member_map_ else ftype
            self.fail(ErrorCode.UNEXPECTED, f"expected {expected.name} first, got {name}")
            return b""
        if size > self._preauth_max:
            self.fail(ErrorCode.TOO_LARGE, f"{size}-byte {expected.name} before authentication")
            return b""
        total = need + size + TAG_SIZE
        take = min(len(data), total - len(pre))
        pre += data[:take]
        data = data[take:]
        if len(pre) < total:
            return b""
        body = bytes(pre[need:])
        self._pre = bytearray()
        self._receive_frame(Frame(FrameType(ftype), body[:size], body[size:]))
        return data

    def _receive_frame(self, frame: Frame) -> None:
        if self.state is S.AWAIT_CHALLENGE:
            if len(frame.payload) != NONCE_SIZE:
                self.fail(ErrorCode.BAD_FRAME, "CHALLENGE is not a 16-byte nonce")
                return
            self._peer_nonce = bytes(frame.payload)
            self._decoder.max_frame = self._max_frame
            self.state = S.SEND_HELLO
            self._events.append(frame)
            return
        if self.state is S.AWAIT_HELLO:
            self._receive_hello(frame)
            return
        key = self._recv_key
        covered = blobs_covered(frame.payload) if frame.type is F.BLOBS else frame.payload
        if key is None or not hmac.compare_digest(
            _tag(key, self._recv_seq, frame.type, covered), frame.tag
        ):
            if self._peer_verified:
                self.fail(ErrorCode.BAD_MAC, f"{frame.type.name} frame failed authentication")
            else:
                self.fail(ErrorCode.BAD_TOKEN, "the agent does not hold our token")
            return
        self._recv_seq += 1
        self._peer_verified = True
        nxt = RECEIVE[self.side].get(self.state, {}).get(frame.type)
        if nxt is None:
            self.fail(
                ErrorCode.UNEXPECTED, f"{frame.type.name} not allowed in state {self.state.value}"
            )
            return
        self.state = nxt
        self._events.append(frame)

    def _receive_hello(self, frame: Frame) -> None:
        payload = bytes(frame.payload)
        if len(payload) < NONCE_SIZE:
            self.fail(ErrorCode.BAD_FRAME, "HELLO shorter than its nonce")
            return
        self._peer_nonce = payload[:NONCE_SIZE]
        a2c, c2a = _keys(self._token, self._nonce, self._peer_nonce)
        self._send_key, self._recv_key = a2c, c2a
        if not hmac.compare_digest(_tag(c2a, 0, F.HELLO, payload), frame.tag):
            self.fail(ErrorCode.BAD_TOKEN, "bad token")
            return
        self._recv_seq = 1
        self._peer_verified = True
        try:
            hello = json.loads(payload[NONCE_SIZE:])
        except (ValueError, RecursionError):
            hello = None
        if not isinstance(hello, dict) or not isinstance(hello.get("sender"), str):
            self.fail(ErrorCode.BAD_FRAME, "HELLO is not {push_id, sender}")
            return
        if not valid_push_id(hello.get("push_id")):
            self.fail(ErrorCode.BAD_PUSH_ID, "push id must be 1-64 of A-Z a-z 0-9 _ -")
            return
        self.hello = hello
        self._decoder.max_frame = self._max_frame
        self.state = S.AWAIT_MANIFEST
        self._events.append(Frame(F.HELLO, payload[NONCE_SIZE:], frame.tag))

    # -- sending ------------------------------------------------------------------------
    def send_hello(self, push_id: str, sender: str) -> None:
        """Connector: answer the CHALLENGE event; derives the keys. Raises InvalidState."""
        if self.state is not S.SEND_HELLO:
            raise InvalidState(f"HELLO in state {self.state.value}")
        if not valid_push_id(push_id):
            raise ValueError(f"push id {push_id!r} is not 1-64 of A-Z a-z 0-9 _ -")
        a2c, c2a = _keys(self._token, self._peer_nonce, self._nonce)
        self._send_key, self._recv_key = c2a, a2c
        body = self._nonce + encode_json_payload({"push_id": push_id, "sender": sender})
        self.send(F.HELLO, body)

    def send(self, ftype: FrameType, *parts: Payload) -> None:
        """Queue one frame made of ``parts`` (not copied); then call :meth:`data_to_send`.

        Raises InvalidState if the table does not allow it now; dropped once the connection is
        over (DONE or FAILED), when nothing more should reach the peer.
        """
        if self.state in OVER:
            return
        nxt = SEND[self.side].get(self.state, {}).get(ftype)
        if nxt is None:
            raise InvalidState(f"{self.side.value} cannot send {ftype.name} in {self.state.value}")
        self._queue(ftype, parts)
        self.state = nxt

    def send_json(self, ftype: FrameType, obj: Any) -> None:
        self.send(ftype, encode_json_payload(obj))

    def _queue(self, ftype: FrameType, parts: tuple[Payload, ...]) -> None:
        assert self._send_key is not None, "no keys before the handshake"
        size = sum(len(p) for p in parts)
        tag = _tag(self._send_key, self._send_seq, ftype, _covered(ftype, parts))
        self._send_seq += 1
        self._out.append(HEADER.pack(ftype, size))
        self._out += parts
        self._out.append(tag)

    def data_to_send(self) -> list[Payload]:
        """Buffers to write to the network, in order (each handed out once)."""
        out, self._out = self._out, []
        return out

    # -- failing ------------------------------------------------------------------------
    def fail(self, code: ErrorCode, message: str) -> None:
        """Fail the connection: record the error, tell the peer if keys exist, ignore the rest."""
        if self.state is S.FAILED:
            return
        live = self.state not in OVER
        self.error = SyncProtocolError(f"{code}: {message}", code=code)
        if live and self._send_key is not None:
            self._queue(F.ERROR, (encode_json_payload({"code": code, "message": message}),))
        self.state = S.FAILED
        self._pre = bytearray()
        self._decoder = FrameDecoder(max_frame=0)
