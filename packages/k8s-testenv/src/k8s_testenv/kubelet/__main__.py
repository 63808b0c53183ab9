"""``python -m k8s_testenv.kubelet CONFIG.json``: run the process kubelet until SIGTERM."""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from types import FrameType

from k8s_testenv.kubelet.agent import Kubelet, KubeletConfig


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m k8s_testenv.kubelet CONFIG.json", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    with open(argv[0]) as f:
        config = KubeletConfig.from_dict(json.load(f))
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    Kubelet(config).run(stop)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
