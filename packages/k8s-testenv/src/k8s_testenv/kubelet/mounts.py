"""The I/O half of volumes: set up a pod's volumes on disk, keep written ones current, prepare
each container's bind mounts, and tear everything down when the pod goes.

Layout (as upstream): ``<pod folder>/volumes/kubernetes.io~<kind>/<name>``. emptyDir is a
folder (``medium: Memory``: a tmpfs mounted in the kubelet's mount namespace, so it vanishes
with the kubelet); configMap, secret, downwardAPI and projected volumes are written by
:func:`write_atomic`, the kubelet's AtomicWriter (``..data`` symlink swap); hostPath and
persistentVolumeClaim volumes are host folders. Containers see them through bind mounts made
inside their own mount namespace (:func:`~k8s_testenv.kubelet.volumes.mount_script`).
Decisions live in :mod:`k8s_testenv.kubelet.volumes`.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Executor, Future
from pathlib import Path
from typing import Any, Protocol

from k8s_testenv.kubelet import volumes as vol
from k8s_testenv.kubelet.network import sandbox_support
from k8s_testenv.kubelet.podspec import ConfigError, PodNetwork

__all__ = ["PodVolumes", "Sources", "write_atomic"]

log = logging.getLogger("k8s_testenv.kubelet")
_DATA, _DATA_TMP = "..data", "..data_tmp"
_REFRESH_S = 10.0  # written volumes are also re-checked on every ConfigMap/Secret change
_RETRY_BASE_S, _RETRY_CAP_S = 0.5, 4.0
_AUTOMOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"


class Sources(Protocol):
    """Where volume contents come from (:class:`~k8s_testenv.kubelet.objects.ApiSources`)."""

    generation: int

    def object(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None: ...

    def claim(
        self, namespace: str, name: str
    ) -> tuple[dict[str, Any] | None, dict[str, Any] | None]: ...

    def token(self, pod: Mapping[str, Any], spec: vol.TokenSpec) -> tuple[str, float]: ...


def write_atomic(target: Path, files: Mapping[str, vol.File]) -> None:
    """Publish ``files`` in ``target`` at once, as the kubelet's AtomicWriter does.

    Files go to a new timestamped folder; the ``..data`` symlink is renamed over to point at
    it; each top-level name is a symlink through ``..data``; names no longer in ``files`` are
    removed, then the previous folder. Readers never see a half-written volume.
    """
    target.mkdir(parents=True, exist_ok=True)
    data = target / _DATA
    old = os.readlink(data) if data.is_symlink() else None
    stamp = time.strftime("..%Y_%m_%d_%H_%M_%S.", time.gmtime())
    new = Path(tempfile.mkdtemp(prefix=stamp, dir=target))
    new.chmod(0o755)
    for rel, file in files.items():
        path = new / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(file.data)
        path.chmod(file.mode)
    tmp = target / _DATA_TMP
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(new.name)
    tmp.rename(data)
    top = {rel.split("/", 1)[0] for rel in files}
    for name in top:
        link = target / name
        if not link.is_symlink():
            link.symlink_to(f"{_DATA}/{name}")
    if old is not None:
        previous = {p.name for p in (target / old).iterdir()} if (target / old).is_dir() else set()
        for name in previous - top:
            (target / name).unlink(missing_ok=True)
        shutil.rmtree(target / old, ignore_errors=True)


def _file_type(path: str) -> str | None:
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return None
    for check, name in (
        (stat.S_ISDIR, "Directory"),
        (stat.S_ISREG, "File"),
        (stat.S_ISSOCK, "Socket"),
        (stat.S_ISCHR, "CharDevice"),
        (stat.S_ISBLK, "BlockDevice"),
    ):
        if check(mode):
            return name
    return "Unknown"


class PodVolumes:
    """The volumes of one pod. :meth:`sync` is called from the kubelet loop and does not wait
    on the network: set-up (TokenRequests, claims) runs on ``executor``, is retried with
    back-off and records an Event per failure; written volumes are refreshed in place."""

    def __init__(
        self,
        pod: Mapping[str, Any],
        root: Path,
        *,
        net: PodNetwork,
        sources: Sources,
        node_memory: str,
        warn: Callable[[str, str], None],
        executor: Executor | None = None,
        wake: Callable[[], None] = lambda: None,
    ) -> None:
        self.pod = pod
        self.root = root / "volumes"
        self.net = net
        self.sources = sources
        self.node_memory = node_memory
        self.warn = warn
        self.executor = executor
        self.wake = wake  # called when a set-up on the executor ends, so sync runs again soon
        self._pending: Future[None] | None = None
        self._specs = {v["name"]: v for v in pod["spec"].get("volumes") or []}
        #: volume name -> (host path, mounted read-only) once set up
        self.paths: dict[str, tuple[str, bool]] = {}
        self._files: dict[str, dict[str, vol.File]] = {}
        self._tokens: dict[vol.TokenSpec, tuple[str, float]] = {}
        self._tmpfs: list[Path] = []
        self._failures = 0
        self._retry_at = 0.0
        self._checked: tuple[int, str] | None = None
        self._check_at = 0.0

    @property
    def ready(self) -> bool:
        return len(self.paths) == len(self._specs)

    def sync(self, pod: Mapping[str, Any], now: float) -> bool:
        """Set up missing volumes (when due) and refresh written ones; True when all are up."""
        self.pod = pod
        generation = self.sources.generation
        if not self.ready:
            if self._pending is not None:
                if not self._pending.done():
                    return False
                self._pending = None
                if self.ready:
                    return True
            if now < self._retry_at and self._checked == (generation, ""):
                return False
            self._checked = (generation, "")
            if self.executor is None:
                self._setup(now)
                return self.ready
            self._pending = self.executor.submit(self._setup, now)
            self._pending.add_done_callback(lambda _: self.wake())
            return False
        version = (generation, str(pod["metadata"].get("resourceVersion", "")))
        if version != self._checked or now >= self._check_at:
            self._checked, self._check_at = version, now + _REFRESH_S
            for name in list(self._files):
                try:
                    self._write(self._specs[name], now)
                except (vol.VolumeError, OSError) as exc:
                    self._failed(name, exc)
        return True

    def _setup(self, now: float) -> None:
        failed = False
        for name, spec in self._specs.items():
            if name in self.paths:
                continue
            try:
                self.paths[name] = self._setup_one(spec, now)
            except Exception as exc:  # VolumeError, OSError, or a spec we did not foresee
                self._failed(name, exc)
                failed = True
        if failed:
            delay = min(_RETRY_CAP_S, _RETRY_BASE_S * 2**self._failures)
            self._failures += 1
            self._retry_at = now + delay

    def _failed(self, name: str, exc: Exception) -> None:
        message = f'MountVolume.SetUp failed for volume "{name}" : {exc}'
        log.info(
            "%s/%s: %s", self.pod["metadata"]["namespace"], self.pod["metadata"]["name"], message
        )
        self.warn("FailedMount", message)

    def _setup_one(self, spec: Mapping[str, Any], now: float) -> tuple[str, bool]:
        kind = vol.volume_kind(spec)
        if kind == "hostPath":
            path = spec["hostPath"]["path"]
            action = vol.hostpath_action(path, spec["hostPath"].get("type", ""), _file_type(path))
            if action == "mkdir":
                os.makedirs(path, 0o755, exist_ok=True)
            elif action == "touch":
                Path(path).touch(0o644)
            return path, False
        if kind in ("persistentVolumeClaim", "ephemeral"):
            claim, read_only = vol.claim_of(spec, self.pod)
            pvc, pv = self.sources.claim(self.pod["metadata"]["namespace"], claim)
            owner = self.pod if kind == "ephemeral" else None
            return vol.claim_path(claim, pvc, pv, owner=owner), read_only
        folder = self.root / str(vol.plugin_dir(spec)) / spec["name"]
        if kind == "emptyDir":
            folder.mkdir(parents=True, exist_ok=True)
            folder.chmod(0o777)
            if spec["emptyDir"].get("medium") == "Memory" and folder not in self._tmpfs:
                size = vol.memory_size(spec, self.pod, self.node_memory)
                _run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0777", "tmpfs", str(folder)])
                self._tmpfs.append(folder)
            return str(folder), False
        self._write(spec, now)
        return str(folder), True  # volumes the kubelet writes are always read-only, as upstream

    def _write(self, spec: Mapping[str, Any], now: float) -> None:
        """(Re)compute a written volume's files and publish them if they changed."""
        namespace = self.pod["metadata"]["namespace"]
        objects = {
            ref: self.sources.object(ref[0], namespace, ref[1]) for ref in vol.object_refs(spec)
        }
        for token_spec in vol.token_specs(spec):
            held = self._tokens.get(token_spec)
            if held is None or vol.token_needs_refresh(token_spec, held[1], now):
                self._tokens[token_spec] = self.sources.token(self.pod, token_spec)
        tokens = {k: t for k, (t, _) in self._tokens.items()}
        files = vol.payload(spec, self.pod, self.net, objects=objects, tokens=tokens)
        if self._files.get(spec["name"]) != files:
            write_atomic(self.root / str(vol.plugin_dir(spec)) / spec["name"], files)
            self._files[spec["name"]] = files

    def mounts_for(self, container: Mapping[str, Any], env: Mapping[str, str]) -> list[vol.Mount]:
        """The container's bind mounts, with subPaths and mount points created on disk.

        Raises ConfigError (the container's CreateContainerConfigError) when one cannot be made.
        """
        mounts = vol.container_mounts(container, self.paths, env)
        if sandbox_support() is None and mounts:
            # without mount namespaces nothing can be bound; spare the automounted token
            if all(m.target == _AUTOMOUNT for m in mounts):
                return []
            raise ConfigError(
                "volumeMounts need mount namespaces (unshare --mount), which this machine "
                "does not allow: run as root or allow unprivileged user namespaces"
            )
        done: list[vol.Mount] = []
        for mount in mounts:
            source = mount.source
            if mount.volume_root is not None:
                source = self._subpath(mount, container["name"])
            elif not os.path.exists(source):
                os.makedirs(source, 0o755, exist_ok=True)  # as containerd does for bind sources
            point = vol.mount_point(mount, done)
            try:
                if not os.path.lexists(point):
                    if os.path.isdir(source):
                        os.makedirs(point, 0o755, exist_ok=True)
                    else:
                        os.makedirs(os.path.dirname(point), 0o755, exist_ok=True)
                        Path(point).touch(0o644)
            except OSError as exc:
                raise ConfigError(
                    f'cannot create the mount point {mount.target} of volume "{mount.volume}": '
                    f"{exc}"
                ) from None
            done.append(vol.Mount(source, mount.target, mount.read_only, mount.volume))
        return done

    def _subpath(self, mount: vol.Mount, container: str) -> str:
        assert mount.volume_root is not None
        if not os.path.lexists(mount.source):
            os.makedirs(mount.source, stat.S_IMODE(os.stat(mount.volume_root).st_mode), True)
        real, root = os.path.realpath(mount.source), os.path.realpath(mount.volume_root)
        if real != root and not real.startswith(root.rstrip("/") + "/"):
            raise ConfigError(
                f'failed to prepare subPath for volumeMount "{mount.volume}" of container '
                f'"{container}"'
            )
        return real  # bound by inode: a subPath mount does not follow updates, as upstream

    def teardown(self) -> None:
        """Unmount tmpfs volumes and delete the pod's volume folders (host folders stay)."""
        if self._pending is not None:
            self._pending.exception()  # let a running set-up finish first
        for folder in self._tmpfs:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True, check=False)
        self._tmpfs.clear()
        shutil.rmtree(self.root, ignore_errors=True)
        self.paths.clear()


def _run(argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise vol.VolumeError(
            f"mount failed: exit status {done.returncode}\nMounting command: {argv[0]}\n"
            f"Mounting arguments: {' '.join(argv[1:])}\nOutput: {done.stderr.strip()}"
        )
