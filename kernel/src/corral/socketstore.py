"""Listening sockets the kernel keeps for drivers across their restarts (systemd's fd store).

A driver that declared the ``listen_sockets`` feature hands the kernel a copy of a listening
TCP socket of its own (``socket.keep``; the kernel lifts it with ``pidfd_getfd``). The store
holds it under (driver name, key) and the supervisor hands every socket kept for a driver to
that driver's next process when it starts it: inherited descriptors, named in the
environment variable ``CORRAL_KEPT_FDS`` (``corral.protocol.KEPT_FDS_ENV``: a JSON object,
key -> descriptor number). While no
process of the driver runs, the kernel's copy keeps the socket listening, so clients that
connect meanwhile wait in its backlog and the next process accepts them: none is refused.

The kernel closes its copy when the driver says so (``socket.release``) or when the driver
is given up (marked failed: a socket nobody will accept on would leave clients hanging
instead of refused). A kernel restart loses every copy; the drivers still hold their own
and keep them again when they re-sync. Keys are per driver: one driver never sees, replaces
or inherits another's.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from dataclasses import dataclass

from corral.errors import CorralError, ErrorCode

MAX_PER_DRIVER = 1024  # sockets one driver may have kept at once (each is a kernel descriptor)


@dataclass(frozen=True)
class KeptSocket:
    """One socket the kernel holds for a driver: its descriptor in the kernel, its address
    and its inode (the socket's identity, the same in every process holding it)."""

    key: str
    fd: int
    host: str
    port: int
    inode: int

    def as_json(self) -> dict[str, object]:
        """The view ``socket.keep`` and ``socket.list`` answer with."""
        return {"key": self.key, "host": self.host, "port": self.port, "fd": self.fd,
                "inode": self.inode}


def listening_tcp_address(fd: int) -> tuple[str, int]:
    """The bound address of ``fd`` if it is a listening TCP socket; ValueError says why not."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        raise ValueError("not a socket") from None
    try:
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            raise ValueError(f"an {sock.family.name} socket, not TCP/IP")
        if sock.type != socket.SOCK_STREAM or sock.proto not in (0, socket.IPPROTO_TCP):
            raise ValueError("not a TCP socket")
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) != 1:
            raise ValueError("a TCP socket that is not listening")
        host, port = sock.getsockname()[:2]
        return str(host), int(port)
    finally:
        sock.detach()


class SocketStore:
    """The listening sockets kept per driver name; every descriptor here is the store's own."""

    def __init__(self, *, limit: int = MAX_PER_DRIVER) -> None:
        self.limit = limit
        self._kept: dict[str, dict[str, KeptSocket]] = {}

    def keep(self, driver: str, key: str, fd: int) -> tuple[KeptSocket, bool]:
        """Take ownership of ``fd`` and keep it for ``driver`` under ``key`` (an earlier copy
        under that key is closed: replaced); whether one was replaced. A descriptor that is
        not a listening TCP socket is closed and refused (ERROR 422)."""
        try:
            host, port = listening_tcp_address(fd)
            inode = os.fstat(fd).st_ino
        except (ValueError, OSError) as exc:
            os.close(fd)
            raise CorralError(f"socket.keep: {key!r} is {exc}; only a listening TCP socket "
                              "can be kept", code=ErrorCode.INVALID) from None
        if fd < 3:  # a kernel started with stdio closed: 0-2 are the next process's stdio
            moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
            os.close(fd)
            fd = moved
        kept = self._kept.setdefault(driver, {})
        if key not in kept and len(kept) >= self.limit:
            os.close(fd)
            raise CorralError(f"socket.keep: driver {driver!r} already has {self.limit} "
                              "sockets kept; release some first", code=ErrorCode.INVALID)
        old = kept.get(key)
        kept[key] = KeptSocket(key, fd, host, port, inode)
        if old is not None:
            os.close(old.fd)
        return kept[key], old is not None

    def list(self, driver: str) -> list[KeptSocket]:
        """The sockets kept for ``driver``, by key."""
        return sorted(self._kept.get(driver, {}).values(), key=lambda k: k.key)

    def release(self, driver: str, key: str) -> bool:
        """Close the copy kept for ``driver`` under ``key``; whether there was one."""
        old = self._kept.get(driver, {}).pop(key, None)
        if old is None:
            return False
        os.close(old.fd)
        return True

    def drop(self, driver: str) -> int:
        """Close every copy kept for ``driver`` (it is given up); how many there were."""
        kept = self._kept.pop(driver, {})
        for k in kept.values():
            with contextlib.suppress(OSError):
                os.close(k.fd)
        return len(kept)

    def inherited(self, driver: str) -> dict[str, int]:
        """What ``driver``'s next process inherits: key -> the kernel's descriptor number
        (passed at that same number and named in ``corral.protocol.KEPT_FDS_ENV``)."""
        return {k.key: k.fd for k in self.list(driver)}

    def close(self) -> None:
        """Close every copy (the kernel stops)."""
        for driver in list(self._kept):
            self.drop(driver)
