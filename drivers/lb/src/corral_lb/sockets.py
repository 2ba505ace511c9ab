"""Listening sockets of the proxy frontends, and how they outlive an lb driver process.

A frontend gets its listening socket from a ``ListenSockets``: ``FreshSockets`` binds a new
one (tests, benchmarks, ``corral dev``); ``KeptSockets`` (the driver under corrald) has the
kernel keep a copy of it (``socket.keep``) and, in the driver's next process, takes back the
one its previous process kept (inherited at start, ``corral.sdk.inherited_sockets``). The
kernel's copy keeps the socket listening while the driver restarts: clients that connect
meanwhile wait in its backlog and the next process accepts them, so a crash refuses no
connection. Only the connections the dead process had accepted are cut.

Those are counted. A kept frontend's listener stores how many client connections it has
open in a small file mapped into memory (``OpenCount``: one store per accept and per close,
no system call), whose last value outlives the process; the next process reads it at start
and reports it on the frontend's metrics as ``cut_by_last_restart``, and summed over every
restart since the runtime directory was made (host boot) as ``cut_by_restart``.
Precision: the count is the listener's own (``Listener.active``: accepted and not yet
released) as it was when the process died, never less than the connections it had taken:
the count includes a connection before ``accept()`` takes it, so a crash in between
over-counts by one instead of missing one. It counts connections, not requests, so it is an
upper bound of the requests cut: an idle keep-alive connection is cut too (its client fails
only if it sends a request on it without retrying), and a connection whose client had its
whole answer is counted until the proxy has seen it close. An L4 connection is cut whatever
it was doing. Connections still in the backlog are neither cut nor counted. An orderly stop
counts what its close cut.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import mmap
import os
import socket
import struct
from pathlib import Path
from typing import Any, Protocol

import structlog

from corral.errors import CorralError

log = structlog.get_logger("corral_lb")

BACKLOG = 4096  # a frontend's listen backlog: where clients wait while the driver restarts


def listening_socket(host: str, port: int, *, backlog: int = BACKLOG) -> socket.socket:
    """A new TCP socket listening on (host, port); IPv6 (only) when ``host`` has a colon."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=backlog)


def http_key(host: str, port: int) -> str:
    """The key of an app's own HTTP frontend: one per address, shared by the apps on it."""
    return f"http:{host}:{port}"


def tcp_key(app: str) -> str:
    """The key of an app's TCP (L4) frontend."""
    return f"tcp:{app}"


class ListenSockets(Protocol):
    """Where frontends get their listening sockets, and say when one is gone for good."""

    async def open(self, key: str, host: str, port: int, *, backlog: int = BACKLOG
                   ) -> socket.socket:
        """A socket listening on (host, port) for the frontend known as ``key``."""

    async def release(self, key: str) -> None:
        """The frontend ``key`` is gone (its app detached); its socket is the frontend's to
        close."""


class FreshSockets:
    """A new socket for every frontend, kept by nobody: it dies with the process."""

    async def open(self, key: str, host: str, port: int, *, backlog: int = BACKLOG
                   ) -> socket.socket:
        """A new listening socket."""
        return listening_socket(host, port, backlog=backlog)

    async def release(self, key: str) -> None:
        """Nothing is kept, so nothing to release."""


class Kernel(Protocol):
    """What ``KeptSockets`` needs of the kernel link (``corral.sdk.KernelLink``)."""

    async def call(self, op: str, args: dict[str, Any] | None = None, *,
                   timeout: float = 30.0) -> dict[str, Any]:
        """One request to the kernel; raises CorralError."""


_HEAD = struct.Struct("=qq")  # open now, cut by earlier restarts; the key (UTF-8) follows


