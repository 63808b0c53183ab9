"""Build (once) and locate the control-plane binaries.

The Go module in ``tools/k8s-testenv`` builds kube-apiserver, kube-controller-manager,
kube-scheduler and kubectl from ``k8s.io/kubernetes`` and its staging modules, plus the kubelet's
streaming helper (``kubelet-streaming``); its ``etcd/`` sub-module builds etcd, and ``etcd-v2/``
builds ``etcd-v2`` (etcd 3.5, the last line with the v2 API, for pods that need one: torchrun's
etcd-v2 rendezvous; the control plane does not use it). Binaries go to
``tools/k8s-testenv/bin`` (git-ignored) together with a fingerprint of the Go sources, so a
later run reuses them without even invoking ``go`` unless go.mod, go.sum or a .go file changed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from k8s_testenv.exceptions import BuildError, MissingToolError

__all__ = [
    "KUBE_VERSION",
    "Binaries",
    "build_binaries",
    "ensure_binaries",
    "find_go",
    "tools_dir",
]

#: The k8s.io/kubernetes release the tools module requires (kept in step with its go.mod).
KUBE_VERSION = "v1.37.2"
_RELEASE_DATE = "2026-10-27T12:01:04Z"  # from the module proxy's .info for KUBE_VERSION
#: Where Go's official tarball installs it, which is often not on PATH.
GO_FALLBACKS: tuple[str, ...] = ("/usr/local/go/bin/go",)
#: Everything ``./cmd/...`` builds (one folder per program).
KUBE_COMPONENTS = (
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubectl",
    "kubelet-streaming",
)
_GO_HINT = (
    "Install Go >= 1.26 (https://go.dev/dl/, or put it at /usr/local/go/bin/go) so the "
    "control plane can be built from the Go module proxy, or set K8S_TESTENV_BIN_DIR to a "
    "folder holding prebuilt kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, "
    "kubelet-streaming, etcd and etcd-v2."
)


@dataclass(frozen=True)
class Binaries:
    """Paths of the programs a cluster needs, and of the matching kubectl."""

    etcd: Path
    kube_apiserver: Path
    kube_controller_manager: Path
    kube_scheduler: Path
    kubectl: Path
    kubelet_streaming: Path
    #: etcd 3.5 with the v2 API (``--enable-v2``), for pods; not the control plane's etcd
    etcd_v2: Path


def tools_dir() -> Path:
    """The Go module folder, ``$K8S_TESTENV_TOOLS_DIR`` or ``tools/k8s-testenv`` in this repo."""
    env = os.environ.get("K8S_TESTENV_TOOLS_DIR")
    if env:
        return Path(env)
    # src/k8s_testenv/build.py -> packages/k8s-testenv -> repository root
    return Path(__file__).resolve().parents[4] / "tools" / "k8s-testenv"


def bin_dir() -> Path:
    env = os.environ.get("K8S_TESTENV_BIN_DIR")
    return Path(env) if env else tools_dir() / "bin"


def find_go() -> Path:
    """Return the go executable or raise MissingToolError naming it."""
    for candidate in (os.environ.get("GO"), shutil.which("go"), *GO_FALLBACKS):
        if candidate and os.access(candidate, os.X_OK):
            return Path(candidate)
    raise MissingToolError("go", _GO_HINT)


def _version_ldflags() -> str:
    # The same -X flags hack/lib/version.sh passes, so clients see a real server version.
    major, minor = KUBE_VERSION.lstrip("v").split(".")[:2]
    values = {
        "gitVersion": KUBE_VERSION,
        "gitMajor": major,
        "gitMinor": minor,
        "gitTreeState": "clean",
        "buildDate": _RELEASE_DATE,  # fixed, so relinking is reproducible
    }
    return " ".join(
        f"-X {pkg}.{key}={value}"
        for pkg in ("k8s.io/client-go/pkg/version", "k8s.io/component-base/version")
        for key, value in values.items()
    )


def _fingerprint(tools: Path) -> str:
    digest = hashlib.sha256(KUBE_VERSION.encode())
    sources = sorted(tools.glob("go.*")) + sorted(tools.glob("cmd/**/*.go"))
    for module in ("etcd", "etcd-v2"):
        sources += sorted(tools.glob(f"{module}/go.*")) + sorted(tools.glob(f"{module}/*.go"))
    for path in sources:
        digest.update(str(path.relative_to(tools)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _binaries_in(folder: Path) -> Binaries:
    return Binaries(
        etcd=Path(os.environ.get("K8S_TESTENV_ETCD") or folder / "etcd"),
        kube_apiserver=folder / "kube-apiserver",
        kube_controller_manager=folder / "kube-controller-manager",
        kube_scheduler=folder / "kube-scheduler",
        kubectl=folder / "kubectl",
        kubelet_streaming=folder / "kubelet-streaming",
        etcd_v2=folder / "etcd-v2",
    )


def _all_exist(binaries: Binaries) -> bool:
    return all(os.access(p, os.X_OK) for p in vars(binaries).values())


def build_binaries(*, force: bool = False, log: bool = True) -> Binaries:
    """Run ``go build`` for the control plane, etcd and etcd-v2 into :func:`bin_dir`.

    Go's own build cache makes a rebuild after a cold one take seconds. ``force`` rebuilds even
    when the fingerprint matches.
    """
    tools = tools_dir()
    if not (tools / "go.mod").is_file():
        raise BuildError(
            "the control plane",
            f"no Go module at {tools}: set K8S_TESTENV_TOOLS_DIR to the monorepo's "
            "tools/k8s-testenv folder, or K8S_TESTENV_BIN_DIR to prebuilt binaries",
        )
    out = bin_dir()
    stamp = out / ".fingerprint"
    fingerprint = _fingerprint(tools)
    binaries = _binaries_in(out)
    fresh = stamp.is_file() and stamp.read_text().strip() == fingerprint
    if not force and fresh and _all_exist(binaries):
        return binaries
    go = find_go()
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "CGO_ENABLED": "0"}
    steps = [
        (
            f"{', '.join(KUBE_COMPONENTS)}",
            tools,
            ["-ldflags", _version_ldflags(), "-o", f"{out}/", "./cmd/..."],
        ),
        ("etcd", tools / "etcd", ["-o", str(out / "etcd"), "."]),
        ("etcd-v2", tools / "etcd-v2", ["-o", str(out / "etcd-v2"), "."]),
    ]
    for target, cwd, args in steps:
        started = time.monotonic()
        if log:
            print(
                f"k8s-testenv: building {target} (a cold build takes many minutes) ...", flush=True
            )
        proc = subprocess.run(
            [str(go), "build", *args], cwd=cwd, env=env, capture_output=True, text=True
        )
        if proc.returncode != 0:
            raise BuildError(target, (proc.stdout + proc.stderr)[-4000:])
        if log:
            print(f"k8s-testenv: built {target} in {time.monotonic() - started:.0f}s", flush=True)
    stamp.write_text(fingerprint + "\n")
    return binaries


def ensure_binaries() -> Binaries:
    """Return usable binaries, building them if needed.

    With ``K8S_TESTENV_BIN_DIR`` set, the binaries there are used as they are and Go is not
    required. Otherwise this builds or reuses the cache.
    """
    if os.environ.get("K8S_TESTENV_BIN_DIR"):
        binaries = _binaries_in(bin_dir())
        missing = [str(p) for p in vars(binaries).values() if not os.access(p, os.X_OK)]
        if missing:
            raise MissingToolError(Path(missing[0]).name, f"Not executable: {', '.join(missing)}")
        return binaries
    return build_binaries(log=True)
