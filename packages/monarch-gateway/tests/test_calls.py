"""The proxy API end to end: real workers, a real gateway process, calls over one WebSocket."""

from __future__ import annotations

import asyncio
import gc
import threading
import time

import actors
import pytest
from monarch.actor import Actor, endpoint

from monarch_proxy import (
    ActorImportError,
    ArgumentEncodingError,
    CallTimeoutError,
    GatewayConnection,
    JobState,
    RemoteTraceback,
    UnknownHandleError,
    ValueMesh,
)


def test_call_returns_a_value_mesh_with_coordinates(session):
    _, _procs, mesh = session
    result = mesh.whoami.call().get(timeout=60)
    assert isinstance(result, ValueMesh)
    assert result.extent.as_dict() == {"hosts": 2, "gpus": 2}
    for point, value in result.items():
        assert value["rank"] == point.coords
        assert value["label"] == "w"
    assert len({v["pid"] for v in result.values()}) == 4  # four real processes


def test_slices_are_executed_on_the_gateway(session):
    _, _, mesh = session
    where = {v["pid"]: (p["hosts"], p["gpus"]) for p, v in mesh.whoami.call().get(timeout=30)}
    host1 = mesh.slice(hosts=1)
    assert host1.extent.as_dict() == {"gpus": 2}
    pids = [v["pid"] for v in host1.whoami.call().get(timeout=30).values()]
    assert [where[pid] for pid in pids] == [(1, 0), (1, 1)]
    one = mesh.slice(hosts=0, gpus=1)
    assert where[one.whoami.call_one().get(timeout=30)["pid"]] == (0, 1)
    column = mesh.slice(gpus=slice(1, 2))
    assert column.extent.as_dict() == {"hosts": 2, "gpus": 1}


def test_choose_broadcast_and_stream(session):
    _, _, mesh = session
    assert mesh.echo.choose(5).get(timeout=30) == 5
    assert mesh.echo.broadcast("ignored") is None
    streamed = sorted(f.get()["pid"] for f in mesh.whoami.stream())
    assert len(streamed) == 4

    async def collect() -> list[object]:
        return [v async for v in mesh.echo.stream("x")]

    assert asyncio.run(collect()) == ["x"] * 4


def test_futures_can_be_awaited(session):
    _, _, mesh = session

    async def main() -> list[object]:
        return await asyncio.gather(
            *(mesh.slice(hosts=0, gpus=0).echo.call_one(i) for i in range(10))
        )

    assert asyncio.run(main()) == list(range(10))


def test_remote_exceptions_keep_their_type_and_traceback(session):
    _, _, mesh = session
    with pytest.raises(ValueError, match="no such user") as info:
        mesh.slice(hosts=0, gpus=0).fail.call_one("no such user").get(timeout=30)
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "actors.py" in cause.text and "raise ValueError" in cause.text


def test_actor_constructor_failure_reaches_the_caller_and_the_gateway_survives(cluster):
    with cluster.connect() as job:
        procs = job.hosts.spawn_procs(per_host={"gpus": 1})
        with pytest.raises(Exception, match="constructor failed on purpose"):
            procs.spawn("broken", actors.BrokenInit).never.call().get(timeout=60)
    with cluster.connect() as job:  # Monarch's default fault hook would have exited the gateway
        mesh = job.hosts.spawn_procs(per_host={"gpus": 1}).spawn("fine", actors.Worker)
        assert mesh.echo.choose("alive").get(timeout=60) == "alive"


def test_actor_classes_by_value_and_by_name(session):
    _, procs, _ = session

    class Adder(Actor):  # defined in a function: only travels by value
        def __init__(self, base: int) -> None:
            self.base = base

        @endpoint
        def add(self, x: int) -> int:
            return self.base + x

    adders = procs.spawn("adders", Adder, 100)
    assert list(adders.add.call(1).get(timeout=30).values()) == [101] * 4
    by_name = procs.spawn("by_name", "actors:Worker", label="named")
    assert by_name.whoami.choose().get(timeout=30)["label"] == "named"
    with pytest.raises(ActorImportError, match="no_such_module"):
        procs.spawn("missing", "no_such_module:Thing")