class OpenCount:
    """A frontend's open client connections, in a file mapped into memory so that the value
    at the moment the process dies is left behind for the next one.

    The file (mode 0600): two native int64 (connections open now; connections cut by the
    restarts before this process) followed by the frontend's key in UTF-8."""

    def __init__(self, path: Path, key: str, *, cut_by_restart: int = 0,
                 cut_by_last_restart: int = 0) -> None:
        self.path = path
        self.key = key
        self.cut_by_restart = cut_by_restart  # summed over every restart so far
        self.cut_by_last_restart = cut_by_last_restart  # when the previous process ended
        tmp = path.with_name(path.name + ".new")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, _HEAD.pack(0, cut_by_restart) + key.encode())
            self._map: mmap.mmap | None = mmap.mmap(fd, _HEAD.size)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        self._cells: memoryview | list[int] = memoryview(self._map).cast("q")

    def set(self, connections: int) -> None:
        """Record the connections open now (a store to memory)."""
        self._cells[0] = connections

    def freeze(self) -> None:
        """Stop recording: the file keeps the last value (a listener that stops accepting
        freezes it, so an orderly stop leaves the connections its close cuts)."""
        cells = self._cells
        if isinstance(cells, memoryview):
            self._cells = list(cells)
            cells.release()
            if self._map is not None:
                self._map.close()
                self._map = None

    def remove(self) -> None:
        """Stop recording and delete the file (the frontend is gone for good)."""
        self.freeze()
        self.path.unlink(missing_ok=True)

    @staticmethod
    def read(path: Path) -> tuple[str, int, int] | None:
        """(key, open, cut by earlier restarts) as a process left them, None if unreadable."""
        try:
            data = path.read_bytes()
            connections, before = _HEAD.unpack_from(data)
            key = data[_HEAD.size:].decode()
        except (OSError, struct.error, UnicodeDecodeError):
            return None
        return key, max(0, connections), max(0, before)


class FrontendSocket(socket.socket):
    """A kept frontend's listening socket: its key, and where its listener counts the client
    connections it has open (``corral_lb.listener.Listener`` does)."""

    __slots__ = ("key", "open_count")
    key: str
    open_count: OpenCount


