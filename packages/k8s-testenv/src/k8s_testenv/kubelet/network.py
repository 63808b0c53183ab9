"""Pod addresses and the per-pod sandbox (hostname and /etc/hosts).

Every pod gets its own loopback address from the cluster's pod network, a /16 of 127/8 chosen per
cluster (Linux routes all of 127/8 to lo, so a pod's servers can bind their pod IP without root;
clusters started side by side, e.g. by parallel test runs, get different networks). When the kernel lets us create mount
and UTS namespaces (as root, or via a user namespace), each pod runs under ``unshare`` with its
own hostname and with a kubelet-maintained hosts file bind-mounted over /etc/hosts, so
``socket.gethostname()`` and names such as ``web-0.web.default.svc.cluster.local`` resolve to
pod IPs. Without namespaces, pods still get HOSTNAME and their IP, but no name resolution.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import secrets
import shutil
import subprocess

__all__ = ["IpPool", "pick_pod_network", "sandbox_prefix", "sandbox_support"]

_SANDBOX_SCRIPT = 'mount --bind "$0" /etc/hosts && hostname "$1" && shift && exec "$@"'


def pick_pod_network() -> str:
    """A random 127.X.0.0/16 (X in 16..254): two clusters on one machine rarely share one."""
    return f"127.{secrets.randbelow(239) + 16}.0.0/16"


class IpPool:
    """Hands out pod IPs from a loopback network; pure bookkeeping, no I/O.

    Fresh addresses first, released ones only once the network is used up: CNI's host-local
    IPAM also goes round-robin, so a recreated pod gets a new IP, as in real clusters (a peer
    still holding a connection to the old address must not mistake the new pod for the old).
    """

    def __init__(self, network: str = "127.10.0.0/16") -> None:
        self._hosts = ipaddress.ip_network(network).hosts()
        self._free: list[str] = []
        self._used: set[str] = set()

    def allocate(self) -> str:
        fresh = next(self._hosts, None)
        ip = str(fresh) if fresh is not None else self._free.pop(0)
        self._used.add(ip)
        return ip

    def release(self, ip: str) -> None:
        if ip in self._used:
            self._used.remove(ip)
            self._free.append(ip)


@functools.cache
def sandbox_support() -> tuple[str, ...] | None:
    """The ``unshare`` flags that work here, or None when namespaces are unavailable."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    attempts: list[tuple[str, ...]] = [("--mount", "--uts")]
    if os.geteuid() != 0:
        attempts.insert(0, ("--user", "--map-root-user", "--mount", "--uts"))
    for flags in attempts:
        probe = [
            unshare,
            *flags,
            "--",
            "/bin/sh",
            "-c",
            _SANDBOX_SCRIPT,
            "/etc/hosts",
            "probe",
            "true",
        ]
        try:
            ok = subprocess.run(probe, capture_output=True, timeout=10).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            ok = False
        if ok:
            return (unshare, *flags)
    return None


def sandbox_prefix(hosts_file: str, hostname: str, mounts: str = "") -> list[str]:
    """argv prefix that runs a command in the pod's sandbox (empty when unsupported).

    ``mounts`` is a shell command (the container's volume bind mounts) run inside the new
    mount namespace before the command.
    """
    flags = sandbox_support()
    if flags is None:
        return []
    script = (
        _SANDBOX_SCRIPT.replace("exec ", f"{mounts} && exec ", 1) if mounts else _SANDBOX_SCRIPT
    )
    return [*flags, "--", "/bin/sh", "-c", script, hosts_file, hostname]
