"""The SkyPilot task a job launches, as pure functions of its spec (snapshot-tested).

SkyPilot ships a task to its API server as YAML, so ``run`` must be a string (a callable
command generator cannot be serialized). Ours reads ``$SKYPILOT_NODE_RANK`` and
``$SKYPILOT_NODE_IPS`` (newline-separated, head first) and starts a module entry point,
``python -m monarch_skypilot.node``: no inline Python, no hand-escaped quotes.

Secrets (the gateway's token, and the certificate and key generated for this cluster) travel
as SkyPilot ``secrets``, which the API server redacts from what it displays.
"""

from __future__ import annotations

import importlib.metadata
import shlex
from dataclasses import dataclass, field
from typing import Any, Literal

from monarch_skypilot.errors import InvalidJobError

__all__ = [
    "DEFAULT_IMAGE_ID",
    "DEFAULT_TIMEOUTS",
    "Mode",
    "TaskSpec",
    "build_task",
    "default_setup",
    "node_command",
    "split_nodes",
]

Mode = Literal["gateway", "direct"]

#: the design's image when the resources name none: CUDA libraries for torchmonarch's wheel
DEFAULT_IMAGE_ID = "docker:pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime"

#: Monarch's timeouts on the nodes (the design's 300s: cloud hosts start slower than 30s)
DEFAULT_TIMEOUTS = {
    "HYPERACTOR_HOST_SPAWN_READY_TIMEOUT": "300s",
    "HYPERACTOR_MESSAGE_DELIVERY_TIMEOUT": "300s",
    "HYPERACTOR_MESH_PROC_SPAWN_MAX_IDLE": "300s",
}

#: names of the secrets the head node reads (never in ``envs``, never in a log)
TOKEN_SECRET = "MONARCH_GATEWAY_TOKEN"
CERT_SECRET = "MONARCH_SKYPILOT_TLS_CERT"
KEY_SECRET = "MONARCH_SKYPILOT_TLS_KEY"


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return ""


def default_setup(python_exe: str) -> str:
    """Install on every node the versions this client runs (Monarch needs an exact match)."""
    pins = [f"torchmonarch=={_version('torchmonarch') or '0.7.0'}"]
    ours = _version("monarch-skypilot")
    pins.append(f"monarch-skypilot[node]=={ours}" if ours else "monarch-skypilot[node]")
    return f"set -e\n{python_exe} -m pip install -q {' '.join(shlex.quote(p) for p in pins)}\n"


@dataclass(frozen=True)
class TaskSpec:
    """Everything the task depends on, apart from resources and secrets."""

    meshes: dict[str, int]
    mode: Mode = "gateway"
    monarch_port: int = 22222
    gateway_port: int = 8443
    sync_port: int = 7878
    python_exe: str = "python"
    setup_commands: str | None = None
    workdir: str | None = None
    file_mounts: dict[str, str] | None = None
    timeouts: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_TIMEOUTS))
    name: str = "monarch-workers"
    batch_script: str | None = None  # batch mode: the client script run on the head node

    def __post_init__(self) -> None:
        if not self.meshes:
            raise InvalidJobError("meshes= names at least one mesh, e.g. {'trainers': 2}")
        for mesh, count in self.meshes.items():
            if not mesh.isidentifier() or "," in mesh:
                raise InvalidJobError(f"mesh name {mesh!r} must be a Python identifier")
            if not isinstance(count, int) or isinstance(count, bool) or count < 1:
                raise InvalidJobError(f"meshes[{mesh!r}] must be a positive int, got {count!r}")

    @property
    def num_nodes(self) -> int:
        return sum(self.meshes.values())


def split_nodes(meshes: dict[str, int], ips: list[str]) -> dict[str, list[str]]:
    """Cut the nodes (head first, a stable order) into the meshes, in the dict's order."""
    if len(ips) < sum(meshes.values()):
        raise ValueError(f"{len(ips)} nodes cannot hold meshes {meshes}")
    out: dict[str, list[str]] = {}
    start = 0
    for name, count in meshes.items():
        out[name] = ips[start : start + count]
        start += count
    return out


def node_command(spec: TaskSpec) -> str:
    """The task's ``run``: every node starts ``monarch_skypilot.node`` with its rank and the
    node list as SkyPilot sets them."""
    meshes = ",".join(f"{name}={count}" for name, count in spec.meshes.items())
    argv = [
        spec.python_exe,
        "-u",
        "-m",
        "monarch_skypilot.node",
        "--meshes",
        meshes,
        "--port",
        str(spec.monarch_port),
    ]
    if spec.mode == "gateway":
        argv += ["--gateway-port", str(spec.gateway_port), "--sync-port", str(spec.sync_port)]
    if spec.batch_script is not None:
        argv += ["--batch-script", spec.batch_script]
    quoted = " ".join(shlex.quote(a) for a in argv)
    return f'{quoted} --rank "$SKYPILOT_NODE_RANK" --ips "$SKYPILOT_NODE_IPS"\n'


def with_job_fields(
    resources: Any, spec: TaskSpec, *, use_spot: bool | None, image_id: str | None
) -> Any:
    """A candidate with the port our mode needs opened, spot, and the default image."""
    port = spec.gateway_port if spec.mode == "gateway" else spec.monarch_port
    ports = [str(p) for p in (resources.ports or [])]
    override: dict[str, Any] = {"ports": sorted({*ports, str(port)})}
    if use_spot is not None:
        override["use_spot"] = use_spot
    if image_id is not None and resources.image_id is None:
        override["image_id"] = image_id
    return resources.copy(**override)


def build_task(
    spec: TaskSpec,
    resources: Any | list[Any] | None,
    *,
    secrets: dict[str, str] | None = None,
    use_spot: bool | None = None,
    image_id: str | None = DEFAULT_IMAGE_ID,
) -> dict[str, Any]:
    """The task as SkyPilot's YAML config (what ``sky.launch`` would send to its server).

    ``resources`` is one ``sky.Resources`` or a list of candidates, tried in order (failover
    across regions and clouds).
    """
    import sky

    candidates = resources if isinstance(resources, list | tuple) else [resources]
    candidates = [r if r is not None else sky.Resources() for r in candidates]
    task = sky.Task(
        name=spec.name,
        setup=spec.setup_commands or default_setup(spec.python_exe),
        run=node_command(spec),
        envs=dict(spec.timeouts),
        secrets=dict(secrets or {}),
        workdir=spec.workdir,
        num_nodes=spec.num_nodes,
        file_mounts=dict(spec.file_mounts or {}) or None,
    )
    fixed = [with_job_fields(r, spec, use_spot=use_spot, image_id=image_id) for r in candidates]
    task.set_resources(fixed if len(fixed) > 1 else fixed[0])
    config: dict[str, Any] = task.to_yaml_config()
    return config
