"""``python -m monarch_k8s.operator``: the MonarchMesh operator (kopf), cluster-wide.

Settings come from the environment (the install manifests set them):
``MONARCH_IMAGE`` (image of the gateway and sync agents), ``MONARCH_LISTEN_HOST`` (where they
listen: ``0.0.0.0``, or ``podIP`` where pods share one network namespace),
``MONARCH_RESYNC_SECONDS`` (the periodic pass over every mesh, default 10).
"""

from __future__ import annotations

import asyncio
import logging
import os

import kopf
from kubernetes import client, config

from monarch_k8s.operator import handlers
from monarch_k8s.operator.reconcile import Reconciler
from monarch_k8s.operator.render import RenderOptions

logger = logging.getLogger("monarch_k8s.operator")


def api_client() -> client.ApiClient:
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()


async def resync(reconciler: Reconciler, interval_s: float) -> None:
    """Level-triggered backstop: drift, idle timeouts and missed events converge here."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await asyncio.to_thread(reconciler.reconcile_all)
        except Exception:
            logger.exception("resync failed; trying again in %.0fs", interval_s)


async def run() -> None:
    defaults = RenderOptions()
    options = RenderOptions(
        image=os.environ.get("MONARCH_IMAGE", defaults.image),
        listen_host=os.environ.get("MONARCH_LISTEN_HOST", defaults.listen_host),
    )
    reconciler = Reconciler(api_client(), options)
    handlers.set_reconciler(reconciler)
    task = asyncio.create_task(
        resync(reconciler, float(os.environ.get("MONARCH_RESYNC_SECONDS", "10")))
    )
    try:
        await kopf.operator(clusterwide=True, standalone=True)
    finally:
        task.cancel()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    asyncio.run(run())


if __name__ == "__main__":
    main()
