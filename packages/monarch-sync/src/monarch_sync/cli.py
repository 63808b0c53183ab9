"""Command line: ``monarch-sync agent``, ``push``, ``rollback`` and ``path``.

Exit status of ``push``: 0 when every node switched to the new root, 1 when any failed (the
per-node report names them), 2 for usage errors.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .agent import Agent
from .client import push
from .conn import parse_peer
from .exceptions import SyncError
from .memory import keep_freed_memory
from .progress import default_progress
from .recovery import Recovery
from .store import Store, synced_path

__all__ = ["main", "read_peers"]


def read_peers(to: str | None, peers_file: str | None) -> list[str]:
    """Peers from ``--to a:1,b:2`` and/or a file (``-`` for stdin), one per line or comma."""
    raw: list[str] = []
    if to:
        raw += to.split(",")
    if peers_file:
        text = sys.stdin.read() if peers_file == "-" else Path(peers_file).read_text()
        for line in text.splitlines():
            line = line.split("#", 1)[0]
            raw += line.replace(",", " ").split()
    peers = [p.strip() for p in raw if p.strip()]
    for p in peers:
        parse_peer(p)
    return list(dict.fromkeys(peers))


def _token(args: argparse.Namespace) -> str:
    """From --token-file or MONARCH_SYNC_TOKEN: never from the command line (``ps`` shows it)."""
    if args.token_file:
        return Path(args.token_file).read_text().strip()
    token = os.environ.get("MONARCH_SYNC_TOKEN", "")
    if not token:
        raise SystemExit("monarch-sync: a token is required (--token-file or MONARCH_SYNC_TOKEN)")
    return token


def _parser() -> argparse.ArgumentParser:
    # No abbreviations: "--token SECRET" must not be taken for --token-file.
    p = argparse.ArgumentParser(prog="monarch-sync", description=__doc__, allow_abbrev=False)
    sub = p.add_subparsers(dest="cmd", required=True)

    def token_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--token-file", help="read the shared secret from this file (or MONARCH_SYNC_TOKEN)"
        )

    a = sub.add_parser("agent", allow_abbrev=False, help="run the receiving daemon on a node")
    a.add_argument(
        "--listen",
        default="127.0.0.1:7878",
        help="HOST:PORT to listen on (loopback unless told otherwise, e.g. 0.0.0.0:7878)",
    )
    a.add_argument(
        "--root", required=True, help="folder holding versions; live tree is ROOT/current"
    )
    a.add_argument("--advertise", help="HOST:PORT peers use to reach us, if not --listen")
    a.add_argument("--stall-timeout", type=float, default=10.0)
    a.add_argument(
        "--members-file",
        help='JSON {"members": [HOST:PORT, ...]} kept by a gateway: pushes that come through '
        "the gateway fan out to these agents",
    )
    a.add_argument("--verbose", action="store_true", help="log each push's phases")
    token_args(a)

    s = sub.add_parser("push", allow_abbrev=False, help="push a folder to agents")
    s.add_argument("src")
    s.add_argument("--to", help="comma-separated HOST:PORT list")
    s.add_argument(
        "--gateway", help="ws[s]://URL of a monarch-gateway: push through it (token: the gateway's)"
    )
    s.add_argument("--peers-file", help="file with one HOST:PORT per line, '-' for stdin")
    s.add_argument("--fanout", type=int, help="children per node (default: chosen by size)")
    s.add_argument("--stall-timeout", type=float, default=10.0)
    d = Recovery()
    s.add_argument(
        "--slow-after", type=float, default=d.slow_after,
        help="seconds a node must stay the bottleneck before its children are moved (0: never)",
    )  # fmt: skip
    s.add_argument(
        "--slow-backlog", type=float, default=d.slow_backlog / 2**20,
        help="MiB queued for a node before it counts as behind",
    )  # fmt: skip
    s.add_argument(
        "--slow-ratio", type=float, default=d.slow_ratio,
        help="slow: taking less than this fraction of the rate data is available at its parent",
    )  # fmt: skip
    s.add_argument(
        "--reconnects", type=int, default=d.reconnects,
        help="attempts to reconnect a dropped connection to a live node before failing it",
    )  # fmt: skip
    s.add_argument("--json", help="also write the report as JSON to this file")
    s.add_argument("--quiet", action="store_true", help="no progress output")
    token_args(s)

    r = sub.add_parser("rollback", help="switch an agent root back to its previous version")
    r.add_argument("--root", required=True)
    w = sub.add_parser("path", help="print the live tree's path (for sys.path)")
    w.add_argument("--root", required=True)
    return p


async def _run_agent(args: argparse.Namespace) -> int:
    keep_freed_memory()
    if args.verbose:
        logging.basicConfig(level=logging.DEBUG, format="%(asctime)s %(message)s")
    host, port = parse_peer(args.listen)
    agent = Agent(
        args.root,
        _token(args),
        host=host,
        port=port,
        stall_timeout=args.stall_timeout,
        advertise=args.advertise,
        members_file=args.members_file,
    )
    await agent.start()
    print(f"monarch-sync agent listening on {agent.address}, root {args.root}", flush=True)
    await agent.serve_until_signalled()
    return 0


async def _run_push(args: argparse.Namespace) -> int:
    keep_freed_memory()
    peers = read_peers(args.to, args.peers_file)
    if not peers and not args.gateway:
        print("monarch-sync: no peers (use --to, --peers-file or --gateway)", file=sys.stderr)
        return 2
    progress = None if args.quiet else default_progress()
    recovery = Recovery(
        slow_backlog=int(args.slow_backlog * 2**20),
        slow_after=args.slow_after,
        slow_ratio=args.slow_ratio,
        reconnects=args.reconnects,
    )
    report = await push(
        args.src, peers, _token(args), args.fanout, progress,
        stall_timeout=args.stall_timeout, recovery=recovery, gateway=args.gateway,
    )  # fmt: skip
    print(report.format())
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_json(), indent=2))
    return 0 if report.ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.cmd == "agent":
            return asyncio.run(_run_agent(args))
        if args.cmd == "push":
            return asyncio.run(_run_push(args))
        if args.cmd == "rollback":
            print(Store(args.root).rollback())
            return 0
        print(synced_path(args.root))
        return 0
    except (SyncError, ValueError, FileNotFoundError) as exc:
        print(f"monarch-sync: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