def test_class_the_gateway_cannot_import_is_resent_by_value(session, tmp_path, monkeypatch):
    _, procs, _ = session
    (tmp_path / "laptop_only.py").write_text(
        "from monarch.actor import Actor, endpoint\n"
        "class Local(Actor):\n"
        "    @endpoint\n"
        "    def hi(self):\n"
        "        return 'from a laptop-only module'\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import laptop_only

    mesh = procs.spawn("laptop_only", laptop_only.Local)
    assert mesh.hi.choose().get(timeout=30) == "from a laptop-only module"


def test_a_blocking_get_does_not_stall_other_calls(session):
    _, _, mesh = session
    slow = mesh.slice(hosts=0, gpus=0).sleep.call_one(3.0)
    fast_results = []

    def fast() -> None:
        fast_results.extend(
            mesh.slice(hosts=1, gpus=1).echo.call_one(i).get(timeout=30) for i in range(20)
        )

    thread = threading.Thread(target=fast)
    thread.start()
    thread.join(timeout=30)
    assert fast_results == list(range(20))
    assert not slow.done()  # twenty calls finished while the slow one was still running
    assert slow.get(timeout=30) == 3.0


def test_get_with_timeout_raises_a_typed_timeout_and_the_call_still_completes(session):
    _, _, mesh = session
    future = mesh.slice(hosts=0, gpus=1).sleep.call_one(1.0)
    with pytest.raises(CallTimeoutError, match=r"sleep.call_one\(\) did not finish within 0.05s"):
        future.get(timeout=0.05)
    assert isinstance(CallTimeoutError("x"), TimeoutError)
    assert future.get(timeout=30) == 1.0


def test_large_payload_round_trip(session):
    _, _, mesh = session
    blob = bytes(range(256)) * (16 * 1024 * 4)  # 16 MiB
    assert mesh.slice(hosts=1, gpus=0).echo.call_one(blob).get(timeout=60) == blob


def test_unpicklable_argument_fails_locally_and_names_it(session):
    _, _, mesh = session
    with pytest.raises(ArgumentEncodingError, match="argument 0"):
        mesh.echo.call(threading.Lock())
    assert mesh.echo.choose("still fine").get(timeout=30) == "still fine"


def test_unknown_handle_gets_a_typed_error(job: JobState):
    with pytest.raises(UnknownHandleError, match="handle 987654"):
        job.connection.request("mesh.slice", {"handle": 987654, "selection": {}}, timeout=30)
    with pytest.raises(UnknownHandleError):
        job.connection.request(
            "endpoint.call", {"handle": 987654, "endpoint": "x", "method": "call"}, b"", timeout=30
        )
    # The session keeps working.
    assert job.hosts.extent.as_dict() == {"hosts": 2}


def test_handles_are_freed_on_garbage_collection_and_at_session_end(cluster):
    job = cluster.connect()
    procs = job.hosts.spawn_procs(per_host={"gpus": 1})
    base = cluster.health(cluster.token)["handles"]
    slices = [procs.slice(hosts=i % 2) for i in range(10)]
    assert cluster.health(cluster.token)["handles"] == base + 10
    del slices
    gc.collect()
    deadline = time.monotonic() + 10
    while cluster.health(cluster.token)["handles"] != base and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cluster.health(cluster.token)["handles"] == base
    sessions = cluster.health(cluster.token)["sessions"]
    job.close()
    assert cluster.health(cluster.token)["sessions"] == sessions - 1


def test_stop_stops_the_actors(job: JobState):
    procs = job.hosts.spawn_procs(per_host={"gpus": 1})
    mesh = procs.spawn("stoppable", actors.Worker)
    assert mesh.echo.choose(1).get(timeout=30) == 1
    mesh.stop().get(timeout=30)
    with pytest.raises(Exception, match="stop"):
        mesh.echo.call(1).get(timeout=30)


def test_worker_output_streams_to_the_client(cluster):
    lines: list[tuple[str, str]] = []
    conn = GatewayConnection.open(
        cluster.url, cluster.token, on_log=lambda stream, text: lines.append((stream, text))
    )
    job = JobState.fetch(conn)
    mesh = job.hosts.spawn_procs(per_host={"gpus": 1}).spawn("talkers", actors.Worker)
    mesh.speak.call("marker-42").get(timeout=30)
    job.close()  # flushes worker output before the session ends
    stdout = "".join(t for s, t in lines if s == "stdout")
    stderr = "".join(t for s, t in lines if s == "stderr")
    assert stdout.count("stdout:marker-42") == 2
    assert stderr.count("stderr:marker-42") == 2
    assert "127.0.0.2" in stdout and "127.0.0.3" in stdout  # lines name their worker


def test_many_clients_at_once(cluster):
    errors: list[BaseException] = []

    def client(n: int) -> None:
        try:
            with cluster.connect() as job:
                mesh = job.hosts.spawn_procs(per_host={"gpus": 1}).spawn(
                    f"c{n}", actors.Worker, str(n)
                )
                futures = [mesh.echo.call((n, i)) for i in range(20)]
                for i, future in enumerate(futures):
                    assert list(future.get(timeout=60).values()) == [(n, i)] * 2
                assert {v["label"] for v in mesh.whoami.call().get(timeout=60).values()} == {str(n)}
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []


def test_health_endpoint_needs_no_token_and_gives_details_only_with_it(cluster):
    assert cluster.health() == {"status": "ok"}
    assert cluster.health("wrong") == {"status": "ok"}
    body = cluster.health(cluster.token)
    assert body["status"] == "ok" and body["workers"] == 2 and body["dead_workers"] == []
