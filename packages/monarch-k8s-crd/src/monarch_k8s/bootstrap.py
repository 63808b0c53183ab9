"""The init container that replays ``kt.Image`` steps at pod start, without an image build.

    python -m monarch_k8s.bootstrap        # reads MONARCH_SETUP_PLAN (JSON, see spec.setup_plan)

``pip`` steps install into ``<cache>/<hash>/site`` (the worker's PYTHONPATH), ``bash`` steps
run with the cache folder as working directory, ``copy`` steps copy files from the ConfigMap the
job created into ``<cache>/<hash>/files/<dest>`` (a container's own filesystem is not shared with
the init container; that folder is on the worker's PYTHONPATH and in ``MONARCH_SETUP_FILES``). A ``done`` marker per plan hash makes a restarted pod (or another pod of the same
plan on the node, with the hostPath cache) skip all of it; a lock serialises pods that start
together on one node.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from monarch_k8s.spec import SETUP_DIR, SETUP_FILES_DIR


def run(plan: dict[str, Any], cache: Path, files_dir: Path) -> bool:
    """Apply ``plan`` unless already done; True when it ran."""
    home = cache / plan["hash"]
    home.mkdir(parents=True, exist_ok=True)
    with open(home / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (home / "done").exists():
            return False
        site = home / "site"
        site.mkdir(exist_ok=True)
        env = {**os.environ, **plan["env"], "PYTHONPATH": str(site)}
        for step in plan["steps"]:
            if step["kind"] == "pip":
                argv = [sys.executable, "-m", "pip", "install", "-q", "--target", str(site)]
                subprocess.run([*argv, *step["args"]], check=True, env=env)
            else:
                subprocess.run(["bash", "-c", step["args"][0]], check=True, env=env, cwd=home)
        for entry in plan["files"]:
            dest = home / "files" / entry["dest"].lstrip("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(files_dir / entry["key"], dest)
        (home / "done").write_text("ok\n")
        return True


def main() -> None:
    plan = json.loads(os.environ["MONARCH_SETUP_PLAN"])
    ran = run(plan, Path(os.environ.get("MONARCH_SETUP_DIR", SETUP_DIR)), Path(SETUP_FILES_DIR))
    print(f"monarch setup {plan['hash']}: {'applied' if ran else 'cached, skipped'}", flush=True)


if __name__ == "__main__":
    main()
