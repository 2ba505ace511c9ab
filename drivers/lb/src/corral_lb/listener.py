"""A proxy frontend's listening socket, accepted from the event loop with a connection cap.

With ``max_connections`` (0: none) connections open at once it stops accepting until one
ends: the next clients wait in the kernel's listen backlog, as with HAProxy's ``maxconn``.
Out of descriptors (EMFILE, ENFILE, ENOBUFS) it pauses accepting for a moment, as asyncio's
own servers do. Both the HTTP and the L4 frontends accept through it.

On a socket the kernel keeps across driver restarts (``corral_lb.sockets.FrontendSocket``)
it also records its open connections where the next process finds them (``OpenCount``):
what a crash cuts is reported as ``cut_by_restart``.
"""

from __future__ import annotations

import _socket
import asyncio
import socket
from collections.abc import Callable
from functools import partial
from typing import Any

import structlog

from corral_lb.sockets import FrontendSocket, OpenCount

log = structlog.get_logger("corral_lb")

ACCEPTS_PER_TURN = 64  # then the event loop runs other work
ACCEPT_RETRY_DELAY = 1.0  # seconds, after running out of file descriptors (as asyncio does)


class AcceptedSocket(socket.socket):
    """A client connection a ``Listener`` accepted.

    ``family`` and ``type`` read as plain integers, as ``_socket.socket`` has them:
    ``socket.socket`` makes an enum member of each on every read, and the event loop reads
    them for every connection it takes over (``connect_accepted_socket``).
    """

    __slots__ = ()
    family = _socket.socket.family  # type: ignore[assignment]
    type = _socket.socket.type  # type: ignore[assignment]


class Listener:
    """Accepts clients on ``sock`` for ``on_client(client, peer)``, which returns whether
    it took the connection (then it counts as open until ``released()``)."""

    def __init__(self, on_client: Callable[[socket.socket, Any], bool], *,
                 max_connections: int = 0) -> None:
        self.on_client = on_client
        self.max_connections = max_connections
        self.sock: socket.socket | None = None
        self.listen = ""
        self.accepted = 0  # connections accepted since start
        self.active = 0  # connections open (taken by on_client, not yet released)
        self.limited = 0  # times accepting stopped because max_connections were open
        self._count: OpenCount | None = None  # kept sockets: `active`, left for the next process
        # an accepted descriptor -> its socket object, of the listening socket's family
        self._new_client: Callable[[int], AcceptedSocket] | None = None
        self._accepting = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._retry: asyncio.TimerHandle | None = None

    def start(self, sock: socket.socket) -> None:
        """Accept on ``sock`` (bound and listening) from the running loop."""
        sock.setblocking(False)
        self.sock = sock
        self._count = sock.open_count if isinstance(sock, FrontendSocket) else None
        self._new_client = partial(AcceptedSocket, sock.family, sock.type, sock.proto)
        host, port = sock.getsockname()[:2]
        self.listen = f"{host}:{port}"
        self._loop = asyncio.get_running_loop()
        self._start()

    def _start(self) -> None:
        if not self._accepting and self.sock is not None and self._loop is not None:
            self._accepting = True
            self._loop.add_reader(self.sock.fileno(), self._accept)

    def _stop(self) -> None:
        if self._accepting and self.sock is not None and self._loop is not None:
            self._accepting = False
            self._loop.remove_reader(self.sock.fileno())

    def _accept(self) -> None:
        sock, new_client, loop = self.sock, self._new_client, self._loop
        if sock is None or new_client is None or loop is None:
            return
        # accept(2) -> (descriptor, peer): socket.accept() without the socket object it makes
        # with two enum lookups, which new_client makes without
        accept = sock._accept  # type: ignore[attr-defined]
        count = self._count
        for _ in range(ACCEPTS_PER_TURN):
            if 0 < self.max_connections <= self.active:
                self._stop()  # resumed by released()
                self.limited += 1
                return
            # a kept socket's count includes the connection before accept() takes it: a
            # crash at any point after the syscall still counts it (one before it over-counts)
            if count is not None:
                count.set(self.active + 1)
            try:
                fd, peer = accept()
            except (BlockingIOError, InterruptedError):
                if count is not None:
                    count.set(self.active)
                return
            except OSError as e:  # EMFILE, ENFILE, ENOBUFS: pause accepting for a moment
                if count is not None:
                    count.set(self.active)
                log.warning("accept failed", listen=self.listen, error=str(e))
                self._stop()
                self._retry = loop.call_later(ACCEPT_RETRY_DELAY, self._resume)
                return
            self.accepted += 1
            if self.on_client(new_client(fd), peer):
                self.active += 1
            elif count is not None:
                count.set(self.active)

    def _resume(self) -> None:
        self._retry = None
        self._start()

    def released(self) -> None:
        """A connection ended: accept again if the cap had stopped accepting."""
        self.active -= 1
        if self._count is not None:
            self._count.set(self.active)
        if not self._accepting and self._retry is None and (
                self.max_connections <= 0 or self.active < self.max_connections):
            self._start()

    def metrics(self) -> dict[str, Any]:
        """Client connections: accepted so far, open now, the cap, times the cap was hit, and
        (kept sockets) those open when the previous process ended (``cut_by_last_restart``)
        and at the end of every earlier process since boot (``cut_by_restart``)."""
        count = self._count
        return {"listen": self.listen, "accepted": self.accepted, "active": self.active,
                "max_connections": self.max_connections, "limited": self.limited,
                "cut_by_restart": count.cut_by_restart if count is not None else 0,
                "cut_by_last_restart": count.cut_by_last_restart if count is not None else 0}

    def close(self) -> None:
        """Stop accepting and close the socket (the open-connection count stays at what this
        close leaves to be cut)."""
        if self._count is not None:
            self._count.freeze()
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        self._stop()
        sock, self.sock = self.sock, None
        if sock is not None:
            sock.close()
