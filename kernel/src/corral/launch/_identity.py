"""Instances are identified by (pid, start time), never by pid alone: pids are reused."""

from __future__ import annotations

import os

import psutil

from corral.launch import linux

# psutil derives create_time from clock ticks (10 ms) plus the boot time: equal for one
# process whoever reads it, so a tolerance far below one tick is enough.
_TOLERANCE = 0.005


def _process(pid: int, start_time: float) -> psutil.Process | None:
    try:
        proc = psutil.Process(pid)
        if abs(proc.create_time() - start_time) > _TOLERANCE:
            return None
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
    except psutil.Error:
        return None
    return proc


def is_alive(pid: int, start_time: float) -> bool:
    """True if the process ``pid`` that started at ``start_time`` still runs (zombies don't)."""
    return _process(pid, start_time) is not None


def signal_instance(pid: int, start_time: float, sig: int, group: bool = True) -> bool:
    """Send ``sig`` to the instance (its process group when ``group``); False if it is gone.

    With a pid namespace the pid is the namespace's init (tini), which forwards the signal to
    the app's process group; SIGKILL to it ends every process of the namespace.
    """
    if _process(pid, start_time) is None:
        return False
    try:
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True


def become_subreaper() -> None:
    """Adopt orphaned descendants (the launched instances) so their exit status reaches us.

    Optional for the kernel: without it instances are re-parented to the host's init. With
    it, the caller must collect them (``reap``), or they stay zombies until it exits; after
    a restart of the caller they belong to init again, which is why identity is
    (pid, start time) and liveness is checked with ``is_alive``.
    """
    linux.set_child_subreaper()


def reap(pid: int) -> int | None:
    """Collect ``pid`` if it is our exited child: its exit code (-N: killed by signal N).

    None if it still runs or is not our child. Reaps only the given pid, never -1, so it does
    not steal the statuses asyncio's child watchers wait for.
    """
    try:
        got, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return None
    if got == 0:
        return None
    return os.waitstatus_to_exitcode(status)
