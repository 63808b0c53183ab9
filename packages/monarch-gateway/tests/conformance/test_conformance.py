"""Monarch's public actor API, run directly against torchmonarch and through monarch-proxy.

Each body runs both ways on the same workers; ``conform`` asserts the same result (or the same
exception type and message) unless a named entry of DIFFERENCES says why not.
"""

from __future__ import annotations

import asyncio
import pickle
import re
import threading
from pathlib import Path

import pytest
from conformance_actors import Collides, Named, Probe
from conformance_harness import DIFFERENCES, Raised

RANKS = [
    {"hosts": 0, "gpus": 0},
    {"hosts": 0, "gpus": 1},
    {"hosts": 1, "gpus": 0},
    {"hosts": 1, "gpus": 1},
]


# HostMesh.spawn_procs and ProcMesh.spawn ------------------------------------------------------


def test_spawn_procs_shapes(conform):
    def body(api):
        hosts = api.hosts
        return [hosts.extent, hosts.sizes, hosts.size(), hosts.size("hosts"), len(hosts)]

    assert conform(body) == [("Extent", ["hosts"], [2]), {"hosts": 2}, 2, 2, 2]

    def spawned(api):
        procs = api.procs
        return [procs.extent, procs.sizes, procs.size("gpus"), procs.size(("hosts", "gpus"))]

    assert conform(spawned)[0] == ("Extent", ["hosts", "gpus"], [2, 2])


def test_spawn_procs_with_a_name_and_no_per_host(conform):
    def body(api):
        procs = api.hosts.spawn_procs(name="named")
        try:
            actors = procs.spawn("one_each", Probe, "solo")
            return [procs.extent, actors.whoami.call().get(timeout=60)]
        finally:
            procs.stop().get(timeout=60)

    extent, values = conform(body)
    assert extent == ("Extent", ["hosts"], [2])
    assert [v["rank"] for _, v in values[2]] == [{"hosts": 0}, {"hosts": 1}]


def test_spawn_passes_constructor_arguments(conform):
    def body(api):
        return api.probes.whoami.call().get(timeout=60)

    result = conform(body)
    assert [v for _, v in result[2]] == [{"label": "shared", "rank": r} for r in RANKS]


# Endpoint adverbs -----------------------------------------------------------------------------


def test_call_returns_a_value_mesh_in_row_major_order(conform):
    def body(api):
        return api.probes.rank.call().get(timeout=60)

    assert [v for _, v in conform(body)[2]] == RANKS


def test_call_one_on_a_single_point_and_on_many(conform):
    def one(api):
        return api.probes.slice(hosts=1, gpus=0).rank.call_one().get(timeout=60)

    assert conform(one) == {}  # current_rank() is the rank within the mesh called

    def many(api):
        return api.probes.rank.call_one().get(timeout=60)

    assert isinstance(conform(many), Raised)


def test_choose_picks_one_actor(conform):
    def body(api):
        return api.probes.echo.choose("chosen").get(timeout=60)

    assert conform(body) == "chosen"


def test_broadcast_returns_none(conform):
    def body(api):
        return api.probes.echo.broadcast("ignored")

    assert conform(body) is None


def test_stream_yields_a_future_per_actor(conform):
    def body(api):
        futures = list(api.probes.rank.stream())
        return sorted((f.get()["hosts"], f.get()["gpus"]) for f in futures)

    assert conform(body) == [[0, 0], [0, 1], [1, 0], [1, 1]]


def test_explicit_response_port(conform):
    def body(api):
        return api.probes.reply_twice.call(21).get(timeout=60)

    assert [v for _, v in conform(body)[2]] == [42] * 4


def test_accumulator_folds_every_result(conform):
    def body(api):
        if api.mode == "monarch":
            from monarch.actor import Accumulator
        else:
            from monarch_proxy import Accumulator
        total = Accumulator(api.probes.echo, 0, lambda acc, x: acc + x)
        return total.accumulate(3).get(timeout=60)

    assert conform(body) == 12


def test_actors_spawn_actors(conform):
    def body(api):
        return api.probes.slice(hosts=0, gpus=1).spawn_child.call_one("kid").get(timeout=60)

    assert conform(body)["label"] == "kid"


