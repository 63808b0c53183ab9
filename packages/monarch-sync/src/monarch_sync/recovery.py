"""Failure handling decisions, free of I/O: slow children and dropped connections.

:class:`Recovery` holds the knobs. The client sets them for the whole push: they travel to every
agent in the push header, so all nodes of a tree follow one rule.

**Slow children** (:class:`SlowDetector`). A node samples, for each child, its *backlog* (bytes
queued here for it and not yet taken by its socket) and the bytes it has *taken* so far. A
child is the bottleneck of its subtree when, for ``slow_after`` seconds in a row,

* its backlog stayed at or above ``slow_backlog`` (it always had data waiting here, so what it
  took is what it can take, not what it was offered), and
* what it took over those ``slow_after`` seconds is below ``slow_ratio`` times a reference rate:
  the best of the rate data arrived here (split evenly between the children that are behind,
  as they share this node's uplink), the rate of its fastest sibling over the same window, and
  its own best earlier rate (over a window that started at least ``slow_after`` after its
  first sample, so the burst that fills socket buffers when a connection opens is not taken
  for its speed).

With no reference (say the client's only child, slow from its first byte) nothing is moved: a
healthy chain looks just the same from the client, and moving there would split the client's
uplink for nothing. Each child is reported at most once.

**Dropped connections** (:meth:`Recovery.retry_delay`). A connection to a child that was reached
during this push and then closed, reset or went silent is retried ``reconnects`` times, after
``reconnect_delay`` seconds doubling each time, before the child is reported failed. A child
that answered with an ERROR (it failed, refused the token) or broke the protocol is not.
"""

from __future__ import annotations

import collections
import enum
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

__all__ = ["Loss", "Recovery", "SlowDetector"]

MiB = 1024 * 1024


class Loss(enum.Enum):
    """Why a connection to a child ended."""

    UNREACHABLE = "unreachable"  # could not connect, or no challenge came back
    DROPPED = "dropped"  # closed or reset
    STALLED = "stalled"  # silent, or not reading, for stall_timeout
    ANSWERED = "answered"  # the child sent ERROR: it failed, or refused us
    PROTOCOL = "protocol"  # the child broke the protocol


RETRYABLE = frozenset({Loss.UNREACHABLE, Loss.DROPPED, Loss.STALLED})


@dataclass(frozen=True)
class Recovery:
    """Thresholds for moving a slow child's subtree and for reconnecting to a dropped child.

    ``slow_after`` <= 0 disables moving; ``reconnects`` = 0 disables reconnecting.
    """

    slow_backlog: int = 16 * MiB  # bytes owed to a child that count as "behind"
    slow_after: float = 5.0  # seconds behind and slow before its children are moved
    slow_ratio: float = 0.25  # "slow": taking less than this fraction of the reference rate
    reconnects: int = 2  # attempts to reconnect to a live child after a dropped connection
    reconnect_delay: float = 0.2  # seconds before the first attempt, doubling after each

    @property
    def moves(self) -> bool:
        return self.slow_after > 0 and self.slow_ratio > 0

    @property
    def sample_every(self) -> float:
        """How often a node samples its children's backlog (eight samples per window)."""
        return self.slow_after / 8

    def retry_delay(self, loss: Loss, attempt: int, *, reached: bool) -> float | None:
        """Seconds to wait before reconnect ``attempt`` (1-based) after ``loss``; None: give up.

        ``reached``: the child completed a handshake with us during this push (it was alive).
        A child never reached is reported at once, as before.
        """
        if loss not in RETRYABLE or not reached or attempt > self.reconnects:
            return None
        return self.reconnect_delay * 2 ** (attempt - 1)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: Any) -> Recovery:
        """Settings from a push header; missing or malformed fields keep their defaults."""
        if not isinstance(obj, dict):
            return cls()
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            value = obj.get(f.name)
            kind = int if f.name in ("slow_backlog", "reconnects") else float
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
                kwargs[f.name] = kind(value)
        return cls(**kwargs)


class _Track:
    __slots__ = ("behind_since", "best", "fired", "first", "samples")

    def __init__(self, now: float) -> None:
        self.first = now
        self.samples: collections.deque[tuple[float, int]] = collections.deque()
        self.behind_since: float | None = None
        self.best = 0.0  # best rate times the number of children behind then (see observe)
        self.fired = False


def _window_rate(
    samples: collections.deque[tuple[float, int]], now: float, value: int, window: float
) -> tuple[float | None, float]:
    """Add a sample; the rate over the last ``window`` seconds (None until one has passed)."""
    samples.append((now, value))
    while len(samples) >= 2 and samples[1][0] <= now - window:
        samples.popleft()
    t0, v0 = samples[0]
    if now - t0 < window or now <= t0:
        return None, t0
    return max(0, value - v0) / (now - t0), t0


class SlowDetector:
    """Feed it samples with :meth:`observe`; it names the children that became the bottleneck."""

    def __init__(self, rule: Recovery) -> None:
        self.rule = rule
        self._tracks: dict[str, _Track] = {}
        self._ingress: collections.deque[tuple[float, int]] = collections.deque()

    def forget(self, peer: str) -> None:
        """The child is gone (or reconnected: its counters start again)."""
        self._tracks.pop(peer, None)

    def observe(
        self, now: float, ingress: int, children: Mapping[str, tuple[int, int]]
    ) -> list[str]:
        """One sample at time ``now`` (seconds, monotonic).

        ``ingress``: blob bytes that arrived here so far (0 where all data is local, as at the
        client). ``children``: per child, (backlog bytes, bytes it has taken so far). Returns
        the children that just became slow; each child is returned at most once.
        """
        rule = self.rule
        if not rule.moves:
            return []
        window = rule.slow_after
        in_rate, _ = _window_rate(self._ingress, now, ingress, window)
        for gone in self._tracks.keys() - children.keys():
            del self._tracks[gone]
        rates: dict[str, float] = {}
        starts: dict[str, float] = {}
        behind = 0
        for peer, (backlog, taken) in children.items():
            track = self._tracks.get(peer)
            if track is None:
                track = self._tracks[peer] = _Track(now)
            rate, start = _window_rate(track.samples, now, taken, window)
            if backlog >= rule.slow_backlog:
                behind += 1
                if track.behind_since is None:
                    track.behind_since = now
            else:
                track.behind_since = None
            if rate is not None:
                rates[peer] = rate
                starts[peer] = start
        out: list[str] = []
        share = max(1, behind)  # children that are behind share this node's sending capacity
        for peer, rate in rates.items():
            track = self._tracks[peer]
            sibling = max((r for p, r in rates.items() if p != peer), default=0.0)
            reference = max((in_rate or 0.0) / share, sibling, track.best / share)
            held = track.behind_since is not None and now - track.behind_since >= window
            if held and not track.fired and rate < rule.slow_ratio * reference:
                track.fired = True
                out.append(peer)
            if starts[peer] >= track.first + window:  # past the connection's opening burst
                track.best = max(track.best, rate * share)
        return out
