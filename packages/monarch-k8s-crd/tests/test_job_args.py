"""KubernetesJob refuses bad arguments before it talks to any cluster."""

from __future__ import annotations

from pathlib import Path

import pytest

from monarch_k8s import InvalidJobError, KubernetesJob, MeshSpec
from monarch_k8s.job import git_root


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"compute": MeshSpec(), "selector": {"app": "w"}}, "not both"),
        ({}, "needs compute= .*selector= .*or name="),
        ({"compute": MeshSpec(), "name": "My-Job"}, "not a valid MonarchMesh name"),
        ({"compute": MeshSpec(), "use_websocket": False}, "WebSocket only"),
        ({"compute": {"gpu": 1}}, "unknown keys"),
    ],
)
def test_bad_arguments_say_what_to_do(kwargs: dict, match: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(InvalidJobError, match=match):
        KubernetesJob(**kwargs)


def test_the_default_sync_folder_is_the_git_root(tmp_path: Path) -> None:
    (tmp_path / ".git").mkdir()
    (tmp_path / "src" / "pkg").mkdir(parents=True)
    assert git_root(tmp_path / "src" / "pkg") == tmp_path
