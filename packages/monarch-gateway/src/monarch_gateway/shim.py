"""Actors written with monarch-proxy's shim (``monarch_proxy.actor``) made into Monarch actors.

A laptop without torchmonarch subclasses ``monarch_proxy.actor.Actor``; before the gateway
spawns such a class it builds the same class over Monarch's real ``Actor``, each shim
``Endpoint`` made a real ``monarch.actor.endpoint`` with the same options, and the shim's
``current_rank``/``current_size``/``context`` in the methods' globals swapped for Monarch's
(so workers need nothing of monarch-proxy). Other classes pass through unchanged.
"""

from __future__ import annotations

import types
from typing import Any

from monarch_proxy import actor as shim


def to_monarch(cls: type) -> type:
    """The Monarch actor class ``cls`` stands for (``cls`` itself unless it uses the shim)."""
    if not (isinstance(cls, type) and issubclass(cls, shim.Actor)):
        return cls
    import monarch.actor

    namespace: dict[str, Any] = {}
    for base in reversed(cls.__mro__):  # the class and its shim bases, most derived last
        if base in (object, shim.Actor):
            continue
        for name, value in vars(base).items():
            if name in ("__dict__", "__weakref__"):
                continue
            if isinstance(value, shim.Endpoint):
                method = value.method
                if isinstance(method, types.FunctionType):
                    method = _rebound(method)
                value = monarch.actor.endpoint(method, **value.options)
            elif isinstance(value, types.FunctionType):
                value = _rebound(value)
            namespace[name] = value
    bases = tuple(b for b in cls.__bases__ if not issubclass(b, shim.Actor))
    mapped = type(cls.__name__, (*bases, monarch.actor.Actor), namespace)
    mapped.__qualname__ = cls.__qualname__
    return mapped


def _rebound(function: types.FunctionType) -> types.FunctionType:
    """``function`` with the shim's helpers in its globals replaced by Monarch's."""
    helpers = {
        name: value
        for name, value in function.__globals__.items()
        if isinstance(name, str) and any(value is h for h in shim.HELPERS.values())
    }
    if not helpers:
        return function
    import monarch.actor

    namespace = dict(function.__globals__)
    for name, value in helpers.items():
        real = next(k for k, h in shim.HELPERS.items() if h is value)
        namespace[name] = getattr(monarch.actor, real)
    rebound = types.FunctionType(
        function.__code__,
        namespace,
        function.__name__,
        function.__defaults__,
        function.__closure__,
    )
    rebound.__kwdefaults__ = function.__kwdefaults__
    rebound.__qualname__ = function.__qualname__
    rebound.__module__ = function.__module__
    rebound.__doc__ = function.__doc__
    rebound.__annotations__ = function.__annotations__
    return rebound
