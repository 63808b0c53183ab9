"""The slow-child rule and the reconnect policy, driven with synthetic numbers (no I/O)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from monarch_sync.recovery import Loss, Recovery, SlowDetector

MB = 1_000_000
RULE = Recovery(slow_backlog=4 * MB, slow_after=1.0, slow_ratio=0.25)
STEP = 0.1


Feed = Callable[[float], tuple[int, dict[str, tuple[int, int]]]]


def drive(detector: SlowDetector, seconds: float, feed: Feed, t0: float = 0.0) -> list[tuple]:
    """Sample every STEP seconds; ``feed(t)`` gives (ingress, {peer: (backlog, taken)})."""
    fired = []
    for k in range(round(seconds / STEP) + 1):
        t = t0 + k * STEP
        ingress, children = feed(t)
        fired += [(round(t, 2), peer) for peer in detector.observe(t, ingress, children)]
    return fired


def client_child(rate: Callable[[float], float], total: int = 10**12) -> Feed:
    """A child of the client: all data is available at once, it takes ``rate(t)`` bytes/s."""
    taken = 0.0
    last = 0.0

    def feed(t: float) -> tuple[int, dict[str, tuple[int, int]]]:
        nonlocal taken, last
        taken += rate(t) * (t - last)
        last = t
        return 0, {"a": (int(total - taken), int(taken))}

    return feed


def test_healthy_child_with_a_big_backlog_is_not_slow() -> None:
    # The client's only child has the whole tree queued: it is "behind" all along, at a
    # steady rate. Nothing to compare with says it is slow, and it must not be moved.
    assert drive(SlowDetector(RULE), 30, client_child(lambda t: 100 * MB)) == []


def test_rate_noise_is_not_slow() -> None:
    wobble = client_child(lambda t: (100 if int(t) % 2 else 40) * MB)  # 2.5x swings
    assert drive(SlowDetector(RULE), 30, wobble) == []


def test_child_that_becomes_markedly_slower_fires_once_after_the_window() -> None:
    fired = drive(SlowDetector(RULE), 20, client_child(lambda t: 100 * MB if t < 5 else 5 * MB))
    assert [peer for _, peer in fired] == ["a"]
    ((t, _),) = fired
    assert 5.5 <= t <= 6.3  # a window after the drop, not before


def test_opening_burst_is_not_taken_for_the_childs_speed() -> None:
    # 12 MB vanish into socket buffers in the first sample, then a slow link at 1 MB/s: the
    # first window looks 10x faster than the link, but it does not count as the reference.
    def rate(t: float) -> float:
        return 120 * MB if t <= STEP else 1 * MB

    assert drive(SlowDetector(RULE), 30, client_child(rate)) == []


def test_child_keeping_up_is_never_slow_however_low_its_rate() -> None:
    # An agent's child: data arrives at 50 MB/s, of which it wants a tenth and takes it all.
    def feed(t: float) -> tuple[int, dict[str, tuple[int, int]]]:
        return int(50 * MB * t), {"a": (100_000, int(5 * MB * t))}

    assert drive(SlowDetector(RULE), 20, feed) == []


def test_child_slower_than_what_arrives_here_is_slow() -> None:
    # Ingress 50 MB/s; the child takes 5 MB/s, so its backlog grows without bound.
    def feed(t: float) -> tuple[int, dict[str, tuple[int, int]]]:
        return int(50 * MB * t), {"a": (int(45 * MB * t), int(5 * MB * t))}

    fired = drive(SlowDetector(RULE), 10, feed)
    assert [p for _, p in fired] == ["a"]
    assert fired[0][0] <= 2.5  # 4 MB behind after ~0.1 s, then one window


def test_children_sharing_the_uplink_evenly_are_not_slow() -> None:
    # Five children behind, each taking a fifth of the ingress: that is their fair share.
    def feed(t: float) -> tuple[int, dict[str, tuple[int, int]]]:
        return int(80 * MB * t), {p: (int(60 * MB * t), int(16 * MB * t)) for p in "abcde"}

    assert drive(SlowDetector(RULE), 20, feed) == []


def test_slow_sibling_is_found_by_comparison() -> None:
    # The client feeds two children; neither has an earlier rate, one is 20x slower.
    def feed(t: float) -> tuple[int, dict[str, tuple[int, int]]]:
        return 0, {"fast": (10**12, int(100 * MB * t)), "slow": (10**12, int(5 * MB * t))}

    fired = drive(SlowDetector(RULE), 10, feed)
    assert [p for _, p in fired] == ["slow"]


def test_backlog_must_stay_high_for_the_whole_window() -> None:
    # Slow, but its backlog dips under the threshold every 0.8 s: never sustained.
    def feed(t: float) -> tuple[int, dict[str, tuple[int, int]]]:
        backlog = 100_000 if round(t / STEP) % 8 == 0 else 10 * MB
        return int(50 * MB * t), {"a": (backlog, int(1 * MB * t))}

    assert drive(SlowDetector(RULE), 20, feed) == []


def test_forget_starts_a_child_over() -> None:
    det = SlowDetector(RULE)
    feed = client_child(lambda t: 100 * MB if t < 3 else 1 * MB)
    assert drive(det, 2.9, feed) == []
    det.forget("a")  # reconnected: its counters start again, its old best is gone
    assert drive(det, 10, feed, t0=3.0) == []


def test_disabled_rule_never_fires() -> None:
    det = SlowDetector(Recovery(slow_after=0))
    assert drive(det, 20, client_child(lambda t: 100 * MB if t < 5 else 1)) == []


def test_reconnect_policy() -> None:
    r = Recovery(reconnects=2, reconnect_delay=0.1)
    for loss in (Loss.DROPPED, Loss.STALLED, Loss.UNREACHABLE):
        assert r.retry_delay(loss, 1, reached=True) == pytest.approx(0.1)
        assert r.retry_delay(loss, 2, reached=True) == pytest.approx(0.2)
        assert r.retry_delay(loss, 3, reached=True) is None  # bounded
        assert r.retry_delay(loss, 1, reached=False) is None  # never alive in this push
    for loss in (Loss.ANSWERED, Loss.PROTOCOL):  # it failed itself, or misbehaves
        assert r.retry_delay(loss, 1, reached=True) is None
    assert Recovery(reconnects=0).retry_delay(Loss.DROPPED, 1, reached=True) is None


def test_recovery_travels_in_the_header_and_tolerates_garbage() -> None:
    r = Recovery(slow_backlog=123, slow_after=0.5, slow_ratio=0.1, reconnects=5)
    assert Recovery.from_json(r.to_json()) == r
    assert Recovery.from_json(None) == Recovery()
    bad = {"slow_after": "x", "reconnects": -1, "slow_ratio": True, "other": 1}
    assert Recovery.from_json(bad) == Recovery()
