"""Where blob tags come from: forwarded as they arrived, or made over digest-checked bytes."""

import asyncio

import pytest

from monarch_sync.downstream import Downstream
from monarch_sync.exceptions import DigestMismatch
from monarch_sync.manifest import chunk_digest
from monarch_sync.protocol import BlobTags

DATA = [b"held before this push", b"received in this push"]
BLOBS = [(chunk_digest(d), len(d)) for d in DATA]


class Held:
    """An agent's blob source: blob 0 from a version it held, whose bytes may have changed."""

    blobs = BLOBS

    def __init__(self, on_disk: bytes) -> None:
        self.on_disk = on_disk

    def has(self, index: int) -> bool:
        return True

    def read_blob(self, index: int) -> bytes:
        return self.on_disk


def node(source: Held) -> Downstream:
    ds = Downstream(push_id="p", token="t", sender="me", manifest_bytes=b"", blob_count=2,
                    root="r", stall_timeout=5)  # fmt: skip
    ds.set_source(source)
    return ds


def test_a_received_tag_is_forwarded_unchanged() -> None:
    async def scenario() -> None:
        ds = node(Held(DATA[0]))
        upstream = BlobTags("t", "p", "r", BLOBS).seal(1, DATA[1])
        ds.offer_many([(1, DATA[1], upstream)])
        assert ds._tag(1, DATA[1]) == upstream

    asyncio.run(scenario())


def test_a_held_blob_is_tagged_only_if_it_still_matches_its_digest() -> None:
    async def scenario() -> None:
        ds = node(Held(DATA[0]))
        tag = ds._tag(0, DATA[0])
        assert BlobTags("t", "p", "r", BLOBS).verify(0, DATA[0], tag)  # what a child checks
        changed = node(Held(b"held before this pusX"))
        with pytest.raises(DigestMismatch):  # never a tag over other bytes (GCM nonce reuse)
            changed._tag(0, changed._source.read_blob(0))  # type: ignore[union-attr]

    asyncio.run(scenario())
