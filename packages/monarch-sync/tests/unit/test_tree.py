import pytest

from monarch_sync.relay import RelayState
from monarch_sync.tree import (
    TreeNode,
    choose_fanout,
    model_time,
    plan_tree,
    shared_host,
    tree_depth,
)

PEERS = [f"h{i}:1" for i in range(10)]


def test_heap_layout() -> None:
    t = plan_tree(PEERS, 3)
    assert t.peer == "h0:1"
    assert [c.peer for c in t.children] == ["h1:1", "h2:1", "h3:1"]
    assert [c.peer for c in t.children[0].children] == ["h4:1", "h5:1", "h6:1"]
    assert sorted(n.peer for n in t.walk()) == sorted(PEERS)
    assert t.depth() == 3 == tree_depth(10, 3)


def test_chain_for_fanout_one() -> None:
    t = plan_tree([f"h{i}:1" for i in range(3000)], 1)
    assert t.depth() == 3000
    assert t.children[0].peer == "h1:1"
    again = TreeNode.from_json(t.to_json())
    assert [n.peer for n in again.walk()] == [f"h{i}:1" for i in range(3000)]


def test_json_roundtrip() -> None:
    t = plan_tree(PEERS, 2)
    assert TreeNode.from_json(t.to_json()) == t


def test_malformed_tree_json_refused() -> None:
    with pytest.raises(ValueError):
        TreeNode.from_json({"peers": ["a:1", "b:1"], "parents": [-1, 1]})


def test_duplicates_refused() -> None:
    with pytest.raises(ValueError):
        plan_tree(["a:1", "a:1"], 2)


def test_fanout_wide_for_small_deltas_narrow_for_bulk() -> None:
    assert choose_fanout(64, 10_000) >= 8
    assert choose_fanout(64, 200e6) <= 2
    assert model_time(64, 200e6, 1) < model_time(64, 200e6, 8)


def test_agents_sharing_one_machine_get_a_shallow_tree_for_bulk() -> None:
    # Same work for the machine whatever the shape: only depth matters, so no chain.
    assert choose_fanout(32, 200e6, shared_host=True) >= 3
    assert tree_depth(32, choose_fanout(32, 200e6, shared_host=True)) <= 4
    assert model_time(32, 200e6, 1, shared_host=True) > model_time(32, 200e6, 3, shared_host=True)
    assert choose_fanout(64, 10_000, shared_host=True) == choose_fanout(64, 10_000)


def test_shared_host_detection() -> None:
    assert shared_host(["127.0.0.1", "127.0.0.1"])
    assert shared_host(["127.0.0.2", "127.0.0.3", "::1", "localhost"])
    assert shared_host(["node-a", "node-a"])
    assert not shared_host(["10.0.0.1", "10.0.0.2"])
    assert not shared_host(["node-a", "node-b"])
    assert not shared_host(["127.0.0.1"])  # one agent: nothing to share


def test_relay_routes_each_blob_once_and_backlogs_on_adoption() -> None:
    r = RelayState()
    r.add_child("a", {1, 2, 3})
    r.add_child("b", {2})
    assert r.route(2) == ["a", "b"]
    assert r.route(2) == []
    assert r.backlog("a", lambda i: i == 3) == [3]
    assert r.union() == {1}
    assert r.drop_child("a") == {1}


def test_relay_routes_a_run_of_blobs_like_one_at_a_time() -> None:
    r = RelayState()
    r.add_child("a", {1, 2, 3})
    r.add_child("b", {2, 5})
    r.add_child("c", set())
    assert r.route_many([5, 2, 9, 1, 2]) == {"a": [1, 3], "b": [0, 1]}
    assert r.route_many([2, 5, 1]) == {}
    assert r.pending == {"a": {3}, "b": set(), "c": set()}
