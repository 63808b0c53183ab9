"""Theory of operation: the connection states of both sides, and the frames each state accepts.

Everything that decides whether a frame is allowed lives in this file, as data (h11's rule 1),
and the table does not care which side we play beyond naming it (rule 2): each side looks up
``ACCEPTS[side][state]`` for a frame kind it received and ``TRANSITIONS[side]`` for the state
that frame leads to.

    HANDSHAKE --HELLO/WELCOME--> OPEN --connection lost--> HANDSHAKE (a resume may follow)
        |                         |
        +--ERROR, bad frame-------+--BYE, ERROR, bad frame, cap passed, fenced--> CLOSED

A session's protocol core starts in HANDSHAKE: the server's waits for HELLO, the client's has
sent it and waits for WELCOME. A frame that the current state does not accept fails the
connection (a protocol error, answered with an ERROR frame and a close code); in CLOSED every
later byte is ignored by construction. CHUNK continues a frame started in the same state, and
BATCH is unpacked before this table is consulted, so neither is a frame of its own here.
"""

from __future__ import annotations

import enum

from monarch_proxy.protocol.frames import FrameKind

__all__ = ["ACCEPTS", "TRANSITIONS", "Side", "State"]


# IntEnums, as in websockets: hashed and compared at C speed on every frame.
class Side(enum.IntEnum):
    CLIENT = 1
    SERVER = 2


class State(enum.IntEnum):
    HANDSHAKE = 1  # no WELCOME yet on this connection (or no connection at all)
    OPEN = 2  # requests and replies flow
    CLOSED = 3  # ended on purpose or failed: nothing more is accepted or sent


K = FrameKind
# Frames each side accepts from its peer, per state.
ACCEPTS: dict[Side, dict[State, frozenset[FrameKind]]] = {
    Side.SERVER: {
        State.HANDSHAKE: frozenset({K.HELLO}),
        State.OPEN: frozenset({K.REQUEST, K.RELEASE, K.ACK, K.BYE, K.CHUNK}),
        State.CLOSED: frozenset(),
    },
    Side.CLIENT: {
        State.HANDSHAKE: frozenset({K.WELCOME, K.ERROR}),
        State.OPEN: frozenset(
            {K.REPLY, K.FAILURE, K.ITEM, K.LOG, K.MEMBERS, K.FAULT, K.ERROR, K.CHUNK}
        ),
        State.CLOSED: frozenset(),
    },
}

# (state, frame received) -> next state; a frame absent here leaves the state as it is.
TRANSITIONS: dict[Side, dict[tuple[State, FrameKind], State]] = {
    Side.SERVER: {
        (State.HANDSHAKE, K.HELLO): State.OPEN,
        (State.OPEN, K.BYE): State.CLOSED,
    },
    Side.CLIENT: {
        (State.HANDSHAKE, K.WELCOME): State.OPEN,
        (State.HANDSHAKE, K.ERROR): State.CLOSED,
        (State.OPEN, K.ERROR): State.CLOSED,
    },
}


def accepts(side: Side, state: State, kind: FrameKind) -> bool:
    return kind in ACCEPTS[side][state]


def next_state(side: Side, state: State, kind: FrameKind) -> State:
    return TRANSITIONS[side].get((state, kind), state)