def test_endpoint_names_that_were_proxy_attributes(conform):
    def body(api):
        named = api.procs.spawn("named", Named)
        return [
            named.slice(hosts=0, gpus=0).name.call_one().get(timeout=60),
            named.kind.choose().get(timeout=60),
            named.handle.choose().get(timeout=60),
            named.connection.choose().get(timeout=60),
        ]

    assert conform(body) == ["name", "kind", "handle", "connection"]


def test_endpoint_named_like_a_mesh_method_is_refused(conform):
    def body(api):
        api.procs.spawn("collides", Collides)

    error = conform(body)
    assert error.type == "ValueError" and "collides with an endpoint name" in error.message


# Futures ------------------------------------------------------------------------------------


def test_future_result_exception_and_await(conform):
    def body(api):
        ok = api.probes.slice(hosts=0, gpus=0).echo.call_one(7)
        failing = api.probes.slice(hosts=0, gpus=0).fail.call_one("nope")
        error = failing.exception(timeout=60)

        async def awaited():
            return await api.probes.slice(hosts=1, gpus=1).echo.call_one("awaited")

        return [
            ok.result(timeout=60),
            ok.exception(timeout=60),
            error is not None,
            asyncio.run(awaited()),
        ]

    assert conform(body) == [7, None, True, "awaited"]


def test_future_get_timeout(conform):
    def body(api):
        api.probes.slice(hosts=0, gpus=0).sleep.call_one(2.0).get(timeout=0.2)

    assert conform(body, "future_timeout_message").type == "TimeoutError"


# ValueMesh, Point, Extent --------------------------------------------------------------------


def value_mesh(api):
    return api.probes.rank.call().get(timeout=60)


def test_value_mesh_methods(conform):
    def body(api):
        vm = value_mesh(api)
        return [
            vm.values(),
            [(dict(p), v) for p, v in vm.items()],
            [(p.rank, v) for p, v in vm],
            vm.item(hosts=1, gpus=0),
            vm.get(3),
            len(vm),
            vm.sizes,
            vm.size(),
            vm.size("gpus"),
            vm.extent,
            vm.slice(hosts=1),
            vm.slice(gpus=slice(1, 2)),
            vm.slice(hosts=0, gpus=1).item(),
            vm.flatten("rank"),
            vm.rename(hosts="dp"),
            vm.split(gpus=("a", "b"), a=1),
            pickle.loads(pickle.dumps(vm)),
        ]

    conform(body)


@pytest.mark.parametrize(
    ("case", "differences"),
    [
        (lambda vm: vm.item(hosts=0), ()),
        (lambda vm: vm.item(hosts=0, gpus=0, nodes=0), ()),
        (lambda vm: vm.item(hosts=5, gpus=0), ("item_index_message",)),
        (lambda vm: vm.get(4), ()),
        (lambda vm: vm.slice(nodes=0), ()),
        (lambda vm: vm.slice(hosts=2), ("slice_index_message",)),
        (lambda vm: vm.slice(gpus=slice(5, 8)), ()),
        (lambda vm: vm.slice(gpus=slice(None, None, -1)), ()),
        (lambda vm: vm.size("nodes"), ()),
        (lambda vm: vm.slice(gpus=slice(0, 2, 2)).flatten("r"), ()),
        (lambda vm: vm.split(hosts=("a", "b")), ()),
        (lambda vm: vm.split(gpus="ab"), ()),
        (lambda vm: vm.rename(hosts="gpus"), ()),
        (lambda vm: vm.split(gpus=("a", "b"), a=2, c=3), ()),
    ],
)
def test_value_mesh_bad_input(conform, case, differences):
    def body(api):
        return case(value_mesh(api))

    error = conform(body, *differences)
    assert isinstance(error, Raised)


def test_points_and_extents_are_mappings(conform):
    def body(api):
        vm = value_mesh(api)
        point = next(iter(vm.items()))[0]
        extent = vm.extent
        last = list(vm.items())[-1][0]
        return [
            dict(point),
            list(point),
            len(point),
            point.rank,
            point.extent,
            point["gpus"],
            point.size("gpus"),
            repr(last),
            last == list(vm.items())[-1][0],
            dict(extent),
            list(extent),
            len(extent),
            extent["hosts"],
            extent.labels,
            extent.sizes,
            extent.nelements,
            repr(extent),
            extent.keys(),
            pickle.loads(pickle.dumps(point)),
            pickle.loads(pickle.dumps(extent)),
        ]

    conform(body)

    def missing(api):
        return value_mesh(api).extent["nodes"]

    assert conform(missing).type == "ValueError"


