"""``python -m monarch_k8s.operator``: the operator (kopf), cluster-wide, for MonarchMesh,
TorchrunQueue and TorchrunJob.

Settings come from the environment (the install manifests set them):
``MONARCH_IMAGE`` (image of the gateway and sync agents), ``MONARCH_LISTEN_HOST`` (where they
listen: ``0.0.0.0``, or ``podIP`` where pods share one network namespace),
``MONARCH_RESYNC_SECONDS`` (the periodic pass over every mesh, queue and job, default 10),
``MONARCH_GATEWAY_ATTACH_TIMEOUT`` (Monarch's attach config timeout in gateways, default 15s),
``TORCHRUN_ETCD_IMAGE`` and ``TORCHRUN_ETCD_COMMAND`` (the etcd run for ``etcd-v2``
rendezvous; the command is split on spaces).
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
from monarch_k8s.torchrun import handlers as torchrun_handlers
from monarch_k8s.torchrun.objects import Options
from monarch_k8s.torchrun.reconcile import TorchrunReconciler

logger = logging.getLogger("monarch_k8s.operator")


def api_client() -> client.ApiClient:
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()


async def resync(reconcilers: list[Reconciler | TorchrunReconciler], interval_s: float) -> None:
    """Level-triggered backstop: drift, idle timeouts, TTLs and missed events converge here."""
    while True:
        await asyncio.sleep(interval_s)
        for reconciler in reconcilers:
            try:
                await asyncio.to_thread(reconciler.reconcile_all)
            except Exception:
                logger.exception("resync failed; trying again in %.0fs", interval_s)


async def run() -> None:
    defaults = RenderOptions()
    options = RenderOptions(
        image=os.environ.get("MONARCH_IMAGE", defaults.image),
        listen_host=os.environ.get("MONARCH_LISTEN_HOST", defaults.listen_host),
        attach_timeout=os.environ.get("MONARCH_GATEWAY_ATTACH_TIMEOUT", defaults.attach_timeout),
    )
    api = api_client()
    reconciler = Reconciler(api, options)
    handlers.set_reconciler(reconciler)
    etcd = Options()
    torchrun = TorchrunReconciler(
        api,
        Options(
            image=options.image,
            listen_host=options.listen_host,
            etcd_image=os.environ.get("TORCHRUN_ETCD_IMAGE", etcd.etcd_image),
            etcd_command=tuple(os.environ.get("TORCHRUN_ETCD_COMMAND", "etcd").split()),
        ),
    )
    torchrun_handlers.set_reconciler(torchrun)
    interval = float(os.environ.get("MONARCH_RESYNC_SECONDS", "10"))
    task = asyncio.create_task(resync([reconciler, torchrun], interval))
    try:
        await kopf.operator(clusterwide=True, standalone=True)
    finally:
        task.cancel()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    asyncio.run(run())


if __name__ == "__main__":
    main()
