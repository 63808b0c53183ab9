"""SkyPilot's real local API server, with no cloud enabled, answers ``state()``; the user gets
our error naming ``sky check``, not a traceback; the adapter's ``status`` and ``down`` answer
through the same server.

Nothing is faked: ``sky api start`` runs SkyPilot's server with ``HOME`` in a temporary folder
(its state and ``~/.sky``) on a free port (``SKYPILOT_API_SERVER_LOCAL_PORT``), and it is
stopped at teardown so nothing is left running. The client runs in a subprocess so that its
SkyPilot reads that HOME from the start.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import free_port

CLIENT = """
from monarch_skypilot import NoCloudAccessError, SkyPilotJob
# no cloud named and no image: SkyPilot then needs no catalog (unreachable here) to say so
job = SkyPilotJob(meshes={"trainers": 2}, cluster_name="monarch-nocloud", image_id=None, log=None)
try:
    job.state(cached_path=None)
except NoCloudAccessError as exc:
    print("ERROR:", exc)

# the adapter's other calls, against the same real server (signatures and result shapes)
from monarch_skypilot import ClusterNotUpError, SkyPilotSdk
api = SkyPilotSdk()
print("STATUS:", api.status("monarch-nocloud"))
try:
    api.down("monarch-nocloud")
except ClusterNotUpError as exc:
    print("DOWN:", exc)
"""


@pytest.fixture
def api_server(tmp_path: Path) -> Iterator[dict[str, str]]:
    env = {
        **os.environ,
        "HOME": str(tmp_path),
        "SKYPILOT_API_SERVER_LOCAL_PORT": str(free_port()),
        "SKYPILOT_DISABLE_USAGE_COLLECTION": "1",
    }
    sky = str(Path(sys.executable).parent / "sky")
    # `sky api start` gives its server 60 s to answer (SkyPilot's WAIT_APISERVER_START_TIMEOUT_SEC)
    # and the server's imports alone took 21 s at a load of 3 on 2 cores: on a busier machine it
    # gives up while the server is still starting. Asked again, it finds that server (or starts
    # one); after three tries the failure says why, with the server's own log.
    for _ in range(3):
        started = subprocess.run(
            [sky, "api", "start"], env=env, capture_output=True, text=True, timeout=180
        )
        if started.returncode == 0:
            break
    else:
        log = tmp_path / ".sky" / "api_server" / "server.log"
        server_log = log.read_text()[-3000:] if log.exists() else "(no server log)"
        subprocess.run([sky, "api", "stop"], env=env, capture_output=True, timeout=120)
        pytest.fail(
            f"sky api start failed 3 times:\n{started.stdout[-2000:]}"
            f"{started.stderr[-3000:]}\nserver.log:\n{server_log}"
        )
    try:
        yield env
    finally:
        subprocess.run([sky, "api", "stop"], env=env, capture_output=True, timeout=120)


def test_state_without_any_cloud_says_to_run_sky_check(api_server: dict[str, str]) -> None:
    done = subprocess.run(
        [sys.executable, "-c", CLIENT], env=api_server, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ERROR:" in done.stdout, done.stdout + done.stderr[-3000:]
    message = done.stdout.split("ERROR:", 1)[1].split("STATUS:")[0]
    assert "`sky check`" in message and "monarch-nocloud" in message
    assert "Traceback" not in done.stderr
    assert "STATUS: None" in done.stdout  # no such cluster
    assert "DOWN: cluster 'monarch-nocloud' is not up" in done.stdout  # ClusterDoesNotExist
