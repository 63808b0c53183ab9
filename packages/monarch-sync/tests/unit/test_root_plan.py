"""A push through a gateway: the root agent plans the tree over the members the gateway lists,
and the client's report names every node the root planned."""

from __future__ import annotations

import json
from pathlib import Path

from monarch_sync import Agent, TreeNode
from monarch_sync.client import _collect, _planned


def test_root_agent_lays_the_members_out_below_itself(tmp_path: Path) -> None:
    members = tmp_path / "members.json"
    agent = Agent(tmp_path / "root", "t", advertise="10.0.0.1:7878", members_file=members)
    lone = TreeNode("gateway")
    assert agent.expand(lone, {"delta": 10, "fanout": None}) == (lone, {"fanout": 1, "depth": 1})
    listed = ["10.0.0.2:7878", "10.0.0.3:7878", "10.0.0.1:7878", "10.0.0.4:7878"]
    members.write_text(json.dumps({"members": listed}))
    chain, planned = agent.expand(lone, {"delta": 10, "fanout": 1})
    assert [n.peer for n in chain.walk()] == ["gateway", *listed[:2], listed[3]]  # not itself
    assert planned == {"fanout": 1, "depth": 4}
    wide, planned = agent.expand(lone, {"delta": 10, "fanout": None})  # a small edit: shallow
    assert planned == {"fanout": 3, "depth": 2} and len(wide.children) == 3
    # A direct push (no "expand" in its header) or a planned subtree is left as the client sent.
    assert agent.expand(lone, None) == (lone, None)
    assert agent.expand(chain, {"delta": 10})[0] is chain
    members.write_text("not json")
    assert agent.expand(lone, {"delta": 10})[0] == lone


def test_report_lists_the_nodes_a_root_agent_planned() -> None:
    results = [
        {"peer": "gateway", "ok": True, "planned": {"fanout": 2, "depth": 2}},
        {"peer": "10.0.0.3:7878", "ok": False, "error": "killed"},
        {"peer": "10.0.0.2:7878", "ok": True},
    ]
    nodes = _collect(["gateway"], results)
    assert [(n.peer, n.ok) for n in nodes] == [
        ("gateway", True), ("10.0.0.2:7878", True), ("10.0.0.3:7878", False),
    ]  # fmt: skip
    assert _collect(["a:1"], [])[0].error == "no report received"
    assert _planned(results, 1, 1) == (2, 2) and _planned(results[1:], 1, 1) == (1, 1)
