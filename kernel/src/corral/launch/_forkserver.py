"""The caller's handle on the fork server: start it once, send it orders, restart it if it died.

The server (``_child.serve``) is a separate interpreter, ``python -I -S -c BOOTSTRAP``, that
loads only ``_child`` and ``linux``: started on the first launch (about 30-50 ms, once),
then every launch is one ``sendmsg`` here and two forks of a ~10 MB single-threaded process
there. It runs in its own session (terminal signals do not reach it) and ends on EOF of its
socket, i.e. when the calling process exits, however it exits; a server killed meanwhile is
replaced by the next ``send``. Instances it launched are not its children and outlive it.

The socket is SOCK_SEQPACKET: one message is one order with its descriptors, atomic even when
several threads send at once.
"""

from __future__ import annotations

import array
import errno
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

from corral.errors import LaunchError
from corral.launch import _child

LAUNCH_DIR = str(Path(__file__).resolve().parent)
# errors of sendmsg that mean "the server is gone", as opposed to a bad order
_GONE = (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.EBADF, errno.ECONNREFUSED)


class ServerGone(Exception):
    """The fork server died before it took or finished an order."""


class ForkServer:
    """One fork server per calling process, started lazily and restarted on demand."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._owner = 0  # pid of the process that started it (a forked copy starts its own)

    @property
    def pid(self) -> int | None:
        """The server's pid, if one was started by this process and has not been reaped."""
        with self._lock:
            return self._proc.pid if self._proc is not None and self._owner == os.getpid() else None

    def _start(self) -> socket.socket:
        """Start a server (lock held); return our end of its socket."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            argv = [sys.executable, "-I", "-S", "-c", _child.BOOTSTRAP, LAUNCH_DIR,
                    str(theirs.fileno())]
            try:
                self._proc = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    pass_fds=(theirs.fileno(),), start_new_session=True, env={},
                )
            except OSError as err:
                raise LaunchError(f"cannot start the fork server {sys.executable!r}: "
                                  f"{err.strerror}", step="forkserver") from err
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._sock = ours
        self._owner = os.getpid()
        return ours

    def _discard(self) -> None:
        """Forget the current server (lock held): close our end, reap it if it exited."""
        if self._owner == os.getpid():
            if self._sock is not None:
                self._sock.close()
            if self._proc is not None:
                self._proc.poll()  # collect a dead server; a live one sees EOF and exits
        self._sock = None
        self._proc = None

    def _current(self) -> socket.socket:
        with self._lock:
            if self._owner != os.getpid():
                # inherited through a fork: the server is our parent's; drop our copy of its
                # socket so that it still sees EOF when the parent exits
                if self._sock is not None:
                    self._sock.close()
                self._sock = None
                self._proc = None
            if self._sock is None or self._proc is None or self._proc.poll() is not None:
                self._discard()
                return self._start()
            return self._sock

    def send(self, order: bytes, fds: list[int]) -> None:
        """Hand ``order`` and ``fds`` to the server, starting or restarting it as needed."""
        if len(order) > _child.MAX_ORDER or len(fds) > _child.MAX_FDS:
            raise LaunchError(f"the launch order is too large ({len(order)} bytes, {len(fds)} "
                              f"descriptors; at most {_child.MAX_ORDER}, {_child.MAX_FDS})",
                              step="plan")
        for attempt in (1, 2):
            sock = self._current()
            try:
                sock.sendmsg([order], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                        array.array("i", fds))])
                return
            except OSError as err:
                if err.errno not in _GONE or attempt == 2:
                    raise LaunchError(f"cannot reach the fork server: {err.strerror}",
                                      step="forkserver") from err
                self.lost(sock)

    def lost(self, sock: socket.socket | None = None) -> None:
        """The server died (or ``sock``'s server did): the next send starts a new one."""
        with self._lock:
            if sock is None or sock is self._sock:
                self._discard()

    def alive(self) -> bool:
        """Whether this process's server runs."""
        with self._lock:
            return (self._owner == os.getpid() and self._proc is not None
                    and self._proc.poll() is None)

    def died(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the server to exit (it closes its descriptors a moment
        before it becomes a zombie); True, and forget it, if it did."""
        with self._lock:
            proc = self._proc if self._owner == os.getpid() else None
        if proc is None:
            return True
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        self.lost()
        return True

    def stop(self) -> None:
        """Close the socket (the server exits on EOF) and wait for it."""
        with self._lock:
            proc = self._proc if self._owner == os.getpid() else None
            self._discard()
        if proc is not None:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


SERVER = ForkServer()
