"""Views of a mesh other than ``slice``: ``split``, ``flatten`` and ``rename``, as Monarch has them.

The proxy computes the view's shape itself (monarch_proxy.values.ShapeOps, so bad input fails
on the laptop with Monarch's exception types) and sends the call here, to be repeated on the
real mesh: ``{"view": "split", "args": {"hosts": ["dp", "pp"], "pp": 2}}``.
"""

from __future__ import annotations

from typing import Any

from monarch_proxy.errors import ProtocolError

VIEWS = frozenset({"split", "flatten", "rename"})


def apply_view(mesh: Any, meta: dict[str, Any]) -> Any:
    """The real mesh ``mesh.<view>(**args)``; Monarch's own errors pass through."""
    view, args = meta.get("view"), meta.get("args")
    if view not in VIEWS or not isinstance(args, dict):
        raise ProtocolError(f"a mesh view is one of {sorted(VIEWS)} with an args object")
    for key, value in args.items():
        ok = isinstance(value, int | str) or (
            isinstance(value, list) and all(isinstance(v, str) for v in value)
        )
        if not isinstance(key, str) or isinstance(value, bool) or not ok:
            raise ProtocolError(f"view argument {key!r} must be an int, a str or a list of str")
    if view == "flatten":
        return mesh.flatten(args.get("name"))
    return getattr(mesh, view)(**args)
