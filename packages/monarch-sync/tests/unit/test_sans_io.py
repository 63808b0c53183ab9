"""The protocol core must not do I/O: guard the line by parsing its imports."""

import ast
from pathlib import Path

import monarch_sync

CORE = ["protocol.py", "frames.py", "manifest.py", "diff.py", "tree.py", "relay.py", "recovery.py"]
FORBIDDEN = {"asyncio", "socket", "os", "subprocess", "threading", "time", "random", "secrets"}


def test_core_modules_import_no_io() -> None:
    root = Path(monarch_sync.__file__).parent
    for name in CORE:
        tree = ast.parse((root / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods = {node.module.split(".")[0]}
            else:
                continue
            assert not mods & FORBIDDEN, f"{name} imports {mods & FORBIDDEN}"
