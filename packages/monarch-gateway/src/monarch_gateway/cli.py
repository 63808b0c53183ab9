"""``monarch-gateway``: serve Monarch workers to monarch-proxy clients, or run all of it locally.

Exit status: 0 on a clean stop, 1 when the gateway fails, 2 for bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import secrets
import signal
import sys
import threading
from pathlib import Path

from monarch_gateway.logs import configure_logging
from monarch_gateway.sources import StaticSource, WorkerSource, parse_source
from monarch_proxy.connection import new_event_loop
from monarch_proxy.protocol.frames import DEFAULT_MAX_FRAME_SIZE, DEFAULT_MAX_PARTIAL_FRAMES


def parse_mesh(value: str) -> tuple[str, list[str]]:
    name, sep, addresses = value.partition("=")
    workers = [a for a in addresses.split(",") if a]
    if not sep or not name or not workers:
        raise argparse.ArgumentTypeError(
            f"expected NAME=ADDR[,ADDR...] (e.g. trainers=tcp://10.0.0.5:26600), got {value!r}"
        )
    return name, workers


def source_arg(kind: str, value: str) -> tuple[str, WorkerSource]:
    try:
        return parse_source(kind, value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="monarch-gateway",
        description="Serve real Monarch host meshes to monarch-proxy clients over one WebSocket.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser(
        "serve",
        help="attach to running workers and serve them",
        description="Attach to workers running run_worker_loop_forever and "
        "serve them. The bearer token comes from --token-file or "
        "MONARCH_GATEWAY_TOKEN.",
    )
    serve.add_argument(
        "--mesh",
        action="append",
        type=parse_mesh,
        default=[],
        metavar="NAME=ADDR,...",
        help="a named host mesh and its worker addresses (repeatable)",
    )
    serve.add_argument("--workers", help="shorthand for --mesh hosts=ADDR,...")
    for kind, metavar, what in (
        ("file", "NAME=PATH", "worker addresses, one per line, in a file re-read as it changes"),
        ("dns", "NAME=HOST:PORT", "the A records of HOST (a headless Service), re-resolved"),
        (
            "selector",
            "NAME=NAMESPACE/SELECTOR:PORT",
            "the Ready pods matching a label selector (needs monarch-gateway[kubernetes])",
        ),
    ):
        serve.add_argument(
            f"--mesh-{kind}",
            action="append",
            default=[],
            metavar=metavar,
            type=functools.partial(source_arg, kind),
            help=f"a named host mesh whose workers come and go: {what} (repeatable)",
        )
    serve.add_argument(
        "--poll", type=float, default=0.5, help="seconds between looks at the worker sources"
    )
    serve.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8765, help="listen port; 0 picks a free one")
    serve.add_argument("--token-file", type=Path, help="file holding the bearer token")
    serve.add_argument(
        "--generate-token", action="store_true", help="make up a token and print it to stderr"
    )
    serve.add_argument(
        "--insecure-no-token",
        action="store_true",
        help="accept clients without a token (only behind another auth layer)",
    )
    serve.add_argument("--tls-cert", help="TLS certificate (PEM); serves wss://")
    serve.add_argument("--tls-key", help="TLS private key (PEM)")
    serve.add_argument(
        "--max-frame-size",
        type=int,
        default=DEFAULT_MAX_FRAME_SIZE,
        help=f"largest message in bytes (default {DEFAULT_MAX_FRAME_SIZE})",
    )
    for flag, what in (
        ("--max-unacked-bytes", "replies a client has not acknowledged, kept for a resume"),
        ("--max-outbox-bytes", "messages queued for a client that is not reading"),
    ):
        serve.add_argument(
            flag,
            type=int,
            help=f"per-session cap on {what}; past it the session is closed "
            "(default: twice --max-frame-size)",
        )
    serve.add_argument(
        "--max-partial-frames",
        type=int,
        default=DEFAULT_MAX_PARTIAL_FRAMES,
        help="per-session cap on frames half sent in pieces "
        f"(default {DEFAULT_MAX_PARTIAL_FRAMES})",
    )
    serve.add_argument(
        "--resume-grace",
        type=float,
        default=30.0,
        help="seconds a dropped client may take to reconnect and resume",
    )
    serve.add_argument(
        "--attach-timeout",
        type=float,
        default=120.0,
        help="seconds to wait for all workers to answer",
    )
    serve.add_argument(
        "--no-stream-output",
        action="store_true",
        help="do not stream worker stdout/stderr to clients",
    )
    serve.add_argument("--ready-file", help="write {url, port, pid} as JSON here once serving")
    sync = serve.add_argument_group(
        "workspace sync", "job.sync() through this gateway: /sync relays to a monarch-sync agent"
    )
    sync.add_argument(
        "--sync-agent", metavar="HOST:PORT", help="the monarch-sync agent beside the gateway"
    )
    sync.add_argument(
        "--sync-port", type=int, help="port of the monarch-sync agent on every worker host"
    )
    sync.add_argument(
        "--sync-members-file",
        help="keep the worker agents' HOST:PORT list here for the agent "
        "(its --members-file); needs --sync-port",
    )
    serve.add_argument("--log-level", default="info")

    local = sub.add_parser(
        "local",
        help="start N local workers and a gateway, in the foreground",
        description="The embedded local default: workers on 127.0.0.x and a "
        "gateway; prints the URL and token to connect with.",
    )
    local.add_argument("--hosts", type=int, default=2, help="number of worker hosts")
    local.add_argument("--mesh", default="hosts", help="name of the host mesh")
    local.add_argument(
        "--sync", action="store_true", help="a monarch-sync agent per host, for job.sync()"
    )
    return parser


def resolve_token(args: argparse.Namespace, parser: argparse.ArgumentParser) -> str | None:
    if args.insecure_no_token:
        return None
    if args.token_file is not None:
        try:
            token = args.token_file.read_text().strip()
        except OSError as exc:
            parser.error(f"cannot read --token-file: {exc}")
    else:
        token = os.environ.get("MONARCH_GATEWAY_TOKEN", "").strip()
    if not token and args.generate_token:
        token = secrets.token_urlsafe(24)
        print(f"monarch-gateway token: {token}", file=sys.stderr, flush=True)
    if not token:
        parser.error(
            "a bearer token is required: pass --token-file, set MONARCH_GATEWAY_TOKEN, "
            "use --generate-token, or --insecure-no-token"
        )
    return token


def serve_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from monarch_gateway.app import GatewayOptions, run_gateway

    meshes: dict[str, WorkerSource] = {
        name: StaticSource(addresses) for name, addresses in args.mesh
    }
    if args.workers:
        meshes["hosts"] = StaticSource(parse_mesh(f"hosts={args.workers}")[1])
    meshes.update(args.mesh_file + args.mesh_dns + args.mesh_selector)
    if not meshes:
        parser.error(
            "name the workers with --mesh NAME=ADDR,..., --workers ADDR,..., --mesh-file, "
            "--mesh-dns or --mesh-selector"
        )
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    if args.sync_members_file and not args.sync_port:
        parser.error("--sync-members-file needs --sync-port (the worker hosts' agent port)")
    token = resolve_token(args, parser)
    configure_logging(args.log_level)
    options = GatewayOptions(
        meshes=meshes,
        token=token,
        host=args.host,
        port=args.port,
        certfile=args.tls_cert,
        keyfile=args.tls_key,
        max_frame_size=args.max_frame_size,
        max_unacked_bytes=args.max_unacked_bytes,
        max_outbox_bytes=args.max_outbox_bytes,
        max_partial_frames=args.max_partial_frames,
        resume_grace_s=args.resume_grace,
        attach_timeout_s=args.attach_timeout,
        stream_output=not args.no_stream_output,
        ready_file=args.ready_file,
        sync_agent=args.sync_agent,
        sync_port=args.sync_port,
        sync_members_file=args.sync_members_file,
        poll_s=args.poll,
    )
    try:
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            runner.run(run_gateway(options))
    except Exception as exc:
        print(f"monarch-gateway: {exc}", file=sys.stderr)
        return 1
    return 0


def local_command(args: argparse.Namespace) -> int:
    from monarch_gateway.local import LocalCluster

    with LocalCluster(args.hosts, mesh=args.mesh, sync=args.sync).start() as cluster:
        print(
            f"gateway: {cluster.url}\ntoken:   {cluster.token}\nlogs:    {cluster.log_dir}\n"
            f"connect: monarch_proxy.connect({cluster.url!r}, token=...)\nCtrl-C stops.",
            flush=True,
        )
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        while not stop.wait(1.0):
            pass
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        return serve_command(args, parser)
    return local_command(args)


if __name__ == "__main__":
    sys.exit(main())
