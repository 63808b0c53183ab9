"""monarch-sync: peer-to-peer differential workspace sync through a pipelined tree.

Embedding::

    from monarch_sync import Agent, push, synced_path

    agent = Agent("/var/lib/sync", token)      # inside your asyncio loop
    await agent.start()
    sys.path.insert(0, str(agent.synced_path))

    report = await push("~/project", ["w1:7878", "w2:7878"], token)
    if not report.ok:
        print(report.format())
"""

from .agent import Agent
from .client import NodeReport, PushReport, push, push_sync
from .diff import Plan, diff
from .exceptions import (
    BadToken,
    DigestMismatch,
    FrameTooLarge,
    PathEscape,
    PeerLost,
    PushFailed,
    SyncError,
    SyncProtocolError,
)
from .manifest import Entry, Kind, Manifest
from .progress import LineProgress, Progress, TerminalProgress
from .recovery import Recovery
from .scan import StatCache, scan_tree
from .store import Store, synced_path
from .tree import TreeNode, choose_fanout, plan_tree
from .tunnel import dial_gateway
from .workspace import SyncWorkspace

__version__ = "0.1.0"

__all__ = [
    "Agent",
    "BadToken",
    "DigestMismatch",
    "Entry",
    "FrameTooLarge",
    "Kind",
    "LineProgress",
    "Manifest",
    "NodeReport",
    "PathEscape",
    "PeerLost",
    "Plan",
    "Progress",
    "PushFailed",
    "PushReport",
    "Recovery",
    "StatCache",
    "Store",
    "SyncError",
    "SyncProtocolError",
    "SyncWorkspace",
    "TerminalProgress",
    "TreeNode",
    "choose_fanout",
    "dial_gateway",
    "diff",
    "plan_tree",
    "push",
    "push_sync",
    "scan_tree",
    "synced_path",
]
