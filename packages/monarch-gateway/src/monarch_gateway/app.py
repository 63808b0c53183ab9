"""Run a gateway process: attach to the workers, serve, stop cleanly on SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import signal
import ssl as ssl_module
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from monarch_gateway.membership import Membership, SyncSettings
from monarch_gateway.monitor import Worker, tcp_endpoint
from monarch_gateway.operations import MeshService
from monarch_gateway.output import OutputTee
from monarch_gateway.server import Gateway
from monarch_gateway.sources import WorkerSource
from monarch_proxy.memory import keep_freed_memory
from monarch_proxy.protocol.frames import DEFAULT_MAX_FRAME_SIZE, DEFAULT_MAX_PARTIAL_FRAMES
from monarch_proxy.protocol.server import Limits

logger = logging.getLogger("monarch_gateway")


@dataclass
class GatewayOptions:
    meshes: dict[str, WorkerSource]  # host mesh name -> where its worker addresses come from
    token: str | None
    host: str = "127.0.0.1"
    port: int = 0
    certfile: str | None = None
    keyfile: str | None = None
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    # Per-session memory caps (None: twice the frame size); see server.py and the README.
    max_unacked_bytes: int | None = None
    max_outbox_bytes: int | None = None
    max_partial_frames: int = DEFAULT_MAX_PARTIAL_FRAMES
    resume_grace_s: float = 30.0
    attach_timeout_s: float = 120.0
    stream_output: bool = True
    ready_file: str | None = None
    # Workspace sync (optional): /sync relays to this agent, the root of every push's tree,
    # which fans out to the agents at <worker host>:sync_port listed in sync_members_file.
    sync_agent: str | None = None
    sync_port: int | None = None
    sync_members_file: str | None = None
    poll_s: float = 0.5  # how often worker sources are asked again


def limits_of(options: GatewayOptions) -> Limits:
    twice = 2 * options.max_frame_size
    return Limits(
        max_frame_size=options.max_frame_size,
        max_unacked_bytes=options.max_unacked_bytes or twice,
        max_outbox_bytes=options.max_outbox_bytes or twice,
        max_partial_frames=options.max_partial_frames,
        max_partial_bytes=twice,
    )


def server_ssl_context(certfile: str | None, keyfile: str | None) -> ssl_module.SSLContext | None:
    if certfile is None:
        return None
    context = ssl_module.SSLContext(ssl_module.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certfile, keyfile)
    return context


def all_loopback(addresses: list[str]) -> bool:
    for address in addresses:
        endpoint = tcp_endpoint(address)
        if endpoint is None:
            return False
        try:
            if not ipaddress.ip_address(endpoint[0]).is_loopback:
                return False
        except ValueError:
            if endpoint[0] != "localhost":
                return False
    return True


# The gateway that mesh failures are forwarded to (set once it exists).
FAULT_LISTENERS: list[Callable[[str, str], None]] = []


def log_mesh_failure(failure: object) -> None:
    """Monarch's default hook exits the process on an unhandled mesh failure: one client's
    broken actor would take the gateway down for everyone. The failing calls already get the
    error; the gateway logs it, forwards it to the session that owns the mesh (whose client
    runs its own fault hook) and keeps serving."""
    report = getattr(failure, "report", lambda: str(failure))()
    mesh_name = str(getattr(failure, "mesh_name", "?"))
    logger.warning("mesh failure", extra={"mesh": mesh_name, "report": report})
    for listener in FAULT_LISTENERS:
        listener(mesh_name, report)


def configure_monarch(addresses: list[str], stream_output: bool) -> None:
    """Pick Monarch's client transport (loopback workers need TcpWithLocalhost), and keep
    mesh failures from exiting the gateway."""
    import monarch.actor
    from monarch._rust_bindings.monarch_hyperactor.channel import ChannelTransport
    from monarch.config import configure

    monarch.actor.unhandled_fault_hook = log_mesh_failure

    transport = (
        ChannelTransport.TcpWithLocalhost
        if all_loopback(addresses)
        else ChannelTransport.TcpWithHostname
    )
    configure(default_transport=transport, enable_log_forwarding=stream_output)


async def first_addresses(
    sources: dict[str, WorkerSource], timeout_s: float
) -> dict[str, list[str]]:
    """Each mesh's addresses as its source first lists some (this fixes the mesh's size)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    found: dict[str, list[str]] = {}
    while len(found) < len(sources):
        for name, source in sources.items():
            if name not in found and (listed := await source.addresses()):
                found[name] = listed
        if len(found) < len(sources):
            if asyncio.get_running_loop().time() > deadline:
                missing = sorted(set(sources) - set(found))
                raise RuntimeError(f"no workers listed within {timeout_s:.0f}s for {missing}")
            await asyncio.sleep(0.2)
    return found


