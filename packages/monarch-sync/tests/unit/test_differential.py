"""Property test: any sequence of edits, applied through diff + staging, reproduces the source.

Runs the agent's apply path on the real filesystem without sockets. It also checks that the
previous version is left untouched (hard links are never written through).
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sync_helpers import apply_local, snapshot
from sync_ops import apply_op, op

from monarch_sync import Store, cli, scan_tree
from monarch_sync.manifest import Manifest


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(op, max_size=12), st.lists(op, min_size=1, max_size=12))
def test_edits_roundtrip_and_keep_previous_version(
    first: list[tuple[str, str, str, int, int]], edits: list[tuple[str, str, str, int, int]]
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        src, store = Path(tmp) / "src", Store(Path(tmp) / "agent")
        src.mkdir()
        for o in first:
            apply_op(src, o)
        v1 = scan_tree(src)
        apply_local(store, src, v1)
        before = snapshot(src)
        assert snapshot(store.root / "current") == before
        for o in edits:
            apply_op(src, o)
        v2 = scan_tree(src)
        plan = apply_local(store, src, v2)
        assert snapshot(store.root / "current") == snapshot(src)
        assert scan_tree(store.root / "current").root_hash == v2.root_hash
        if v1.root_hash != v2.root_hash:
            assert snapshot(store.versions / v1.root_hash) == before
        # Only content the agent did not hold is fetched.
        held = {d for d, _ in v1.blobs}
        assert all(v2.blobs[i][0] not in held for i in plan.need)


def test_one_chunk_edit_in_a_large_file_needs_few_chunks(tmp_path: Path) -> None:
    src, store = tmp_path / "src", Store(tmp_path / "agent")
    src.mkdir()
    big = bytearray(random.Random(1).randbytes(8_000_000))
    (src / "big").write_bytes(bytes(big))
    apply_local(store, src, scan_tree(src))
    big[4_000_000:4_000_000] = b"inserted"
    (src / "big").write_bytes(bytes(big))
    m = scan_tree(src)
    plan = apply_local(store, src, m)
    resent = sum(m.blobs[i][1] for i in plan.need)
    assert 0 < resent < 600_000  # two or three ~64 KiB chunks, not 8 MB
    assert (store.root / "current" / "big").read_bytes() == bytes(big)


def test_tampered_file_in_current_version_is_refetched(tmp_path: Path) -> None:
    src, store = tmp_path / "src", Store(tmp_path / "agent")
    src.mkdir()
    (src / "a").write_text("one")
    (src / "b").write_text("two")
    apply_local(store, src, scan_tree(src))
    live = store.root / "current"
    os.unlink(live / "a")  # someone edits the synced tree in place
    (live / "a").write_text("tampered!")
    (live / "stray").write_text("x")
    (src / "b").write_text("three")
    m = scan_tree(src)
    plan = apply_local(store, src, m)
    assert snapshot(live) == snapshot(src)
    assert m.blob_index[m.by_path["a"].chunks[0][0]] in plan.need


def two_versions(tmp_path: Path) -> tuple[Store, Manifest]:
    """An agent store that applied two versions of a one-file tree; returns it and the first."""
    src, store = tmp_path / "src", Store(tmp_path / "agent")
    src.mkdir()
    (src / "a").write_text("one")
    v1 = scan_tree(src)
    apply_local(store, src, v1)
    (src / "a").write_text("two")
    apply_local(store, src, scan_tree(src))
    return store, v1


def test_rollback_switches_back(tmp_path: Path) -> None:
    store, v1 = two_versions(tmp_path)
    assert store.rollback() == v1.root_hash
    assert (store.root / "current" / "a").read_text() == "one"


def test_cli_rollback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store, v1 = two_versions(tmp_path)
    assert cli.main(["rollback", "--root", str(store.root)]) == 0
    assert capsys.readouterr().out.strip() == v1.root_hash
    assert (store.root / "current" / "a").read_text() == "one"
    assert cli.main(["rollback", "--root", str(tmp_path / "empty")]) == 2
