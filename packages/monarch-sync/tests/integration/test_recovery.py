"""Slow nodes have their children moved; dropped connections to live nodes are reconnected.

Real agents on loopback, in this process. A slow node is made by pacing what the client hands
to it (the ``pace`` test hook); a dropped connection by a TCP relay that resets every
connection through it once (``TcpRelay``).
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest
from sync_helpers import TOKEN, TcpRelay, running_agents, snapshot

from monarch_sync import Recovery, push
from monarch_sync.downstream import Downstream, _Child
from monarch_sync.tree import TreeNode

MiB = 1024 * 1024


def one_big_file(src: Path, size: int) -> None:
    src.mkdir()
    (src / "big.bin").write_bytes(random.Random(5).randbytes(size))
    (src / "small.py").write_text("x = 1\n")


def test_slow_node_in_a_chain_has_its_children_moved_to_an_ancestor(tmp_path: Path) -> None:
    src = tmp_path / "src"
    one_big_file(src, 15 * MiB)
    handed = 0
    rule = Recovery(slow_backlog=1 * MiB, slow_after=0.2, slow_ratio=0.25)

    async def scenario() -> None:
        async with running_agents(tmp_path, 3) as agents:
            a, b, c = peers = [x.address for x in agents]

            def a_slows_down(peer: str, n: int) -> float:
                """The client -> A link: 20 MB/s for 12 MiB, then about 1.7 MB/s."""
                nonlocal handed
                if peer != a:
                    return 0.0
                handed += n
                return n / 20e6 if handed <= 12 * MiB else 0.6

            report = await push(
                src, peers, TOKEN, fanout=1, recovery=rule, pace=a_slows_down,
                cache_dir=tmp_path / "c",
            )  # fmt: skip
            assert report.ok, report.format()
            nodes = {n.peer: n for n in report.nodes}
            # A stayed attached to the client, was fed to the end and is not reported failed.
            assert nodes[a].parent == "client" and nodes[a].moved_from is None
            # B (with C under it) was moved from under A to the client, which fed it directly.
            assert (nodes[b].parent, nodes[b].moved_from, nodes[b].moved_reason) == (
                "client", a, "slow",
            )  # fmt: skip
            assert (nodes[c].parent, nodes[c].moved_from) == (b, a)
            assert [n.peer for n in report.moved] == [b, c]
            assert f"moved from {a} (slow), fed by client" in report.format()
            # The client sent B only what A had not forwarded yet: more than one copy of the
            # tree in all, but far from two.
            assert report.tree_bytes < report.client_bytes < 2 * report.tree_bytes
            assert nodes[b].seconds < nodes[a].seconds  # B and C did not wait for A
            for agent in agents:
                assert snapshot(agent.synced_path) == snapshot(src)
            assert {n.root for n in report.nodes} == {report.root_hash}
            assert all(n.bytes == report.tree_bytes for n in report.nodes)  # each blob once

    asyncio.run(scenario())


@pytest.mark.parametrize("link", ["client-A", "A-B"])
def test_dropped_connection_to_a_live_node_is_reconnected(tmp_path: Path, link: str) -> None:
    src = tmp_path / "src"
    size = 16 * MiB
    one_big_file(src, size)

    async def scenario() -> None:
        async with running_agents(tmp_path, 3) as agents:
            peers = [x.address for x in agents]
            k = 0 if link == "client-A" else 1  # the node behind the relay
            relay = TcpRelay(peers[k], cut_after=size // 2)
            await relay.start()
            peers[k] = relay.address
            try:
                report = await push(src, peers, TOKEN, fanout=1, cache_dir=tmp_path / "c")
            finally:
                await relay.close()
            assert relay.cuts == 1 and len(relay.sent) == 2  # cut once, reconnected once
            assert report.ok, report.format()
            nodes = {n.peer: n for n in report.nodes}
            node = nodes[peers[k]]
            assert node.reconnects == 1
            assert node.parent == ("client" if k == 0 else peers[0])
            assert report.moved == []  # its child stayed under it
            assert sum(n.reconnects for n in report.nodes) == 1
            for agent in agents:
                assert snapshot(agent.synced_path) == snapshot(src)
            assert {n.root for n in report.nodes} == {report.root_hash}
            assert all(n.bytes == report.tree_bytes for n in report.nodes)
            # What reached the node over both connections is about one copy of the tree: the
            # new connection carried what it still lacked, not the whole tree again (a full
            # resend would make it 1.5 copies). Only what the reset lost in socket buffers was
            # sent twice.
            assert relay.sent[0] >= size // 2
            assert sum(relay.sent) < size + 2 * MiB
            if k == 0:  # the client also counts what its own socket buffers lost in the reset
                assert report.client_bytes < size + 10 * MiB
            else:
                assert report.client_bytes == report.tree_bytes  # the client saw nothing

    asyncio.run(scenario())


class _Recording(Downstream):
    """A Downstream whose adoptions are recorded instead of dialled."""

    adopted: list[str]

    def attach_soon(self, node: TreeNode, lost: object = None) -> None:
        self.adopted.append(node.peer)


def test_a_subtree_is_moved_at_most_once_and_never_from_a_leaf() -> None:
    async def scenario() -> None:
        ds = _Recording(
            push_id="p", token="t", sender="me", manifest_bytes=b"", blob_count=0, root="",
            stall_timeout=5,
        )  # fmt: skip
        ds.adopted = []
        tree = TreeNode("a", (TreeNode("b", (TreeNode("c"),)), TreeNode("d")))
        leaf = _Child(TreeNode("leaf"), conn=None)  # type: ignore[arg-type]
        slow = _Child(tree, conn=None)  # type: ignore[arg-type]
        ds._move_children(leaf)
        assert ds.adopted == []  # no children: nothing to move
        ds._move_children(slow)
        ds._move_children(slow)
        assert ds.adopted == ["b", "d"]  # its children, once
        moved_in = _Child(tree.children[0], conn=None)  # type: ignore[arg-type]
        ds._move_children(moved_in)
        assert ds.adopted == ["b", "d"]  # b came with a moved subtree: c stays under it
        results = [{"peer": "b", "ok": True}, {"peer": "c", "ok": True}]
        ds._annotate("b", results)
        assert results[0] == {
            "peer": "b", "ok": True, "parent": "me", "moved_from": "a", "moved_reason": "slow",
        }  # fmt: skip
        assert results[1] == {"peer": "c", "ok": True, "moved_from": "a", "moved_reason": "slow"}

    asyncio.run(scenario())
