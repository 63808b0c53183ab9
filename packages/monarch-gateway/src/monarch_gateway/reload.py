"""Hot reload inside running actor processes: re-import changed modules, patch live classes.

The gateway spawns one :class:`HotReloader` per process mesh the first time a client asks for a
reload. ``importlib.reload`` alone would leave running actors on the old class objects, so the
reloader also copies the new class bodies onto the old classes: the next call to an endpoint of
an existing actor runs the new code, with the actor's state intact.
"""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType

from monarch.actor import Actor, endpoint

SYNC_ROOT_ENV = "MONARCH_SYNC_ROOT"  # the synced tree a worker host imports from


def synced_root() -> str | None:
    # Not realpath: the live tree is a symlink that each sync switches to a new version.
    root = os.environ.get(SYNC_ROOT_ENV)
    return os.path.abspath(root) if root else None


def patch_classes(module: ModuleType, old: dict[str, type]) -> None:
    """Point the old class objects at the reloaded module's definitions."""
    for name, old_class in old.items():
        new_class = getattr(module, name, None)
        if not isinstance(new_class, type) or new_class is old_class:
            continue
        for attr, value in vars(new_class).items():
            if attr in ("__dict__", "__weakref__"):
                continue
            try:
                setattr(old_class, attr, value)
            except (AttributeError, TypeError):
                pass  # read-only slots such as __doc__ on some types


def reload_changed(root: str, paths: list[str]) -> list[str]:
    """Reload the loaded modules whose files are among ``paths`` (relative to ``root``)."""
    importlib.invalidate_caches()
    changed = {os.path.realpath(os.path.join(root, p)) for p in paths}
    reloaded = []
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if not file or os.path.realpath(file) not in changed:
            continue
        old = {
            k: v for k, v in vars(module).items() if isinstance(v, type) and v.__module__ == name
        }
        importlib.reload(module)
        patch_classes(module, old)
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
