"""The init container's replay of image steps: applied once, then skipped from the cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from monarch_k8s.bootstrap import run
from monarch_k8s.spec import MeshSpec, SetupStep, mesh_manifest, setup_files


def test_steps_run_once_and_a_restarted_pod_skips_them(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "settings.py").write_text("LR = 0.5\n")
    spec = MeshSpec(
        setup=(
            SetupStep("env", ("GREETING=hi",)),
            SetupStep("bash", ('echo "$GREETING" >> ran.txt',)),
            SetupStep("copy", (str(tmp_path / "src"), "pkg")),
        )
    )
    data, files = setup_files(spec)
    body = mesh_manifest("m", "ns", spec, files_configmap="m-setup-files", files=files)
    init = body["spec"]["podTemplate"]["spec"]["initContainers"][0]
    plan = json.loads(init["env"][0]["value"])
    # the ConfigMap volume as the kubelet writes it: one file per key
    mounted = tmp_path / "configmap"
    mounted.mkdir()
    import base64

    for key, value in data.items():
        (mounted / key).write_bytes(base64.b64decode(value))
    cache = tmp_path / "cache"
    os.environ["GREETING"] = "overridden"  # the plan's env wins, as the pod's env would
    try:
        assert run(plan, cache, mounted) is True
        assert run(plan, cache, mounted) is False  # cached: nothing runs again
    finally:
        del os.environ["GREETING"]
    home = cache / plan["hash"]
    assert (home / "ran.txt").read_text() == "hi\n"
    assert (home / "files" / "pkg" / "src" / "settings.py").read_text() == "LR = 0.5\n"
    # the worker imports copied code through the PYTHONPATH the manifest sets
    out = subprocess.run(
        [sys.executable, "-c", "import pkg.src.settings as s; print(s.LR)"],
        env={**os.environ, "PYTHONPATH": str(home / "files")},
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert out.stdout.strip() == "0.5"
