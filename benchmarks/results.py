"""Where benchmark figures go: pretty JSON, parent folders created."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def save_json(path: Path, figures: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"wrote {path}")
