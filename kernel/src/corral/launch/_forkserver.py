"""The caller's handle on the fork server: start it once, send it orders, restart it if it died.

The server (``_child.serve``) is a separate interpreter, ``python -I -S -c BOOTSTRAP``, that
loads only ``_child`` and ``linux``: started on the first launch (about 40-50 ms, once),
then every launch is one ``sendmsg`` here and two forks of a ~11 MB single-threaded process
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
from dataclasses import dataclass
from pathlib import Path

from corral.errors import LaunchError
from corral.launch import _child

LAUNCH_DIR = str(Path(__file__).resolve().parent)
# errors of sendmsg that mean "the server is gone", as opposed to a bad order
_GONE = (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.EBADF, errno.ECONNREFUSED)


class ServerGone(Exception):
    """The fork server died before it took or finished an order."""


@dataclass(eq=False)
class Server:
    """One running fork server: its process and our end of its socket."""

    proc: subprocess.Popen[bytes]
    sock: socket.socket


class ForkServer:
    """One fork server per calling process, started lazily and restarted on demand."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._server: Server | None = None
        self._owner = 0  # pid of the process that started it (a forked copy starts its own)

    @property
    def pid(self) -> int | None:
        """The current server's pid, if this process started one."""
        with self._lock:
            server = self._server if self._owner == os.getpid() else None
            return server.proc.pid if server is not None else None

    def _start(self) -> Server:
        """Start a server (lock held)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            argv = [sys.executable, "-I", "-S", "-c", _child.BOOTSTRAP, LAUNCH_DIR,
                    str(theirs.fileno())]
            try:
                proc = subprocess.Popen(
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
        self._server = Server(proc, ours)
        self._owner = os.getpid()
        return self._server

    def _current(self) -> Server:
        """The live server, started or replaced as needed."""
        with self._lock:
            if self._owner != os.getpid() and self._server is not None:
                # inherited through a fork: the server is our parent's; drop our copy of its
                # socket so that it still sees EOF when the parent exits
                self._server.sock.close()
                self._server = None
            server = self._server
            if server is None or server.proc.poll() is not None:
                if server is not None:
                    server.sock.close()
                return self._start()
            return server

    def send(self, order: bytes, fds: list[int]) -> Server:
        """Hand ``order`` and ``fds`` to the server, starting or restarting it as needed;
        return the server that took it."""
        if len(order) > _child.MAX_ORDER or len(fds) > _child.MAX_FDS:
            raise LaunchError(f"the launch order is too large ({len(order)} bytes, {len(fds)} "
                              f"descriptors; at most {_child.MAX_ORDER}, {_child.MAX_FDS})",
                              step="plan")
        for attempt in (1, 2):
            server = self._current()
            try:
                server.sock.sendmsg([order], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                               array.array("i", fds))])
                return server
            except OSError as err:
                if err.errno not in _GONE or attempt == 2:
                    raise LaunchError(f"cannot reach the fork server: {err.strerror}",
                                      step="forkserver") from err
                self._forget(server)
        raise AssertionError("unreachable")

    def _forget(self, server: Server) -> None:
        """Drop ``server`` if it is still the current one; collect it if it exited."""
        with self._lock:
            if self._server is server:
                self._server = None
                server.sock.close()
        server.proc.poll()

    def died(self, server: Server, timeout: float) -> bool:
        """Wait up to ``timeout`` s for ``server`` to exit (it closes its descriptors a moment
        before it becomes a zombie); True, and forget it, if it did."""
        try:
            server.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        self._forget(server)
        return True

    def stop(self) -> None:
        """Close the socket (the server exits on EOF) and wait for it."""
        with self._lock:
            server = self._server if self._owner == os.getpid() else None
            self._server = None
        if server is not None:
            server.sock.close()
            try:
                server.proc.wait(5)
            except subprocess.TimeoutExpired:
                server.proc.kill()
                server.proc.wait(5)


SERVER = ForkServer()
