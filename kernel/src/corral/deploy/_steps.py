"""Ledger steps of deploys and instances, off the kernel's event loop on a networked ledger.

On etcd a ledger call is a network round trip and, when the cluster has lost its quorum,
waits out the ledger's timeout (seconds): run on the kernel's event loop it would hold every
other request, heartbeat and instance watch meanwhile. ``ledger_step`` runs such a step (a
ledger call, or a few with no await among them) in a worker thread instead, one at a time on
this host as they ran on the loop (a step that reads then claims, picking a free uid say,
still sees no other step between the two). On a ledger of its own (SQLite, a local file and
microseconds) the step runs inline, exactly as before.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from corral.ledger import Ledger

T = TypeVar("T")

_ONE_AT_A_TIME = threading.Lock()


async def ledger_step(ledger: Ledger, step: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``step(*args, **kwargs)``: in a worker thread when ``ledger`` is networked (one such
    step at a time in this process), else inline."""
    if not ledger.remote:
        return step(*args, **kwargs)

    def locked() -> T:
        with _ONE_AT_A_TIME:
            return step(*args, **kwargs)

    return await asyncio.to_thread(locked)