class KeptSockets:
    """Frontend sockets the kernel keeps across restarts of this driver.

    ``inherited``: the sockets the kernel handed this process at start, by key
    (``corral.sdk.inherited_sockets()``); ``directory``: where the open-connection counts
    live (the driver's runtime directory, which outlives its processes)."""

    def __init__(self, kernel: Kernel, directory: Path, *,
                 inherited: dict[str, socket.socket] | None = None) -> None:
        self.kernel = kernel
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._inherited = dict(inherited or {})
        self._open: dict[str, FrontendSocket] = {}
        # what the previous processes left: per key, open at the last end, and all cut so far
        self._cut_last: dict[str, int] = {}
        self._cut_all: dict[str, int] = {}
        for path in directory.glob("*.open"):
            found = OpenCount.read(path)
            if found is not None:
                key, connections, before = found
                self._cut_last[key] = connections
                self._cut_all[key] = before + connections
        if self._inherited or any(self._cut_last.values()):
            log.info("frontends from the previous process", inherited=sorted(self._inherited),
                     cut_by_restart=sum(self._cut_last.values()))

    def _path(self, key: str) -> Path:
        return self.directory / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".open")

    async def open(self, key: str, host: str, port: int, *, backlog: int = BACKLOG
                   ) -> socket.socket:
        """The socket for frontend ``key`` on (host, port): the one the previous process had
        kept if it listens on that address, else a new one, which the kernel is asked to
        keep (a failure to keep is logged: the frontend works, a restart would refuse)."""
        stale = self._open.pop(key, None)
        if stale is not None:
            stale.open_count.remove()
        sock, same_key = self._take_inherited(key, host, port)
        fresh = sock is None
        if sock is None:
            sock = listening_socket(host, port, backlog=backlog)
        kept = FrontendSocket(fileno=sock.detach())
        kept.key = key
        kept.open_count = OpenCount(self._path(key), key,
                                    cut_by_restart=self._cut_all.get(key, 0),
                                    cut_by_last_restart=self._cut_last.get(key, 0))
        self._open[key] = kept
        if not same_key:
            await self._keep(key, kept)
        log.info("frontend socket", key=key, listen=f"{host}:{port}",
                 kept_across_restart=not fresh)
        return kept

    def _take_inherited(self, key: str, host: str, port: int
                        ) -> tuple[socket.socket | None, bool]:
        """The inherited socket on (host, port), and whether it was kept under ``key``."""
        sock = self._inherited.pop(key, None)
        if sock is not None and _listens_on(sock, host, port):
            return sock, True
        if sock is not None:  # the frontend moved meanwhile: the keep of the new one replaces
            sock.close()
        # kept under another key (a driver whose keys changed: binding anew would fail while
        # that copy listens); kept again under this key, and sync() releases the other
        other = next((k for k, s in self._inherited.items() if _listens_on(s, host, port)),
                     None)
        if other is not None:
            return self._inherited.pop(other), False
        return None, False

    async def release(self, key: str) -> None:
        """Frontend ``key`` is gone: the kernel closes its copy, its count is deleted."""
        sock = self._open.pop(key, None)
        if sock is not None:
            sock.open_count.remove()
        else:
            self._path(key).unlink(missing_ok=True)
        inherited = self._inherited.pop(key, None)
        if inherited is not None:
            inherited.close()
        self._cut_last.pop(key, None)
        self._cut_all.pop(key, None)
        await self._release_in_kernel(key)

    async def sync(self) -> None:
        """After a (re)connect, once the frontends are open again (``state.sync``): close the
        inherited sockets no frontend took (their apps went away meanwhile) and make the
        kernel keep exactly the sockets open here: a restarted kernel lost its copies, and
        the keys of frontends gone are released."""
        for sock in self._inherited.values():
            sock.close()
        self._inherited.clear()
        for key, sock in list(self._open.items()):
            if sock.fileno() < 0:  # closed by its frontend without a release
                del self._open[key]
                sock.open_count.remove()
        for path in self.directory.glob("*.open"):  # the counts of frontends gone
            if path not in {self._path(k) for k in self._open}:
                path.unlink(missing_ok=True)
        self._cut_last = {k: v for k, v in self._cut_last.items() if k in self._open}
        self._cut_all = {k: v for k, v in self._cut_all.items() if k in self._open}
        try:
            listed = await self.kernel.call("socket.list", {})
        except CorralError as exc:
            log.warning("cannot list the sockets the kernel keeps", error=exc.reason)
            return
        kept = {str(k["key"]): k for k in listed.get("sockets", [])}
        for key in sorted(kept.keys() - self._open.keys()):
            await self._release_in_kernel(key)
        for key, sock in self._open.items():
            held = kept.get(key)
            if held is None or held.get("inode") != os.fstat(sock.fileno()).st_ino:
                await self._keep(key, sock)

    async def _keep(self, key: str, sock: socket.socket) -> None:
        try:
            await self.kernel.call("socket.keep", {"pid": os.getpid(), "fd": sock.fileno(),
                                                   "key": key})
        except CorralError as exc:
            log.warning("the kernel does not keep this frontend's socket: a restart of the "
                        "driver will refuse its clients", key=key, error=exc.reason)

    async def _release_in_kernel(self, key: str) -> None:
        try:
            await self.kernel.call("socket.release", {"key": key})
        except CorralError as exc:  # the next sync releases it
            log.warning("cannot release a kept socket", key=key, error=exc.reason)


def _listens_on(sock: socket.socket, host: str, port: int) -> bool:
    """Whether ``sock`` is a TCP socket listening on exactly (host, port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        if sock.family != family or sock.getsockopt(socket.SOL_SOCKET,
                                                    socket.SO_ACCEPTCONN) != 1:
            return False
        bound, bound_port = sock.getsockname()[:2]
    except OSError:
        return False
    if bound_port != port:
        return False
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(bound) == ipaddress.ip_address(host)
    return bool(bound == host)
