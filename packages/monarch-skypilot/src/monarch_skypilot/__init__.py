"""monarch-skypilot: Monarch worker meshes on any cloud SkyPilot reaches, from a laptop.

from monarch_skypilot import SkyPilotJob
job = SkyPilotJob(meshes={"trainers": 2}, resources=sky.Resources(accelerators="H100:1"))
state = job.state()     # gateway mode: monarch-proxy's JobState through the head node
"""

from monarch_skypilot.errors import (
    BatchJobError,
    ClusterNotUpError,
    CudaRequiredError,
    InvalidJobError,
    NoCloudAccessError,
    ResourcesUnavailableError,
    SkyPilotJobError,
    WorkersNotListeningError,
)
from monarch_skypilot.job import SkyPilotJob
from monarch_skypilot.sdk import Cluster, ManagedJob, SkyApi, SkyPilotSdk
from monarch_skypilot.task import DEFAULT_IMAGE_ID, DEFAULT_TIMEOUTS, TaskSpec, build_task

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_IMAGE_ID",
    "DEFAULT_TIMEOUTS",
    "BatchJobError",
    "Cluster",
    "ClusterNotUpError",
    "CudaRequiredError",
    "InvalidJobError",
    "ManagedJob",
    "NoCloudAccessError",
    "ResourcesUnavailableError",
    "SkyApi",
    "SkyPilotJob",
    "SkyPilotJobError",
    "SkyPilotSdk",
    "TaskSpec",
    "WorkersNotListeningError",
    "build_task",
]
