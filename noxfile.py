"""The cross-package test matrix. `python3 -m nox -l` lists the sessions.

- tests(package=...): each workspace member's own tests, in a venv holding only that member and
  its declared dependencies (so an undeclared import of a sibling fails here);
- integration: every package together, plus the quickstart and the README's Kubernetes
  commands end to end;
- lint, typecheck: ruff and mypy over the whole tree;
- wheels: build each package's wheel and install it alone in a fresh venv.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import nox

ROOT = Path(__file__).parent
PACKAGES = sorted(p.parent.name for p in ROOT.glob("packages/*/pyproject.toml"))
REPORTS = ROOT / ".nox" / "reports"

nox.options.default_venv_backend = "uv"
nox.options.reuse_venv = "yes"
nox.options.error_on_missing_interpreters = True
os.environ.setdefault("UV_PYTHON_DOWNLOADS", "never")

try:  # nox finds uv on PATH; a pip-installed uv may live outside it (e.g. under pyenv)
    from uv import find_uv_bin

    os.environ["PATH"] = f"{Path(find_uv_bin()).parent}{os.pathsep}{os.environ['PATH']}"
except ImportError:
    pass


def sync(session: nox.Session, *args: str) -> None:
    """Install exactly what uv.lock says into this session's venv."""
    session.run_install(
        "uv",
        "sync",
        "--locked",
        "--inexact",
        *args,
        env={"UV_PROJECT_ENVIRONMENT": session.virtualenv.location},
    )


def pytest(session: nox.Session, name: str, *paths: str) -> None:
    REPORTS.mkdir(parents=True, exist_ok=True)
    session.run(
        "python", "-m", "pytest", *paths, f"--junitxml={REPORTS / f'{name}.xml'}", *session.posargs
    )


def import_name(package: str) -> str:
    meta = tomllib.loads((ROOT / "packages" / package / "pyproject.toml").read_text())
    return str(meta["tool"]["uv"]["build-backend"]["module-name"])


@nox.session
@nox.parametrize("package", PACKAGES)
def tests(session: nox.Session, package: str) -> None:
    if not any((ROOT / "packages" / package / "tests").rglob("test_*.py")):
        session.skip(f"{package} has no tests yet")
    groups = tomllib.loads((ROOT / "packages" / package / "pyproject.toml").read_text()).get(
        "dependency-groups", {}
    )
    sync(session, "--package", package, *(f"--group={g}" for g in groups))  # dev, and e.g. ddp
    if package == "k8s-testenv":  # build (or reuse) the control plane first, with its progress
        session.run("k8s-testenv", "build")
    pytest(session, package, f"packages/{package}/tests")


@nox.session
def integration(session: nox.Session) -> None:
    sync(session, "--all-packages", "--group=ddp")  # torch: the README's torchrun job runs here
    session.run("k8s-testenv", "build")  # the README's cluster; with its progress, as in tests
    session.run("python", "examples/quickstart.py", "--hosts", "2")
    pytest(session, "integration", "tests/integration")


@nox.session
def lint(session: nox.Session) -> None:
    sync(session, "--all-packages")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    sync(session, "--all-packages")
    for package in PACKAGES:
        session.run("mypy", f"packages/{package}/src")


# What each layer's wheel must install without: the laptop layer needs no Monarch, and the
# proxy and monarch-sync are independent leaves (JobState.sync() finds monarch-sync by name).
ABSENT_FROM = {
    "monarch-proxy": ("monarch", "monarch_sync"),
    "monarch-sync": ("monarch", "monarch_proxy", "monarch_gateway"),
    # the laptop side of SkyPilotJob; the head node's gateway comes with its `node` extra
    "monarch-skypilot": ("monarch_gateway",),
}
SERVING_PATH_IMPORTS_NO_SYNC = (
    "import sys, monarch_gateway.app, monarch_gateway.server, monarch_gateway.cli; "
    "sys.exit('monarch_sync' in sys.modules and 'the serving path imported monarch_sync')"
)


@nox.session
def wheels(session: nox.Session) -> None:
    """Each layer installs and imports on its own, with only its declared dependencies."""
    dist = Path(session.create_tmp()) / "dist"
    session.run("uv", "build", "--all-packages", "--no-sources", "--out-dir", str(dist))
    for package in PACKAGES:
        wheel = next(dist.glob(f"{package.replace('-', '_')}-*.whl"))
        venv = Path(session.create_tmp()) / f"venv-{package}"
        session.run("uv", "venv", "--quiet", "--clear", str(venv))
        python = str(venv / "bin" / "python")
        session.run(
            "uv",
            "pip",
            "install",
            "--quiet",
            "--python",
            python,
            "--find-links",
            str(dist),
            # uv caches a local wheel by its path and name: a rebuilt 0.1.0 must not be
            # answered with the one an earlier run built at the same place
            *(f"--refresh-package={p}" for p in PACKAGES),
            str(wheel),
        )
        module = import_name(package)
        session.run(
            python,
            "-c",
            f"import {module}, importlib.metadata as m; "
            f"print({module}.__name__, m.version({package!r}))",
            external=True,
        )
        for absent in ABSENT_FROM.get(package, ()):  # leaves stay leaves
            session.run(
                python,
                "-c",
                f"import importlib.util, sys; sys.exit(importlib.util.find_spec({absent!r}) "
                f"is not None and 'installed: {absent}')",
                external=True,
            )
        if package == "monarch-gateway":  # the serving path only relays sync bytes
            session.run(python, "-c", SERVING_PATH_IMPORTS_NO_SYNC, external=True)
