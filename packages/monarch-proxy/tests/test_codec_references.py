"""Pure parts of issue 11's wire fidelity: ActorError mapping, meshes as persistent ids."""

from __future__ import annotations

import pickle

import pytest

from monarch_proxy import codec
from monarch_proxy.errors import ActorError, RemoteTraceback, actor_error
from monarch_proxy.meshes import ActorMeshProxy
from monarch_proxy.values import Extent, ValueMesh


class FakeConnection:
    def __init__(self) -> None:
        self.released: list[int] = []

    def release(self, handle: int) -> None:
        self.released.append(handle)


def test_actor_error_is_also_the_original_type():
    error = actor_error(KeyError("k"), "Actor call w.get failed.", "Traceback...\nKeyError: 'k'")
    assert isinstance(error, ActorError) and isinstance(error, KeyError)
    assert isinstance(error.exception, KeyError) and error.args == ("k",)
    assert str(error) == "Actor call w.get failed.\n Traceback...\nKeyError: 'k'"
    assert type(actor_error(KeyError("x"), "m", "t")) is type(error)  # one class per type
    again = pickle.loads(pickle.dumps(error))
    assert isinstance(again, KeyError) and again.message == error.message


def test_actor_error_of_a_type_that_refuses_subclasses_carries_it():
    class Final(Exception):
        def __init_subclass__(cls, **kwargs: object) -> None:
            raise TypeError("final")

    error = actor_error(Final("no"), "m", "t")
    assert isinstance(error, ActorError) and not isinstance(error, Final)
    assert isinstance(error.exception, Final) and "m" in str(error)


def test_failure_of_an_actor_decodes_as_actor_error_with_its_traceback():
    try:
        raise ValueError("boom")
    except ValueError as exc:
        meta, payload = codec.encode_exception(exc, "remote tb", actor_message="Actor call failed.")
    error = codec.decode_failure(meta, payload)
    assert isinstance(error, ActorError) and isinstance(error, ValueError)
    assert isinstance(error.__cause__, RemoteTraceback) and error.exception_formatted == "remote tb"


def test_mesh_proxies_in_arguments_travel_as_their_handles():
    conn = FakeConnection()
    mesh = ActorMeshProxy(conn, 7, Extent(("hosts",), (2,)), "w")  # type: ignore[arg-type]
    payload, refs = codec.encode_call(({"nested": [mesh]},), {"m": mesh})
    assert refs == [7, 7]
    seen = []

    def load(pid: object) -> object:
        seen.append(pid)
        return "the real mesh"

    (arg,), kwargs = codec.loads(payload, "args", load)
    assert arg == {"nested": ["the real mesh"]} and kwargs == {"m": "the real mesh"}
    assert seen == [(codec.MESH_REF, 7)] * 2
    assert codec.encode_call((1, "x"), {})[1] is None  # plain arguments: no persistent ids


def test_value_meshes_travel_as_extent_and_values():
    values = ValueMesh(Extent(("gpus",), (2,)), ["a", "b"])
    payload, refs = codec.encode_call((values,), {})
    assert refs == []  # persistent ids, but no handle to resolve
    (pid,), _ = codec.loads(payload, "args", lambda pid: pid)
    assert pid == (codec.VALUE_MESH_REF, ["gpus"], [2], ["a", "b"])


def test_results_with_references_say_so():
    data, used = codec.encode_value([1, 2], lambda: pytest.fail("plain values skip the hook"))
    assert not used and pickle.loads(data) == [1, 2]
    data, used = codec.encode_value({"m": object}, lambda: lambda o: "ref" if o is object else None)
    assert used
    assert codec.value_from({"refs": 1}, data, load_ref=lambda pid: pid) == {"m": "ref"}
    with pytest.raises(TypeError):  # ArgumentEncodingError: a reference nobody can resolve
        codec.value_from({"refs": 1}, data, load_ref=None)
