"""The node command's pure decisions, without processes: how nodes become mesh files, also
after a relaunch that replaced a node (SkyPilot may list the nodes in another order)."""

from __future__ import annotations

from pathlib import Path

from monarch_skypilot.node import Node, parse


def node(tmp_path: Path, ips: list[str]) -> Node:
    argv = ["--meshes", "trainers=2,eval=1", "--port", "22222", "--gateway-port", "8443"]
    args = parse([*argv, "--rank", "0", "--ips", "\n".join(ips), "--state-dir", str(tmp_path)])
    return Node(args)


def meshes(tmp_path: Path) -> dict[str, list[str]]:
    return {
        name: (tmp_path / f"mesh-{name}.txt").read_text().split() for name in ("trainers", "eval")
    }


def test_nodes_are_cut_into_mesh_files_head_first(tmp_path: Path) -> None:
    node(tmp_path, ["10.0.0.1", "10.0.0.2", "10.0.0.3"]).write_mesh_files()
    assert meshes(tmp_path) == {
        "trainers": ["tcp://10.0.0.1:22222", "tcp://10.0.0.2:22222"],
        "eval": ["tcp://10.0.0.3:22222"],
    }


def test_after_a_relaunch_survivors_keep_their_place_and_the_new_node_fills_the_gap(
    tmp_path: Path,
) -> None:
    node(tmp_path, ["10.0.0.1", "10.0.0.2", "10.0.0.3"]).write_mesh_files()
    # 10.0.0.2 was preempted; its replacement 10.0.0.9 is listed in another order
    node(tmp_path, ["10.0.0.1", "10.0.0.3", "10.0.0.9"]).write_mesh_files()
    assert meshes(tmp_path) == {
        "trainers": ["tcp://10.0.0.1:22222", "tcp://10.0.0.9:22222"],
        "eval": ["tcp://10.0.0.3:22222"],
    }
