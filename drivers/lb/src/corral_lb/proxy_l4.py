"""Userspace L4 relay: one pair of asyncio Protocols per connection, with backpressure.

Protocols rather than streams: bytes go from ``data_received`` straight to the other side's
``transport.write`` with no coroutine switch, and ``pause_writing`` on one side pauses reading
on the other, so a slow peer never makes the relay buffer without bound.
"""

from __future__ import annotations

import asyncio
import socket
import time

import structlog

from corral_lb.backend import Backend
from corral_lb.service import Service

log = structlog.get_logger("corral_lb")

CONNECT_ATTEMPTS = 3  # distinct backends tried before the client connection is closed


class _Upstream(asyncio.Protocol):
    """The backend side of one relayed connection."""

    __slots__ = ("client", "data_received", "transport")

    def __init__(self, client: L4Connection) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        # The hot path: the client's bound write *is* data_received (no Python frame).
        self.data_received = client.transport.write  # type: ignore[method-assign]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def eof_received(self) -> bool:
        client = self.client
        client.upstream_eof = True
        ct = client.transport
        if client.client_eof or not ct.can_write_eof():
            ct.close()  # both directions are finished
            return False
        ct.write_eof()
        return True  # keep the other direction open (half-close)

    def pause_writing(self) -> None:
        self.client.transport.pause_reading()

    def resume_writing(self) -> None:
        self.client.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.upstream_lost()


class L4Connection(asyncio.Protocol):
    """The client side of one relayed connection."""

    __slots__ = ("backend", "client_eof", "closed", "pending", "service", "started", "transport",
                 "upstream", "upstream_eof")

    def __init__(self, service: Service) -> None:
        self.service = service
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.upstream: _Upstream | None = None
        self.backend: Backend | None = None
        self.pending: list[bytes] | None = []  # client bytes that arrived before the upstream
        self.closed = False
        self.client_eof = self.upstream_eof = False
        self.started = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.started = time.monotonic()
        self.service.connections += 1
        self.service.touch()
        b = None
        if self.service.picker is None and not self.service.policy.needs_key:
            b = self.service.policy.pick(self.service.eligible, None)
        if b is not None:
            self._bind(b)
            asyncio.get_running_loop().create_task(self._connect_first(b))
        else:
            asyncio.get_running_loop().create_task(self._connect_slow())

    def _bind(self, b: Backend) -> None:
        self.backend = b
        b.active += 1
        b.outstanding += 1
        b.requests += 1

    def _unbind(self) -> None:
        b = self.backend
        if b is not None:
            b.active -= 1
            b.outstanding -= 1
            self.backend = None

    async def _connect_first(self, b: Backend) -> None:
        if await self._open(b):
            return
        await self._connect_slow(tried={b.id})

    async def _connect_slow(self, tried: set[str] | None = None) -> None:
        tried = tried or set()
        peer = self.transport.get_extra_info("peername")
        client = f"{peer[0]}:{peer[1]}" if peer else ""
        key = peer[0].encode() if peer else None
        for _ in range(CONNECT_ATTEMPTS):
            if self.closed:
                return
            b = await self.service.acquire(key, client=client)
            if b is None:
                break
            if b.id in tried:
                others = [x for x in self.service.eligible if x.id not in tried]
                if not others:
                    break
                b = self.service.policy.pick(others, key) or others[0]
            tried.add(b.id)
            self._bind(b)
            if await self._open(b):
                return
        log.warning("no backend reachable", service=self.service.name, tried=sorted(tried))
        self.transport.close()

    async def _open(self, b: Backend) -> bool:
        loop = asyncio.get_running_loop()
        try:
            _, up = await loop.create_connection(lambda: _Upstream(self), b.host, b.port)
        except OSError:
            b.connect_failures += 1
            self._unbind()
            return False
        if self.closed:
            if up.transport is not None:
                up.transport.close()
            return True
        self.upstream = up
        pending, self.pending = self.pending, None
        if pending and up.transport is not None:
            up.transport.write(b"".join(pending))
        if self.client_eof and up.transport is not None and up.transport.can_write_eof():
            up.transport.write_eof()
        return True

    def data_received(self, data: bytes) -> None:
        up = self.upstream
        if up is not None and up.transport is not None:
            up.transport.write(data)
        elif self.pending is not None:
            self.pending.append(data)

    def eof_received(self) -> bool:
        self.client_eof = True
        up = self.upstream
        if self.upstream_eof:
            return False  # both directions are finished: close
        if up is not None and up.transport is not None and up.transport.can_write_eof():
            up.transport.write_eof()
            return True
        return self.pending is not None  # not connected yet: keep the request, half-closed

    def pause_writing(self) -> None:
        up = self.upstream
        if up is not None and up.transport is not None:
            up.transport.pause_reading()

    def resume_writing(self) -> None:
        up = self.upstream
        if up is not None and up.transport is not None:
            up.transport.resume_reading()

    def upstream_lost(self) -> None:
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        b = self.backend
        if b is not None:
            b.latency.observe(time.monotonic() - self.started)
        self._unbind()
        self.service.connections -= 1
        self.service.touch()
        up = self.upstream
        if up is not None and up.transport is not None:
            up.transport.close()

    def cut(self) -> None:
        """Close both sides now (a drained backend's timeout ran out)."""
        self.transport.close()


class L4Frontend:
    """A TCP listener relaying every connection to a backend of one service."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.server: asyncio.Server | None = None
        self._conns: set[L4Connection] = set()
        service.on_remove.append(self._backend_removed)

    def _factory(self) -> L4Connection:
        conn = _TrackedL4Connection(self.service, self._conns)
        return conn

    def _backend_removed(self, b: Backend) -> None:
        for c in [c for c in self._conns if c.backend is b]:
            c.cut()

    async def start(self, host: str, port: int, *, sock: socket.socket | None = None) -> None:
        """Listen on (host, port), or on an already bound socket."""
        loop = asyncio.get_running_loop()
        if sock is not None:
            self.server = await loop.create_server(self._factory, sock=sock, backlog=4096)
        else:
            self.server = await loop.create_server(
                self._factory, host, port, reuse_address=True, backlog=4096
            )

    async def close(self) -> None:
        """Stop listening and close every relayed connection."""
        if self.service is not None and self._backend_removed in self.service.on_remove:
            self.service.on_remove.remove(self._backend_removed)
        if self.server is not None:
            self.server.close()
        for c in list(self._conns):
            c.cut()
        if self.server is not None:
            await self.server.wait_closed()


class _TrackedL4Connection(L4Connection):
    __slots__ = ("registry",)

    def __init__(self, service: Service, registry: set[L4Connection]) -> None:
        super().__init__(service)
        self.registry = registry

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.registry.add(self)
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.registry.discard(self)
        super().connection_lost(exc)
