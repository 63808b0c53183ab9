"""Monarch fidelity on the wire and in the gateway (issue 11): each test is code that runs the
same way on torchmonarch directly, here through monarch-proxy and a real gateway."""

from __future__ import annotations

import gc
import threading
import time

import actors
import fidelity_actors
import pytest
from k8s_testenv.testing import pid_alive, wait_until
from tcp_relay import TcpRelay

import monarch_proxy
from monarch_gateway.local import LocalCluster
from monarch_proxy import (
    ActorError,
    ActorMeshProxy,
    GatewayConnection,
    JobState,
    ProcMeshProxy,
    SupervisionError,
    ValueMesh,
    faults,
)


def test_chained_one_liners_survive_gc_of_their_intermediates(session):
    job, _, workers = session
    for _ in range(3):  # the released intermediate overtook the call: UnknownHandleError
        values = job.hosts.spawn_procs().spawn("a", actors.Worker).echo.call(1).get(timeout=60)
        assert list(values.values()) == [1, 1]
        one = workers.slice(hosts=0).slice(gpus=1).whoami.call_one().get(timeout=30)
        assert one["label"] == "w"


def test_a_release_from_a_finalizer_inside_the_connection_lock(session):
    """Garbage collection may finalize a mesh proxy while this thread holds the connection's
    lock (json.dumps inside submit allocated): the release must not wait for that lock
    (it did, and the laptop hung for good)."""
    _, _, workers = session
    connection = workers._connection
    held = [workers.slice(hosts=0)]

    def collect_holding_the_lock() -> None:
        with connection._lock:  # as if inside submit()
            held.clear()
            gc.collect()  # runs the finalizer here, on this thread

    thread = threading.Thread(target=collect_holding_the_lock, daemon=True)
    thread.start()
    thread.join(timeout=20)
    assert not thread.is_alive(), "release() waited for the lock its own thread holds"
    assert workers.slice(hosts=1, gpus=0).echo.call_one("after").get(timeout=30) == "after"


def test_release_after_a_big_frame_waits_for_it(session):
    _, procs, _ = session
    big = b"x" * (3 << 20)  # sent in pieces by its own writer; the release must not pass it
    for _ in range(2):
        echoed = procs.spawn("big", actors.Worker).slice(hosts=0, gpus=0).echo.call_one(big)
        assert echoed.get(timeout=60) == big


def test_mesh_argument_arrives_as_the_monarch_mesh(session):
    _, procs, workers = session
    relay = procs.spawn("relay", fidelity_actors.Relay).slice(hosts=0, gpus=0)
    assert relay.describe.call_one(workers).get(timeout=30) == "ActorMesh"
    assert relay.relay.call_one(workers, 7).get(timeout=30) == [7, 7, 7, 7]
    sliced = workers.slice(hosts=1)
    nested = relay.relay_nested.call_one({"meshes": [sliced, workers]}, "n").get(timeout=30)
    assert nested == [["n", "n"], ["n"] * 4]
    mine = ValueMesh(workers.extent, [1, 2, 3, 4])  # a value mesh arrives as Monarch's
    assert relay.describe.call_one(mine).get(timeout=30) == "ValueMesh"
    # Chained: the argument's proxy is garbage right after the call is submitted, and its
    # release follows the request in the same message. A stream runs as a task that starts
    # after the gateway has read that release: it still finds the mesh (resolved on arrival).
    temp = procs.spawn("temp", actors.Worker)
    assert relay.relay.call_one(temp.slice(gpus=0), 3).get(timeout=30) == [3, 3]
    streamed = [f.get(timeout=30) for f in relay.relay.stream(temp.slice(gpus=1), 4)]
    assert streamed == [[4, 4]]


def test_meshes_returned_by_actors_become_session_proxies(cluster, session):
    _, procs, workers = session
    relay = procs.spawn("relay2", fidelity_actors.Relay).slice(hosts=0, gpus=0)
    child = relay.spawn_child.call_one("kid").get(timeout=60)
    assert isinstance(child, ActorMeshProxy)  # never a raw Monarch mesh on the laptop
    assert child.whoami.call_one().get(timeout=30)["label"] == "kid"
    own = relay.own_procs.call_one().get(timeout=30)
    assert isinstance(own, ProcMeshProxy)
    spawned = own.spawn("on_returned_procs", actors.Worker, "r")
    assert spawned.whoami.call_one().get(timeout=30)["label"] == "r"
    values = relay.value_mesh.call_one(workers, 5).get(timeout=30)
    assert isinstance(values, ValueMesh) and list(values.values()) == [5] * 4
    # In every value of a call and in streams too.
    streamed = [f.get() for f in relay.spawn_child.stream("s")]
    assert all(isinstance(m, ActorMeshProxy) for m in streamed)


def test_actor_exception_is_actor_error_and_its_own_type(session):
    _, _, workers = session
    one = workers.slice(hosts=0, gpus=0)
    with pytest.raises(ActorError) as info:
        one.fail.call_one("boom").get(timeout=30)
    assert isinstance(info.value, ValueError)  # except ValueError keeps working
    assert isinstance(info.value.exception, ValueError)
    assert str(info.value.exception) == "boom"
    assert info.value.message == "Actor call workers.fail failed."
    assert "raise ValueError(message)" in info.value.exception_formatted
    with pytest.raises(ValueError, match="boom"):
        workers.fail.call("boom").get(timeout=30)


def test_stream_failure_fails_only_that_actors_future(session):
    _, procs, _ = session
    moody = procs.spawn("moody", fidelity_actors.Moody)
    outcomes = []
    for future in moody.fail_on.stream(1):
        error = future.exception(timeout=30)
        outcomes.append(type(error) if error else future.get())
    assert sorted(o for o in outcomes if isinstance(o, int)) == [0, 0]
    failed = [o for o in outcomes if not isinstance(o, int)]
    assert len(failed) == 2 and all(issubclass(t, ActorError) for t in failed)