async def attach(meshes: dict[str, list[str]], timeout_s: float) -> dict[str, object]:
    from monarch.actor import attach_to_workers

    host_meshes = {
        name: attach_to_workers(workers=addrs, ca="trust_all_connections", name=name)
        for name, addrs in meshes.items()
    }
    try:
        await asyncio.wait_for(
            asyncio.gather(*(mesh.initialized for mesh in host_meshes.values())), timeout_s
        )
    except TimeoutError:
        raise RuntimeError(
            f"workers did not all answer within {timeout_s:.0f}s: {meshes}; check that each "
            "runs run_worker_loop_forever on that address"
        ) from None
    return host_meshes


async def run_gateway(options: GatewayOptions) -> None:
    keep_freed_memory()  # every big payload passes through here twice
    meshes = await first_addresses(options.meshes, options.attach_timeout_s)
    addresses = [a for addrs in meshes.values() for a in addrs]
    tee: OutputTee | None = None
    gateway: Gateway | None = None
    if options.stream_output:
        tee = OutputTee(
            lambda stream, text: (
                gateway.publish_output(stream, text) if gateway is not None else None
            )
        )
        tee.start()
    configure_monarch(addresses, options.stream_output)
    host_meshes = await attach(meshes, options.attach_timeout_s)
    workers = {
        name: [Worker(name, i, addr) for i, addr in enumerate(addrs)]
        for name, addrs in meshes.items()
    }
    gateway = Gateway(
        MeshService(host_meshes, workers, stream_logs=options.stream_output),
        [w for ws in workers.values() for w in ws],
        token=options.token,
        host=options.host,
        port=options.port,
        ssl=server_ssl_context(options.certfile, options.keyfile),
        limits=limits_of(options),
        resume_grace_s=options.resume_grace_s,
        sync_agent=options.sync_agent,
    )
    sync = None
    if options.sync_port:
        sync = SyncSettings(
            options.sync_port,
            options.sync_members_file,
            options.token,
            os.environ.get("MONARCH_SYNC_ROOT"),  # reload.SYNC_ROOT_ENV (imports Monarch)
        )

    async def attach_one(name: str, addrs: list[str]) -> object:
        return (await attach({name: addrs}, options.attach_timeout_s))[name]

    membership = Membership(
        options.meshes,
        gateway.service,
        gateway.monitor,
        attach_one,
        gateway.publish_membership,
        sync=sync,
        poll_s=options.poll_s,
    )
    gateway.membership = membership
    FAULT_LISTENERS.append(gateway.mesh_failed)
    await gateway.start()
    membership.start()
    if options.ready_file:
        ready = Path(options.ready_file)
        tmp = ready.with_suffix(".tmp")
        tmp.write_text(json.dumps({"url": gateway.url, "port": gateway.port, "pid": os.getpid()}))
        tmp.replace(ready)  # atomic: readers never see half a file
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    logger.info("shutting down")
    await membership.stop()
    await gateway.shutdown()
