"""Processes are identified by (pid, start time), never by pid alone: pids are reused.

The one place for the process primitives the kernel needs for instances and drivers alike:
liveness, signalling, reaping, waiting for an exit through a pidfd, terminating with a grace
period, and taking a copy of another process's descriptor.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

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


def describe_exit(code: int | None) -> str:
    """A ``reap`` result in words: 'exit 3', 'killed by SIGKILL', '' while it runs."""
    if code is None:
        return ""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit {code}"


async def wait_exit(pid: int, start_time: float | None = None) -> None:
    """Return once the process ``pid`` (started at ``start_time``, if given) has exited.

    Waits on a pidfd, so it works for children and adopted processes alike; the pidfd pins
    the pid, so the identity check after opening it cannot race with pid reuse.
    """
    loop = asyncio.get_running_loop()
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        if start_time is not None and not is_alive(pid, start_time):
            return
        done: asyncio.Future[None] = loop.create_future()
        loop.add_reader(fd, _resolve, done)
        try:
            await done
        finally:
            loop.remove_reader(fd)
    finally:
        os.close(fd)


def terminate(pid: int, start_time: float, grace: float) -> None:
    """SIGTERM the process group, SIGKILL after ``grace`` seconds; collect it if ours.

    Blocking (it polls): run it in a thread from async code.
    """
    if not is_alive(pid, start_time):
        return
    signal_instance(pid, start_time, signal.SIGTERM, group=True)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        reap(pid)
        if not is_alive(pid, start_time):
            return
        time.sleep(0.01)
    signal_instance(pid, start_time, signal.SIGKILL, group=True)
    for _ in range(100):
        reap(pid)
        if not is_alive(pid, start_time):
            return
        time.sleep(0.01)


def take_fd(pid: int, start_time: float | None, fd: int) -> int:
    """A copy of descriptor ``fd`` of process ``pid`` (``pidfd_getfd``, needs ptrace rights).

    The pidfd pins the process: when ``start_time`` is given and the process is no longer
    the one that started then, ``ProcessLookupError`` is raised and nothing is taken.
    Raises ``OSError`` when the process or the descriptor cannot be had.
    """
    pidfd = os.pidfd_open(pid)
    try:
        if start_time is not None and not is_alive(pid, start_time):
            raise ProcessLookupError(f"process {pid} is not the one started at {start_time}")
        return linux.pidfd_getfd(pidfd, fd)
    finally:
        os.close(pidfd)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
