"""The log rate limit for rejected connections, on a synthetic clock."""

from monarch_gateway.logs import RateLimit


def test_a_burst_per_window_then_a_count_of_the_rest():
    limit = RateLimit(burst=3, window_s=60.0)
    allowed = [limit.allow(now=float(i)) for i in range(10)]
    assert [a for a, _ in allowed] == [True] * 3 + [False] * 7
    assert limit.allow(now=61.0) == (True, 7)  # the next window says how many were left out
    assert limit.allow(now=62.0) == (True, 0)
