"""monarch-proxy: Monarch's job and mesh API, served by a monarch-gateway over one connection.

It does not need torchmonarch: a laptop with only this package drives real meshes in a cluster.
"""

from monarch_proxy import faults
from monarch_proxy.accumulator import Accumulator
from monarch_proxy.codec import by_value
from monarch_proxy.connection import GatewayConnection
from monarch_proxy.errors import (
    ActorError,
    ActorImportError,
    ArgumentEncodingError,
    AuthenticationError,
    CallTimeoutError,
    FrameTooLargeError,
    GatewayError,
    ProtocolError,
    ProtocolVersionError,
    ProxyError,
    RemoteError,
    RemoteTraceback,
    SessionLimitError,
    SessionSupersededError,
    SupervisionError,
    TransportError,
    UnknownHandleError,
    WorkerLostError,
    WorkerReattachError,
    WorkspaceUnavailableError,
)
from monarch_proxy.futures import FutureProxy, StreamProxy
from monarch_proxy.job import Job
from monarch_proxy.memory import keep_freed_memory
from monarch_proxy.meshes import (
    ActorMeshProxy,
    EndpointProxy,
    HostMeshProxy,
    JobState,
    MeshProxy,
    ProcMeshProxy,
    SyncResult,
    Workspace,
    connect,
)
from monarch_proxy.values import Extent, Point, UnknownLabelError, ValueMesh

__version__ = "0.1.0"

__all__ = [
    "Accumulator",
    "ActorError",
    "ActorImportError",
    "ActorMeshProxy",
    "ArgumentEncodingError",
    "AuthenticationError",
    "CallTimeoutError",
    "EndpointProxy",
    "Extent",
    "FrameTooLargeError",
    "FutureProxy",
    "GatewayConnection",
    "GatewayError",
    "HostMeshProxy",
    "Job",
    "JobState",
    "MeshProxy",
    "Point",
    "ProcMeshProxy",
    "ProtocolError",
    "ProtocolVersionError",
    "ProxyError",
    "RemoteError",
    "RemoteTraceback",
    "SessionLimitError",
    "SessionSupersededError",
    "StreamProxy",
    "SupervisionError",
    "SyncResult",
    "TransportError",
    "UnknownHandleError",
    "UnknownLabelError",
    "ValueMesh",
    "WorkerLostError",
    "WorkerReattachError",
    "Workspace",
    "WorkspaceUnavailableError",
    "by_value",
    "connect",
    "faults",
    "keep_freed_memory",
]
