"""Run one test body against Monarch itself and through monarch-proxy, and compare what happens.

    def test_x(conform):
        def body(api):                      # api.hosts: a host mesh; api.probes: shared actors
            return api.probes.rank.call().get(timeout=60)
        conform(body)                       # same result, or same exception type and message

A deliberate difference is named (a key of DIFFERENCES, each with its reason; the package
README lists them all): ``conform(body, "slice_index_message")``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Difference:
    # "message": same exception type, another message; "behaviour": outcomes differ;
    # "session_tag": the same message once the session's tag is taken out of proc names
    kind: str
    reason: str


DIFFERENCES: dict[str, Difference] = {
    "slice_index_message": Difference(
        "message",
        "an out-of-range slice index raises IndexError naming the label, the index and the size; "
        "Monarch says only 'index out of range'",
    ),
    "item_index_message": Difference(
        "message",
        "ValueMesh.item with an out-of-range coordinate raises IndexError naming the label and "
        "size; Monarch says 'rank N not in current shape'",
    ),
    "item_size_one_labels": Difference(
        "behaviour",
        "ValueMesh.item may leave out labels of size 1 (Monarch raises KeyError); code that "
        "passes every label behaves the same",
    ),
    "missing_label_is_key_error": Difference(
        "behaviour",
        "Point/Extent raise UnknownLabelError, a ValueError as in Monarch and also a KeyError, "
        "so `label in point` and `point.get(label, default)` work as on any Mapping (Monarch's "
        "raise ValueError there)",
    ),
    "unpicklable_argument_message": Difference(
        "message",
        "an argument that cannot be pickled raises ArgumentEncodingError (a TypeError, as in "
        "Monarch) naming which argument it was",
    ),
    "value_mesh_get_negative": Difference(
        "behaviour",
        "ValueMesh.get(-1) raises ValueError like any index out of range; Monarch raises "
        "OverflowError from its Rust binding",
    ),
    "mesh_repr": Difference(
        "message",
        "a mesh's repr (quoted by size(dim) errors) names the proxy, not Monarch's internals",
    ),
    "unknown_endpoint_message": Difference(
        "message",
        "an unknown endpoint raises AttributeError naming the mesh, the endpoint and the "
        "endpoints it has, at once and for broadcast too; Monarch's says only the name",
    ),
    "proc_names_carry_session_tag": Difference(
        "session_tag",
        "the gateway names a session's proc meshes '<name>_<tag>' (Monarch: '<name>'), so "
        "output and supervision events reach only the session that spawned them; messages "
        "quoting a proc name show the tag",
    ),
    "default_fault_hook_logs": Difference(
        "behaviour",
        "with no fault hook set, a mesh failure no call was there to raise is logged; "
        "Monarch's default hook exits the client, a laptop on a shared gateway keeps going",
    ),
    "future_timeout_message": Difference(
        "message",
        "Future.get(timeout) raises CallTimeoutError (a TimeoutError) saying which call is still "
        "running",
    ),
}


@dataclass
class Api:
    """What a test body uses: Monarch's own objects, or monarch-proxy's."""

    mode: str  # "monarch" or "proxy"
    hosts: Any  # the host mesh of the shared workers
    ActorError: Any
    cache: dict[str, Any] = field(default_factory=dict)

    @property
    def procs(self) -> Any:
        """A proc mesh {hosts: 2, gpus: 2}, shared by the tests of a session."""
        if "procs" not in self.cache:
            self.cache["procs"] = self.hosts.spawn_procs(per_host={"gpus": 2})
        return self.cache["procs"]

    @property
    def probes(self) -> Any:
        """Probe actors on :attr:`procs`, shared (do not stop them)."""
        if "probes" not in self.cache:
            from conformance_actors import Probe

            self.cache["probes"] = self.procs.spawn("probes", Probe, "shared")
        return self.cache["probes"]

    def __repr__(self) -> str:
        return self.mode


@dataclass(frozen=True)
class Raised:
    types: tuple[str, ...]  # the exception's class and its bases, by name
    message: str
    error: BaseException

    @property
    def type(self) -> str:
        return self.types[0]


ADDRESS = re.compile(r"0x[0-9a-f]+")
# Ids Monarch generates anew for each mesh and process (in either mode): "<o2n2MCRdddQ>".
GENERATED_ID = re.compile(r"<[0-9A-Za-z]{8,16}>")
SESSION_TAG = re.compile(r"_o[0-9a-f]{12}\b")  # monarch_gateway.output.new_tag, after a name


def plain(value: Any) -> Any:
    """Monarch's and the proxy's objects as comparable plain data."""
    kind = type(value).__name__
    if kind == "ValueMesh":
        return ("ValueMesh", plain(value.extent), [(plain(p), plain(v)) for p, v in value.items()])
    if kind == "Extent":
        return ("Extent", list(value.labels), list(value.sizes))
    if kind == "Point":
        return ("Point", value.rank, dict(value))
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def outcome(body: Callable[[Api], Any], api: Api) -> Any:
    try:
        return plain(body(api))
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            raise
        names = tuple(t.__name__ for t in type(exc).__mro__)
        return Raised(names, GENERATED_ID.sub("<id>", ADDRESS.sub("0x?", str(exc))), exc)


class Conform:
    def __init__(self, monarch: Api, proxy: Api) -> None:
        self.monarch, self.proxy = monarch, proxy

    def both(self, body: Callable[[Api], Any]) -> tuple[Any, Any]:
        """Each mode's outcome (a plain value or a :class:`Raised`), uncompared."""
        return outcome(body, self.monarch), outcome(body, self.proxy)

    def __call__(self, body: Callable[[Api], Any], *differences: str) -> Any:
        """Run ``body`` both ways; assert the same outcome; return Monarch's."""
        kinds = {DIFFERENCES[name].kind for name in differences}  # unknown names fail here
        monarch, proxy = self.both(body)
        if "behaviour" in kinds:
            return monarch
        if isinstance(monarch, Raised) or isinstance(proxy, Raised):
            assert isinstance(monarch, Raised) and isinstance(proxy, Raised), (
                f"Monarch: {monarch!r}\nproxy:   {proxy!r}"
            )
            assert monarch.type in proxy.types, (
                f"Monarch raised {monarch.type}, the proxy {proxy.type} (bases {proxy.types})"
            )
            message = proxy.message
            if "session_tag" in kinds:
                message = SESSION_TAG.sub("", message)
            if "message" in kinds:
                assert message, "the proxy's message is empty"
            else:
                assert message == monarch.message, (
                    f"messages differ:\nMonarch: {monarch.message}\nproxy:   {message}"
                )
            return monarch
        assert proxy == monarch, f"results differ:\nMonarch: {monarch!r}\nproxy:   {proxy!r}"
        return monarch
