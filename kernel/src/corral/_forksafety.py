"""Keep a forked child from speaking for its asyncio parent through inherited signal plumbing.

asyncio's signal handlers write the signal number to a wake-up fd shared with any child that
is forked without exec (pyroute2 forks for netns work, the launch path forks before exec).
A SIGTERM sent to such a child would then be read by the parent's loop as its own SIGTERM.
"""

from __future__ import annotations

import os
import signal

_installed = False


def _detach_signals() -> None:
    try:
        signal.set_wakeup_fd(-1)
    except ValueError:  # not the child's main thread: nothing to undo there
        return
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


def protect_signal_handlers() -> None:
    """Give every child forked from this process default signal handling (idempotent)."""
    global _installed
    if not _installed:
        os.register_at_fork(after_in_child=_detach_signals)
        _installed = True
