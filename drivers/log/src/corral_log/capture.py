"""Capturing an instance's stdout/stderr through named pipes that outlive the driver.

Per instance and stream the driver creates a FIFO ``<runtime>/<instance>.out|.err`` (mode
0600; the launcher opens it as root, O_WRONLY, before dropping privileges) and holds it open
O_RDWR|O_NONBLOCK, so the pipe always has a reader while the driver runs and the driver never
sees EOF. A *keeper* process (``sleep infinity`` renamed ``corral-log-keeper:<instance>``)
inherits the same O_RDWR descriptors and outlives the driver: while the driver is down the
pipe still has a reader, so the app's writes fill the pipe buffer (raised to ``pipe_size``)
and then block; they never fail with EPIPE/SIGPIPE and nothing is lost. The restarted driver
re-opens the FIFOs by path and drains them.

Reading never consumes data before it is stored: ``tee(2)`` copies the FIFO's content into a
private pipe without consuming it, the copy is processed and written to the default sink, and
only then the same number of bytes is consumed. A kill -9 between the write and the consume
means the chunk is read again after the restart (at-least-once: it may appear twice, it is
never missing).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import shutil
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import psutil

PIPE_SIZE = 1 << 20
SPLICE_F_NONBLOCK = 2

_libc = ctypes.CDLL(None, use_errno=True)
_tee = _libc.tee
_tee.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_size_t, ctypes.c_uint]
_tee.restype = ctypes.c_ssize_t

KEEPER_PREFIX = "corral-log-keeper:"


_DEVNULL: list[int] = []


def _devnull() -> int:
    if not _DEVNULL:
        _DEVNULL.append(os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC))
    return _DEVNULL[0]


def fifo_paths(runtime: Path, instance_id: str) -> tuple[Path, Path]:
    """The stdout and stderr FIFO paths of an instance."""
    return runtime / f"{instance_id}.out", runtime / f"{instance_id}.err"


def make_fifo(path: Path) -> None:
    """Create a FIFO of mode 0600 at ``path`` (reusing one that is already there)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        os.mkfifo(path, 0o600)
        return
    if not stat.S_ISFIFO(st.st_mode):
        raise FileExistsError(f"{path} exists and is not a FIFO")


def set_pipe_size(fd: int, size: int) -> int:
    """Raise the pipe's capacity (best effort, capped by /proc/sys/fs/pipe-max-size)."""
    for want in (size, 256 << 10, 64 << 10):
        try:
            return int(fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, want))
        except OSError:
            continue
    return int(fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ))


def open_fifo(path: Path, pipe_size: int = PIPE_SIZE) -> int:
    """Open a FIFO O_RDWR|O_NONBLOCK (a reader that never sees EOF) and size its buffer."""
    fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    set_pipe_size(fd, pipe_size)
    return fd


class FifoReader:
    """Reads a FIFO without losing data on a crash: tee, process, then consume."""

    def __init__(
        self,
        path: Path,
        on_data: Callable[[bytes], None],
        *,
        pipe_size: int = PIPE_SIZE,
        fd: int | None = None,
    ) -> None:
        self.path = path
        self.on_data = on_data
        self.fd = fd if fd is not None else open_fifo(path, pipe_size)
        self.copy_r, self.copy_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.chunk = set_pipe_size(self.copy_w, pipe_size)
        self.bytes_read = 0

    def read_once(self) -> int:
        """Process what the FIFO holds (up to one chunk); bytes processed, 0 if it was empty.

        If ``on_data`` raises, nothing is consumed: the data stays in the FIFO for a retry."""
        n = int(_tee(self.fd, self.copy_w, self.chunk, SPLICE_F_NONBLOCK))
        if n <= 0:
            if n < 0 and ctypes.get_errno() not in (errno.EAGAIN, errno.EINTR):
                raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), str(self.path))
            return 0
        data = os.read(self.copy_r, n)
        while len(data) < n:  # a pipe read returns what is buffered; tee put all n there
            data += os.read(self.copy_r, n - len(data))
        self.on_data(data)  # if this raises, nothing was consumed
        self._consume(n)
        self.bytes_read += n
        return n

    def discard_copy(self) -> None:
        """Empty the private copy after ``on_data`` failed (the FIFO still holds the data)."""
        with contextlib.suppress(BlockingIOError):
            while os.read(self.copy_r, 1 << 20):
                pass

    def _consume(self, n: int) -> None:
        # the bytes were already stored: splice them to /dev/null (no copy to user space)
        while n > 0:
            n -= os.splice(self.fd, _devnull(), n)

    def close(self) -> None:
        """Close the FIFO and the private pipe (the FIFO itself stays)."""
        for fd in (self.fd, self.copy_r, self.copy_w):
            with contextlib.suppress(OSError):
                os.close(fd)


# ---- keepers ---------------------------------------------------------------------------------


def keeper_file(runtime: Path, instance_id: str) -> Path:
    """Where a keeper's ``pid create_time`` is recorded."""
    return runtime / f"{instance_id}.keeper"


def spawn_keeper(runtime: Path, instance_id: str, fds: tuple[int, int]) -> int:
    """Start a process that holds ``fds`` (O_RDWR ends of the FIFOs) open until stopped."""
    sleep = shutil.which("sleep") or "/bin/sleep"
    proc = subprocess.Popen(
        [KEEPER_PREFIX + instance_id, "infinity"],
        executable=sleep,
        pass_fds=fds,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # a signal to the driver's process group must not reach it
    )
    created = psutil.Process(proc.pid).create_time()
    keeper_file(runtime, instance_id).write_text(f"{proc.pid} {created}\n")
    _children[proc.pid] = proc
    return proc.pid


_children: dict[int, subprocess.Popen[bytes]] = {}


def find_keeper(runtime: Path, instance_id: str) -> psutil.Process | None:
    """The live keeper of an instance, checked by pid, start time and name (never pid alone)."""
    try:
        pid_s, created_s = keeper_file(runtime, instance_id).read_text().split()
        p = psutil.Process(int(pid_s))
        if abs(p.create_time() - float(created_s)) > 0.01:
            return None
        if not p.cmdline() or p.cmdline()[0] != KEEPER_PREFIX + instance_id:
            return None
        if p.status() == psutil.STATUS_ZOMBIE:
            return None
        return p
    except (OSError, ValueError, psutil.Error):
        return None


def stop_keeper(runtime: Path, instance_id: str) -> None:
    """Stop an instance's keeper (if it is still the process we started) and forget it."""
    p = find_keeper(runtime, instance_id)
    if p is not None:
        with contextlib.suppress(psutil.Error):
            p.kill()
        child = _children.pop(p.pid, None)
        if child is not None:
            child.wait(5)
    keeper_file(runtime, instance_id).unlink(missing_ok=True)


def live_keepers(runtime: Path) -> list[str]:
    """Instance ids that have a keeper file in ``runtime``."""
    return sorted(p.name[: -len(".keeper")] for p in runtime.glob("*.keeper"))
