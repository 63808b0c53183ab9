"""The one place that calls SkyPilot: a small adapter over its 0.14 request-id SDK.

Since 0.8 every SDK call goes to an API server and returns a request id, resolved with
``sky.get`` (quietly) or ``sky.stream_and_get`` (printing the request's progress, used for
launches). Tasks cross this boundary as the YAML config SkyPilot itself serializes
(``Task.to_yaml_config``), so a fake cloud sees exactly what the API server would.

Node addresses come from the cached fields of the cluster handle (``stable_internal_external_ips``
through ``cached_internal_ips`` / ``cached_external_ips``): the ``internal_ips()`` methods would
ask the cloud, which needs credentials on this side.
"""

from __future__ import annotations

import copy
import io
import os
from dataclasses import dataclass, field
from typing import Any, Protocol

from monarch_skypilot.errors import translate

__all__ = ["Cluster", "ManagedJob", "SkyApi", "SkyPilotSdk"]


@dataclass(frozen=True)
class Cluster:
    """What the client needs of a cluster: its status and its nodes, head first."""

    name: str
    status: str  # UP, INIT, STOPPED, AUTOSTOPPING, PENDING (sky.ClusterStatus names)
    internal_ips: list[str] = field(default_factory=list)
    external_ips: list[str] = field(default_factory=list)
    job_id: int | None = None  # the job running our task, when known

    @property
    def up(self) -> bool:
        return self.status == "UP"


@dataclass(frozen=True)
class ManagedJob:
    job_id: int
    status: str  # sky.jobs.ManagedJobStatus names: PENDING, RUNNING, RECOVERING, SUCCEEDED, ...
    recovery_count: int = 0
    failure_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.status in ("SUCCEEDED", "CANCELLED") or self.status.startswith("FAILED")


class SkyApi(Protocol):
    """The SkyPilot operations SkyPilotJob uses (real: :class:`SkyPilotSdk`)."""

    def launch(
        self,
        task: dict[str, Any],
        cluster_name: str,
        *,
        idle_minutes_to_autostop: int | None,
        down: bool,
        retry_until_up: bool,
    ) -> Cluster: ...

    def status(self, cluster_name: str) -> Cluster | None: ...

    def down(self, cluster_name: str) -> None: ...

    def autostop(self, cluster_name: str, idle_minutes: int, down: bool) -> None: ...

    def endpoints(self, cluster_name: str, port: int) -> dict[int, str]: ...

    def job_log_tail(self, cluster_name: str, job_id: int | None, lines: int) -> str: ...

    def jobs_launch(self, task: dict[str, Any], name: str) -> int: ...

    def jobs_queue(self, job_id: int) -> ManagedJob | None: ...

    def jobs_cancel(self, job_id: int) -> None: ...

    def jobs_logs(self, job_id: int, follow: bool) -> str: ...


def _ips(handle: Any) -> tuple[list[str], list[str]]:
    if handle is None:
        return [], []
    return list(handle.cached_internal_ips or []), list(handle.cached_external_ips or [])


def _status_name(status: Any) -> str:
    return str(getattr(status, "name", None) or getattr(status, "value", status))


class SkyPilotSdk:
    """The real thing: SkyPilot 0.14's client SDK (imported on first use; it takes ~2 s)."""

    def __init__(self, stream: bool = True) -> None:
        self.stream = stream  # print launch progress (provisioning, setup) as it happens
        os.environ.setdefault("SKYPILOT_DISABLE_USAGE_COLLECTION", "1")

    def _call(self, cluster: str, fn: Any, *args: Any, stream: bool = False, **kw: Any) -> Any:
        import sky

        try:
            request = fn(*args, **kw)
            return sky.stream_and_get(request) if stream else sky.get(request)
        except Exception as exc:
            raise translate(exc, cluster) from exc

    @staticmethod
    def _task(config: dict[str, Any]) -> Any:
        import sky

        return sky.Task.from_yaml_config(copy.deepcopy(config))  # it consumes the dict

    def launch(
        self,
        task: dict[str, Any],
        cluster_name: str,
        *,
        idle_minutes_to_autostop: int | None,
        down: bool,
        retry_until_up: bool,
    ) -> Cluster:
        import sky

        sky_task = self._task(task)
        try:
            request = sky.launch(
                sky_task,
                cluster_name=cluster_name,
                idle_minutes_to_autostop=idle_minutes_to_autostop,
                down=down,
                retry_until_up=retry_until_up,
            )
            job_id, handle = sky.stream_and_get(request) if self.stream else sky.get(request)
        except Exception as exc:
            raise translate(exc, cluster_name, list(sky_task.resources)) from exc
        internal, external = _ips(handle)
        return Cluster(cluster_name, "UP", internal, external, job_id)

    def status(self, cluster_name: str) -> Cluster | None:
        import sky

        records = self._call(cluster_name, sky.status, cluster_names=[cluster_name])
        for record in records:
            name = getattr(record, "name", None) or record["name"]
            if name != cluster_name:
                continue
            handle = getattr(record, "handle", None)
            internal, external = _ips(handle)
            return Cluster(name, _status_name(record.status), internal, external)
        return None

    def down(self, cluster_name: str) -> None:
        import sky

        self._call(cluster_name, sky.down, cluster_name)

    def autostop(self, cluster_name: str, idle_minutes: int, down: bool) -> None:
        import sky

        self._call(cluster_name, sky.autostop, cluster_name, idle_minutes, down=down)

    def endpoints(self, cluster_name: str, port: int) -> dict[int, str]:
        import sky

        found = self._call(cluster_name, sky.endpoints, cluster_name, port)
        return {int(k): str(v) for k, v in dict(found).items()}

    def job_log_tail(self, cluster_name: str, job_id: int | None, lines: int) -> str:
        import sky

        out = io.StringIO()
        try:
            sky.tail_logs(cluster_name, job_id, follow=False, tail=lines, output_stream=out)
        except Exception as exc:  # the log is a hint in an error message; never hide the error
            return f"(could not read the job log: {exc})"
        return out.getvalue()

    def jobs_launch(self, task: dict[str, Any], name: str) -> int:
        import sky

        job_ids, _ = self._call(name, sky.jobs.launch, self._task(task), name=name, stream=True)
        return int(job_ids[0])

    def jobs_queue(self, job_id: int) -> ManagedJob | None:
        import sky

        records, *_ = self._call(str(job_id), sky.jobs.queue_v2, refresh=False, job_ids=[job_id])
        for r in records:
            get = r.get if isinstance(r, dict) else lambda k, d=None, r=r: getattr(r, k, d)
            if int(get("job_id") or -1) == job_id:
                return ManagedJob(
                    job_id,
                    _status_name(get("status")),
                    int(get("recovery_count", 0) or 0),
                    get("failure_reason"),
                )
        return None

    def jobs_cancel(self, job_id: int) -> None:
        import sky

        self._call(str(job_id), sky.jobs.cancel, job_ids=[job_id])

    def jobs_logs(self, job_id: int, follow: bool) -> str:
        import sky

        out = io.StringIO()
        sky.jobs.tail_logs(job_id=job_id, follow=follow, output_stream=out)
        return out.getvalue()
