"""A slow child must not make a node hold the data it has not yet sent."""

import asyncio
from collections.abc import Iterable

from monarch_sync.downstream import Downstream, _Child
from monarch_sync.tree import TreeNode

TAG = b"t" * 16


class Blobs:
    """A blob source of 100 blobs of 300 bytes (never read here)."""

    blobs = [(bytes(16), 300)] * 100

    def has(self, index: int) -> bool:
        return False

    def read_blob(self, index: int) -> bytes:
        raise AssertionError("not read in these tests")


def slow_child(wants: Iterable[int]) -> tuple[Downstream, _Child]:
    """A node (queue limit 1000 bytes) with one child that wants ``wants`` and reads nothing."""
    ds = Downstream(
        push_id="p",
        token="t",
        sender="me",
        manifest_bytes=b"",
        blob_count=100,
        root="",
        stall_timeout=5,
        queue_limit=1000,
    )
    ds.set_source(Blobs())
    child = _Child(TreeNode("slow:1"), conn=None)  # type: ignore[arg-type]
    ds.children["slow:1"] = child
    ds.relay.add_child("slow:1", wants)
    return ds, child


def test_queue_keeps_indices_only_past_the_limit() -> None:
    async def scenario() -> None:
        ds, child = slow_child(range(100))
        for i in range(100):
            ds.offer_many([(i, b"x" * 300, TAG)])
        held = [data for _, data in child.queue if data is not None]
        assert len(child.queue) == 100  # every blob is still owed to the child
        assert sum(map(len, held)) == child.queued_bytes <= 1000 + 300
        assert child.queue[-1][1] is None  # later ones will be read back from disk

    asyncio.run(scenario())


def test_runs_of_blobs_respect_the_same_limit() -> None:
    async def scenario() -> None:
        ds, child = slow_child(range(0, 100, 2))  # wants the even blobs only
        for start in range(0, 100, 10):
            ds.offer_many([(i, b"x" * 300, TAG) for i in range(start, start + 10)])
        held = [data for _, data in child.queue if data is not None]
        assert [i for i, _ in child.queue] == list(range(0, 100, 2))
        assert sum(map(len, held)) == child.queued_bytes <= 1000 + 300
        assert child.queue[-1][1] is None
        assert ds.relay.pending["slow:1"] == set()

    asyncio.run(scenario())
