"""Property test over real agents: random edits pushed through the network stay identical."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sync_helpers import TOKEN, running_agents, snapshot

# The edit generator is shared with the filesystem-level property test.
from sync_ops import apply_op, op

from monarch_sync import push


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(op, max_size=8), st.lists(st.lists(op, min_size=1, max_size=6), max_size=3))
def test_random_edit_sequences_through_agents(
    first: list[tuple[str, str, str, int, int]],
    rounds: list[list[tuple[str, str, str, int, int]]],
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        src = root / "src"
        src.mkdir()
        for o in first:
            apply_op(src, o)

        async def scenario() -> None:
            async with running_agents(root, 3) as agents:
                peers = [a.address for a in agents]
                for edits in [[], *rounds]:
                    for o in edits:
                        apply_op(src, o)
                    report = await push(src, peers, TOKEN, cache_dir=root / "cache")
                    assert report.ok, report.format()
                    want = snapshot(src)
                    for a in agents:
                        assert snapshot(a.synced_path) == want

        asyncio.run(scenario())
