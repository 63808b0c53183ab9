"""Hot reload in one process: old references run the new code, reload after reload."""

from __future__ import annotations

import sys

from monarch_gateway.reload import reload_changed

SOURCE = """
def helper():
    return {n}

class Thing:
    def __init__(self):
        self.calls = 0

    def value(self):
        self.calls += 1
        return (helper() * 10, self.calls)
"""


def test_live_objects_run_new_code_across_reloads(tmp_path, monkeypatch):
    # Same size, same second: a cached .pyc would hide the edit (the synced tree is a fresh
    # directory per version, so it has no stale cache).
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    (tmp_path / "hotmod.py").write_text(SOURCE.format(n=1))
    monkeypatch.syspath_prepend(str(tmp_path))
    import hotmod

    thing, helper, bound = hotmod.Thing(), hotmod.helper, hotmod.Thing.value
    assert thing.value() == (10, 1)
    for n in (2, 3):  # twice: the second reload must still reach the original objects
        (tmp_path / "hotmod.py").write_text(SOURCE.format(n=n))
        assert reload_changed(str(tmp_path), ["hotmod.py"]) == ["hotmod"]
        assert thing.value() == (n * 10, n)  # same instance, state kept, new code
        assert helper() == n and hotmod.helper is helper
        assert hotmod.Thing.value is bound
    assert reload_changed(str(tmp_path), ["other.py"]) == []
    sys.modules.pop("hotmod", None)
