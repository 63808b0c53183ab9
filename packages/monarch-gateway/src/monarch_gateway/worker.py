"""A Monarch worker process: ``python -m monarch_gateway.worker tcp://127.0.0.2:26600``."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.exit("usage: python -m monarch_gateway.worker ADDRESS  (e.g. tcp://127.0.0.2:26600)")
    from monarch.actor import run_worker_loop_forever

    from monarch_proxy.memory import keep_freed_memory

    keep_freed_memory()  # processes spawned from here inherit nothing, but the host does the I/O
    run_worker_loop_forever(address=args[0], ca="trust_all_connections")


if __name__ == "__main__":
    main()
