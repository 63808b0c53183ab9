"""Hot reload inside running actor processes: re-import changed modules, patch live classes.

The gateway spawns one :class:`HotReloader` per process mesh the first time a client asks for a
reload. ``importlib.reload`` alone would leave running actors on the old class objects (and
Monarch caches each actor's bound endpoint methods), so the reloader also gives the old function
objects the new code in place and copies other new class attributes onto the old classes: the
next call to an endpoint of an existing actor runs the new code, with the actor's state intact.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Mapping
from types import FunctionType, ModuleType

from monarch.actor import Actor, endpoint

SYNC_ROOT_ENV = "MONARCH_SYNC_ROOT"  # the synced tree a worker host imports from


def synced_root() -> str | None:
    # Not realpath: the live tree is a symlink that each sync switches to a new version.
    root = os.environ.get(SYNC_ROOT_ENV)
    return os.path.abspath(root) if root else None


def function_of(value: object) -> FunctionType | None:
    """The plain function behind a method, static/class method or Monarch endpoint."""
    for candidate in (value, getattr(value, "__func__", None), getattr(value, "_method", None)):
        if isinstance(candidate, FunctionType):
            return candidate
    return None


def update_function(old: FunctionType, new: FunctionType) -> bool:
    """Give ``old`` the code of ``new``, so every reference to ``old`` runs the new code."""
    try:
        old.__code__ = new.__code__  # fails if the closures differ in shape
    except ValueError:
        return False
    old.__defaults__ = new.__defaults__
    old.__kwdefaults__ = new.__kwdefaults__
    old.__dict__.update(new.__dict__)
    return True


def patch_module(module: ModuleType, old: Mapping[str, object]) -> None:
    """Carry a reload over to objects that outlive it: old functions and old classes.

    The module keeps the old objects, now holding the new code, so live actors, references
    held elsewhere and the next reload all see one object per name.
    """
    for name, old_value in old.items():
        new_value = getattr(module, name, None)
        if new_value is old_value:
            continue
        if isinstance(old_value, FunctionType) and isinstance(new_value, FunctionType):
            if update_function(old_value, new_value):
                setattr(module, name, old_value)
        elif isinstance(old_value, type) and isinstance(new_value, type):
            patch_class(old_value, new_value)
            setattr(module, name, old_value)


def patch_class(old_class: type, new_class: type) -> None:
    for attr, new_value in vars(new_class).items():
        if attr in ("__dict__", "__weakref__"):
            continue
        old_fn, new_fn = function_of(vars(old_class).get(attr)), function_of(new_value)
        if old_fn is not None and new_fn is not None and update_function(old_fn, new_fn):
            continue  # the old descriptor stays, now running the new code
        try:
            setattr(old_class, attr, new_value)
        except (AttributeError, TypeError):
            pass  # read-only attributes such as __doc__ on some types


def reload_changed(root: str, paths: list[str]) -> list[str]:
    """Reload the loaded modules whose files are among ``paths`` (relative to ``root``)."""
    importlib.invalidate_caches()
    changed = {os.path.realpath(os.path.join(root, p)) for p in paths}
    reloaded = []
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if not file or os.path.realpath(file) not in changed:
            continue
        # What the module defined itself (not what it imported): patched after the reload.
        old = {
            k: v
            for k, v in vars(module).items()
            if isinstance(v, type | FunctionType) and getattr(v, "__module__", None) == name
        }
        importlib.reload(module)
        patch_module(module, old)
        reloaded.append(name)
    return sorted(reloaded)


class HotReloader(Actor):
    @endpoint
    def reload(self, paths: list[str]) -> list[str]:
        root = synced_root()
        if root is None:
            return []
        if root not in (os.path.abspath(p) for p in sys.path if p):
            sys.path.insert(0, root)
        return reload_changed(root, paths)
