"""A laptop without torchmonarch writes actors with monarch_proxy.actor; the gateway runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from monarch_gateway.local import LocalCluster

LAPTOP = textwrap.dedent(
    """
    import json, os, sys
    sys.modules["monarch"] = None  # this laptop cannot import torchmonarch

    import monarch_proxy
    from monarch_proxy.actor import Actor, current_rank, endpoint

    class Base(Actor):
        @endpoint
        def where(self):
            return dict(current_rank())

    class Counter(Base):  # defined in __main__: ships by value
        def __init__(self, start, *, step=1):
            self.n = start
            self.step = step

        @endpoint
        def incr(self):
            self.n += self.step
            return self.n

        @endpoint(explicit_response_port=True)
        def doubled(self, port, value):
            port.send(2 * value)

        def helper(self):  # not an endpoint
            return "helper"

    job = monarch_proxy.connect(os.environ["URL"], os.environ["TOKEN"])
    counters = job.hosts.spawn_procs(per_host={"gpus": 2}).spawn("c", Counter, 10, step=5)
    out = {
        "incr": counters.incr.call().get(timeout=60).values(),
        "where": counters.where.call().get(timeout=60).values(),
        "doubled": counters.slice(hosts=0, gpus=1).doubled.call_one(21).get(timeout=60),
        "local": Counter(1).helper(),
        "monarch_imported": sys.modules.get("monarch") is not None,
    }
    job.close()
    print(json.dumps(out))
    """
)


def test_a_laptop_without_torchmonarch_spawns_shim_actors(cluster: LocalCluster) -> None:
    env = {**os.environ, "URL": cluster.url, "TOKEN": cluster.token}
    done = subprocess.run(
        [sys.executable, "-c", LAPTOP], env=env, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["incr"] == [15, 15, 15, 15]
    assert out["where"] == [
        {"hosts": 0, "gpus": 0},
        {"hosts": 0, "gpus": 1},
        {"hosts": 1, "gpus": 0},
        {"hosts": 1, "gpus": 1},
    ]
    assert out["doubled"] == 42
    assert out["local"] == "helper"
    assert out["monarch_imported"] is False