def test_missing_label_in_a_point(conform):
    def body(api):
        point = next(iter(value_mesh(api).items()))[0]
        return ["nodes" in point, point.get("nodes", -1)]

    monarch, proxy = conform.both(body)
    assert "missing_label_is_key_error" in DIFFERENCES
    assert isinstance(monarch, Raised) and monarch.type == "ValueError"
    assert proxy == [False, -1]


# Mesh shapes --------------------------------------------------------------------------------


def test_mesh_slice_and_call(conform):
    def body(api):
        probes = api.probes
        column = probes.slice(gpus=slice(1, 2))
        return [
            column.extent,
            column.rank.call().get(timeout=60),
            probes.slice(hosts=1).sizes,
            probes.slice(hosts=1, gpus=1).pid.call_one().get(timeout=60)
            == probes.pid.call().get(timeout=60).item(hosts=1, gpus=1),
        ]

    assert conform(body)[3] is True


def test_mesh_flatten_rename_split(conform):
    def body(api):
        probes = api.probes
        flat = probes.flatten("rank")
        renamed = probes.rename(hosts="dp", gpus="tp")
        split = probes.split(gpus=("a", "b"), b=1)
        return [
            flat.extent,
            flat.rank.call().get(timeout=60),
            renamed.sizes,
            renamed.slice(dp=1, tp=0).rank.call_one().get(timeout=60),
            split.extent,
            split.rank.call().get(timeout=60),
        ]

    result = conform(body)
    assert result[0] == ("Extent", ["rank"], [4])


@pytest.mark.parametrize(
    ("case", "differences"),
    [
        (lambda m: m.slice(nodes=0), ()),
        (lambda m: m.slice(hosts=2), ("slice_index_message",)),
        (lambda m: m.slice(hosts=-1), ("slice_index_message",)),
        (lambda m: m.size("nodes"), ("mesh_repr",)),
        (lambda m: m.slice(gpus=slice(0, 2, 2)).flatten("r"), ()),
        (lambda m: m.split(hosts=("a", "b")), ()),
        (lambda m: m.rename(hosts="gpus"), ()),
    ],
)
def test_mesh_bad_input(conform, case, differences):
    def body(api):
        return case(api.probes)

    assert isinstance(conform(body, *differences), Raised)


def test_unpicklable_argument(conform):
    def body(api):
        api.probes.echo.call(threading.Lock()).get(timeout=60)

    assert conform(body, "unpicklable_argument_message").type == "TypeError"
    # The session goes on serving.
    assert conform(lambda api: api.probes.echo.choose(1).get(timeout=60)) == 1


def test_item_may_leave_out_labels_of_size_one(conform):
    def body(api):
        return value_mesh(api).slice(gpus=slice(1, 2)).item(hosts=1)

    monarch, proxy = conform.both(body)
    assert "item_size_one_labels" in DIFFERENCES
    assert isinstance(monarch, Raised) and monarch.type == "KeyError"
    assert proxy == {"hosts": 1, "gpus": 1}


def test_value_mesh_get_negative(conform):
    monarch, proxy = conform.both(lambda api: value_mesh(api).get(-1))
    assert "value_mesh_get_negative" in DIFFERENCES
    assert isinstance(monarch, Raised) and monarch.type == "OverflowError"
    assert isinstance(proxy, Raised) and proxy.type == "ValueError" and "-1" in proxy.message


def test_every_difference_is_in_the_proxy_readme():
    readme = Path(__file__).parents[3] / "monarch-proxy" / "README.md"
    table = re.findall(r"^\| `(\w+)` \|", readme.read_text(), re.MULTILINE)
    assert sorted(table) == sorted(DIFFERENCES)


def test_calls_on_a_stopped_mesh(conform):
    def body(api):
        procs = api.hosts.spawn_procs(per_host={"gpus": 1})
        actors = procs.spawn("stopped", Probe)
        actors.stop().get(timeout=60)
        try:
            actors.echo.call(1).get(timeout=30)
        finally:
            procs.stop().get(timeout=60)

    # The messages name actor and proc ids, which differ from run to run: compare the rest.
    monarch, proxy = conform.both(body)
    assert isinstance(monarch, Raised) and isinstance(proxy, Raised), (monarch, proxy)
    assert monarch.type in proxy.types, (monarch.type, proxy.types)
    for error in (monarch, proxy):
        assert "received explicit stop request" in error.message
