"""Fixtures: SkyPilot's HOME in a temporary folder, free ports, and the fake cloud."""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Iterator

import pytest

# SkyPilot writes ~/.sky at import: keep it out of the real home (set before any import of sky)
_HOME = tempfile.mkdtemp(prefix="monarch-skypilot-home-")
os.environ.setdefault("SKYPILOT_DISABLE_USAGE_COLLECTION", "1")
os.environ["HOME"] = _HOME

from monarch_skypilot.testing import FakeCloud  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def ports() -> dict[str, int]:
    return {"monarch_port": free_port(), "gateway_port": free_port(), "sync_port": free_port()}


@pytest.fixture
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeCloud]:
    fake = FakeCloud(tmp_path_factory.mktemp("cloud"))
    yield fake
    fake.close()
