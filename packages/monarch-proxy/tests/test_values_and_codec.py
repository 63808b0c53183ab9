"""ValueMesh coordinates, and how arguments, results and exceptions are encoded."""

import pickle
import threading

import pytest

from monarch_proxy import codec
from monarch_proxy.errors import (
    ActorImportError,
    ArgumentEncodingError,
    RemoteError,
    RemoteTraceback,
    UnknownHandleError,
)
from monarch_proxy.values import Extent, Point, ValueMesh


def test_value_mesh_coordinates_are_row_major():
    mesh = ValueMesh(Extent(("hosts", "gpus"), (2, 3)), list(range(6)))
    assert [p.coords for p, _ in mesh.items()][:4] == [
        {"hosts": 0, "gpus": 0},
        {"hosts": 0, "gpus": 1},
        {"hosts": 0, "gpus": 2},
        {"hosts": 1, "gpus": 0},
    ]
    assert mesh.item(hosts=1, gpus=2) == 5
    assert [p.rank for p, _ in mesh.items()] == list(range(6))
    with pytest.raises(KeyError, match="gpus"):
        mesh.item(hosts=1)
    with pytest.raises(IndexError, match="hosts=2"):
        mesh.item(hosts=2, gpus=0)
    with pytest.raises(KeyError, match="nodes"):
        mesh.item(nodes=0, hosts=0, gpus=0)
    with pytest.raises(ValueError, match="5 values"):
        ValueMesh(Extent(("hosts",), (4,)), [1, 2, 3, 4, 5])


def test_size_one_labels_may_be_omitted():
    mesh = ValueMesh(Extent(("hosts", "gpus"), (1, 2)), ["a", "b"])
    assert mesh.item(gpus=1) == "b"


def test_unpicklable_argument_is_named():
    with pytest.raises(ArgumentEncodingError, match="keyword argument 'lock'"):
        codec.dumps_call((1, 2), {"lock": threading.Lock()})
    with pytest.raises(ArgumentEncodingError, match="argument 1"):
        codec.dumps_call((1, threading.Lock()), {})


def test_lambdas_travel_by_value():
    args, _ = codec.loads(codec.dumps_call((lambda x: x + 1,), {}), "args")
    assert args[0](1) == 2


class Local(Exception):
    pass


def test_remote_exception_keeps_its_type_and_traceback():
    try:
        raise Local("bad input")
    except Local as exc:
        meta, payload = codec.encode_exception(exc)
    error = codec.decode_failure(meta, payload)
    assert type(error) is Local and str(error) == "bad input"
    assert isinstance(error.__cause__, RemoteTraceback)
    assert "raise Local" in error.__cause__.text


def test_unknown_remote_exception_type_becomes_remote_error():
    meta = {
        "category": "remote",
        "type": "workeronly.Boom",
        "message": "kaboom",
        "traceback": "Traceback ...\nworkeronly.Boom: kaboom",
    }
    # A pickle that names a module this process cannot import.
    payload = b"\x80\x05cworkeronly\nBoom\n)\x81."
    error = codec.decode_failure(meta, payload)
    assert isinstance(error, RemoteError)
    assert error.type_name == "workeronly.Boom" and "workeronly.Boom" in error.remote_traceback


@pytest.mark.parametrize(
    ("category", "error_type"),
    [
        ("unknown_handle", UnknownHandleError),
        ("actor_import", ActorImportError),
        ("bad_arguments", ArgumentEncodingError),
    ],
)
def test_gateway_failures_map_to_typed_errors(category, error_type):
    error = codec.decode_failure({"category": category, "message": "why"}, b"")
    assert type(error) is error_type and str(error) == "why"


def test_class_shipping_rules():
    def make():
        class Inner:
            pass

        return Inner

    assert codec.ships_by_value(make())
    assert not codec.ships_by_value(Local)
    assert codec.import_reference(codec.class_reference(ValueMesh)) is ValueMesh


def test_keep_freed_memory_tunes_glibc_on_linux():
    import sys

    from monarch_proxy import keep_freed_memory

    assert keep_freed_memory() is sys.platform.startswith("linux")


def test_points_and_extents_are_mappings():
    extent = Extent(["hosts", "gpus"], [2, 3])
    assert dict(extent) == {"hosts": 2, "gpus": 3} and len(extent) == 2
    assert extent.labels == ["hosts", "gpus"] and extent.nelements == 6
    assert repr(extent) == "{hosts: 2, gpus: 3}"
    point = Point(4, extent)
    assert dict(point) == {"hosts": 1, "gpus": 1} and point.size("gpus") == 3
    assert repr(point) == "{'hosts': 1/2, 'gpus': 1/3}"
    assert "nodes" not in point and point.get("nodes", -1) == -1
    with pytest.raises(ValueError, match="Dimension 'nodes' not found"):
        point["nodes"]
    assert pickle.loads(pickle.dumps(point)) == point
    with pytest.raises(ValueError, match="dimension mismatch"):
        Extent(["a"], [1, 2])


def test_value_mesh_shape_operations():
    mesh = ValueMesh(Extent(["hosts", "gpus"], [2, 4]), list("abcdefgh"))
    assert mesh.slice(gpus=slice(1, 3)).values() == ["b", "c", "f", "g"]
    sparse = mesh.slice(gpus=slice(0, 4, 2))
    assert sparse.values() == ["a", "c", "e", "g"] and sparse.item(hosts=1, gpus=1) == "g"
    with pytest.raises(ValueError, match="cannot flatten sparse mesh"):
        sparse.flatten("r")
    assert mesh.flatten("r").get(7) == "h"
    assert mesh.rename(hosts="dp").sizes == {"dp": 2, "gpus": 4}
    assert mesh.split(gpus=("a", "b"), a=2).item(hosts=1, a=1, b=0) == "g"
    assert mesh.size() == 8 and mesh.size("gpus") == 4 and mesh.size(("hosts", "gpus")) == 8
    with pytest.raises(TypeError, match="dimension labeled 'nodes'"):
        mesh.slice(nodes=0)
    with pytest.raises(IndexError, match="hosts=2"):
        mesh.slice(hosts=2)
    with pytest.raises(ValueError, match="index -1 out of range"):
        mesh.get(-1)
    with pytest.raises(ValueError, match="Duplicate dimension name 'gpus'"):
        mesh.rename(hosts="gpus")
    assert pickle.loads(pickle.dumps(mesh)) == mesh