def test_bad_input_raises_monarch_types_and_session_keeps_serving(session):
    job, _, workers = session
    with pytest.raises(AttributeError, match="no_such_endpoint"):
        workers.no_such_endpoint.call()
    with pytest.raises(AttributeError, match="no_such_endpoint"):
        workers.no_such_endpoint.broadcast()  # not silent
    with pytest.raises(AttributeError, match="no_such_endpoint"):
        workers.slice(hosts=0).no_such_endpoint.broadcast()
    with pytest.raises(TypeError, match="nolabel"):
        workers.slice(nolabel=0)
    with pytest.raises(IndexError):
        workers.slice(gpus=5)
    with pytest.raises(TypeError, match="argument 0"):
        workers.echo.call(threading.Lock())
    with pytest.raises(ValueError, match="call_one"):
        workers.echo.call_one(1).get(timeout=30)
    procs = job.hosts.spawn_procs(per_host={"gpus": 1})
    doomed = procs.spawn("doomed", actors.Worker)
    doomed.stop("no longer needed").get(timeout=60)
    with pytest.raises(SupervisionError) as info:  # as Monarch: a RuntimeError naming the call
        doomed.echo.call(1).get(timeout=60)
    assert isinstance(info.value, RuntimeError) and "doomed.echo" in str(info.value)
    procs.stop().get(timeout=60)
    with pytest.raises(RuntimeError, match="stopped"):
        procs.spawn("late", actors.Worker)
    assert list(workers.echo.call("still").get(timeout=30).values()) == ["still"] * 4


def test_by_value_keyword_reaches_the_constructor(session):
    _, procs, _ = session
    kw = procs.spawn("kw", fidelity_actors.Keywords, by_value="mine", other=1)
    seen = kw.slice(hosts=0, gpus=0).seen_keywords.call_one().get(timeout=30)
    assert seen == {"by_value": "mine", "other": 1}
    shipped = procs.spawn("kw2", monarch_proxy.by_value(fidelity_actors.Keywords))
    assert shipped.slice(hosts=0, gpus=0).seen_keywords.call_one().get(timeout=30)


def test_spawn_procs_takes_monarchs_arguments(session):
    job, _, _ = session
    procs = job.hosts.spawn_procs(
        per_host={"gpus": 1}, name="booted", bootstrap=fidelity_actors.set_marker
    )
    assert procs.extent.as_dict() == {"hosts": 2, "gpus": 1}
    moody = procs.spawn("env", fidelity_actors.Moody)
    assert list(moody.env.call("FIDELITY_BOOTSTRAP").get(timeout=60).values()) == ["ran"] * 2
    procs.stop("done with them").get(timeout=60)


def test_session_end_stops_its_procs_unless_kept(cluster):
    def spawn_in_new_session(**options: object) -> tuple[object, list[int], str]:
        job = cluster.connect(**options)
        moody = job.hosts.spawn_procs(per_host={"gpus": 2}).spawn("m", fidelity_actors.Moody)
        pids = list(moody.pid.call().get(timeout=60).values())
        mine = {k: v for k, v in cluster.health(cluster.token)["processes"].items() if v == 4}
        assert mine, "health shows the session's 4 processes"
        return job, pids, next(iter(mine))

    job, pids, number = spawn_in_new_session()
    job.close()
    wait_until(lambda: not any(pid_alive(p) for p in pids))
    assert number not in cluster.health(cluster.token)["processes"]

    kept, kept_pids, _ = spawn_in_new_session(keep_procs=True)
    kept.close()
    time.sleep(2)  # a stop would have begun at once
    assert all(pid_alive(p) for p in kept_pids)


def test_session_not_resumed_within_the_grace_has_its_procs_stopped():
    with LocalCluster(1, resume_grace_s=0.5).start() as c, TcpRelay(c.url) as relay:
        job = JobState.fetch(GatewayConnection.open(relay.url, c.token, resume_grace_s=1))
        moody = job.hosts.spawn_procs(per_host={"gpus": 2}).spawn("m", fidelity_actors.Moody)
        pids = list(moody.pid.call().get(timeout=60).values())
        relay.pause()  # the laptop goes away for longer than the gateway's grace
        relay.drop_all()
        wait_until(lambda: not any(pid_alive(p) for p in pids))
        assert c.health(c.token)["processes"] == {}
        relay.resume()
        job.close()


def test_device_tensors_from_the_laptop_load_on_the_cpu(session, monkeypatch):
    import torch  # the gateway's "tensors" dependency group (nox installs it)

    _, _, workers = session
    tensor = torch.arange(6, dtype=torch.float32)
    # As a laptop with a GPU pickles a CUDA tensor: its storage is saved as on "cuda:0".
    monkeypatch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
    echoed = workers.slice(hosts=0, gpus=0).echo.call_one(tensor).get(timeout=60)
    monkeypatch.undo()
    assert echoed.device.type == "cpu" and torch.equal(echoed, tensor)


def test_failed_broadcast_reaches_the_laptop_fault_hook(session, monkeypatch):
    _, procs, _ = session
    seen: list[faults.MeshFailure] = []
    monkeypatch.setattr(faults, "unhandled_fault_hook", seen.append)
    doomed = procs.spawn("broadcaster", actors.Worker)
    doomed.fail.broadcast("in a broadcast")
    wait_until(lambda: bool(seen), timeout=60)
    assert seen[0].mesh_name == "broadcaster"
    assert "in a broadcast" in seen[0].report()
