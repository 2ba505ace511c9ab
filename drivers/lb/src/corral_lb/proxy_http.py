"""Userspace HTTP/1.1 reverse proxy: strict framing, keep-alive both ways, Host routing.

Every request head and every response head is parsed by llhttp in its strict mode and checked
further (corral_lb.http_framing); a message whose framing two parsers could read differently
is answered 400 (501, 413, 414, 431, 505) or, from a backend, 502, and its connection closed:
nothing of a refused request reaches a backend, and a backend connection that carried an
ambiguous message is never reused. Heads and bodies are forwarded byte for byte: a
Content-Length body is counted, a chunked one walked with llhttp agreeing on its end, and a
head repeated byte for byte on a connection (keep-alive clients and backends do) is not
parsed again. Upstream connections are kept alive and reused: a client connection keeps its
upstream between requests while the policy keeps choosing the same backend, and otherwise
hands it back to a per-backend idle pool.

The frontend accepts connections itself and stops accepting at ``max_connections`` (as
HAProxy's ``maxconn`` does): further clients wait in the listen backlog until one closes.

What a backend learns of the client is written into each forwarded head by
``corral_lb.forwarded`` (X-Forwarded-* or Forwarded; a client's own claims dropped unless it is
a trusted proxy). Connection management is each side's own: a request's Connection,
Keep-Alive and Proxy-Connection lines are not forwarded (HTTP/1.1, not an upgrade), nor are
a response's, whose place takes the one line that says what the proxy does with the
client's connection (``HttpConnection.response_connection``: close, then the close, or
HTTP/1.0 keep-alive). On HTTPS (the shared frontend, TLS terminated here) responses may get
a Strict-Transport-Security line. Nothing else of a head is rewritten.

Not done on purpose (documented in docs/drivers/lb.md): HTTP/2, request pipelining to backends
(pipelined client requests are served one after the other).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import Callable, Coroutine
from functools import partial
from typing import Any

import structlog

from corral_lb.backend import Backend, BackendState
from corral_lb.forwarded import Forwarding
from corral_lb.http_framing import (
    CLOSE_LINE,
    HOP_BY_HOP,
    KEEP_ALIVE_LINE,
    MAX_HEAD,
    MAX_REQUEST_LINE,
    R400,
    R404,
    R414,
    R431,
    R502,
    R503,
    ChunkedBody,
    FramingError,
    read_request_head,
    read_response_head,
    with_connection,
    without_hop_by_hop,
)
from corral_lb.listener import Listener
from corral_lb.service import Service
from corral_lb.sockets import listening_socket

log = structlog.get_logger("corral_lb")

MAX_BUFFERED = 1024 * 1024  # client bytes buffered while a request is in flight
TLS_HANDSHAKE_TIMEOUT = 10.0  # s a client has to finish its TLS handshake
IDLE_PER_BACKEND = 512
_now = time.monotonic


# upstream response states
_IDLE, _HEAD, _LEN, _CHUNKED, _CLOSE, _TUNNEL = range(6)


class HttpUpstream(asyncio.Protocol):
    """One keep-alive connection to a backend; carries one request at a time."""

    __slots__ = (
        "backend", "broken", "chunks", "client", "closed", "head_request", "keepalive",
        "last_5xx", "last_head", "last_hop_by_hop", "last_keepalive", "last_length", "last_line",
        "last_out", "pool", "rbuf", "remaining", "sent_any", "state", "transport", "used",
    )

    def __init__(self, backend: Backend, pool: UpstreamPool) -> None:
        self.backend = backend
        self.pool = pool
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.client: HttpConnection | None = None
        self.state = _IDLE
        self.rbuf = bytearray()
        self.remaining = 0
        self.chunks: ChunkedBody | None = None
        self.keepalive = True
        self.head_request = False
        self.sent_any = False  # response bytes already forwarded to the client
        self.closed = False
        self.broken = False  # the backend broke the framing: never retried, never reused
        self.used = False  # carried a request before (a failure on reuse may be retried)
        # the last Content-Length-framed response head and what it said: backends repeat
        # their heads byte for byte, and a repeated head (already checked) needs no parsing;
        # and what was forwarded for it, for the client connection line it was written with
        self.last_head = b""
        self.last_length = 0
        self.last_keepalive = True
        self.last_5xx = False
        self.last_hop_by_hop = False
        self.last_line = b""
        self.last_out = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.pool.opened(self)

    def begin(self, client: HttpConnection, head_request: bool) -> None:
        """Expect the response to a request that ``client`` is about to send."""
        self.client = client
        self.state = _HEAD
        self.head_request = head_request
        self.sent_any = False
        self.keepalive = True

    def data_received(self, data: bytes) -> None:
        client = self.client
        state = self.state
        if client is None or state == _IDLE:
            self._fail()  # unsolicited bytes: the connection is out of step, not reusable
            return
        if state == _LEN:
            n = len(data)
            if n < self.remaining:
                self.remaining -= n
                client.transport.write(data)
                return
            if n > self.remaining:  # bytes after the response: out of step, not reusable
                self.keepalive = False
                data = data[: self.remaining]
            client.transport.write(data)
            self._finish()
            return
        if state == _HEAD:
            hsts = client.hsts
            if hsts:  # HTTPS with hsts: the header goes into every response head
                if self.rbuf:
                    self.rbuf += data
                    data = bytes(self.rbuf)
                    self.rbuf.clear()
                end = data.find(b"\r\n\r\n")
                if end < 0:
                    self.rbuf += data
                    if len(self.rbuf) > MAX_HEAD:
                        self._fail()
                    return
                data = data[:end] + hsts + data[end:]
            lh = self.last_head
            if lh and not self.rbuf and not self.head_request and data.startswith(lh):
                line = client.response_connection(False)
                if line != self.last_line:  # the last client kept alive, this one closes...
                    self.last_line = line
                    self.last_out = (with_connection(lh, line) if line or self.last_hop_by_hop
                                     else lh)
                out = self.last_out
                n = len(lh)
                length = self.last_length
                have = len(data) - n
                if self.last_5xx:
                    self.backend.errors_5xx += 1
                self.sent_any = True
                self.keepalive = self.last_keepalive
                if have >= length:
                    if have > length:
                        self.keepalive = False
                        data = data[: n + length]
                    client.transport.write(data if out is lh else out + data[n:])
                    self._finish()
                else:
                    self.remaining = length - have
                    self.state = _LEN
                    client.transport.write(data if out is lh else out + data[n:])
                return
            if self.rbuf:
                self.rbuf += data
                data = bytes(self.rbuf)
            end = data.find(b"\r\n\r\n")
            if end < 0:
                if not self.rbuf:
                    self.rbuf += data
                if len(self.rbuf) > MAX_HEAD:
                    self._fail()
                return
            self.rbuf.clear()
            self._response_head(client, data, end + 4)
            return
        if state == _CHUNKED:
            self._chunked(client, data, 0)
            return
        client.transport.write(data)  # _CLOSE or _TUNNEL

    def _response_head(self, client: HttpConnection, data: bytes, body_at: int) -> None:
        """Check and forward a response head (``data[:body_at]``, the body's first bytes
        after it). Its connection-management lines are the proxy's (``with_connection``), as
        ``client.response_connection`` says, except on interim (1xx) and 101 responses, which
        go as they came (a 101 needs its ``Connection: upgrade``)."""
        try:
            head = read_response_head(data[:body_at])
        except FramingError as e:
            log.warning("backend response refused", backend=self.backend.id, reason=e.reason)
            self._fail()
            return
        status = head.status
        if 100 <= status < 200 and status != 101:
            # interim response (100 Continue...): forward it and wait for the final one
            client.transport.write(data[:body_at])
            self.sent_any = True
            if len(data) > body_at:
                self.data_received(data[body_at:])
            return
        self.sent_any = True
        if status >= 500:
            self.backend.errors_5xx += 1
        self.keepalive = head.keepalive
        if status == 101:
            self.state = _TUNNEL
            self.keepalive = False
            client.upgrade()
            client.transport.write(data)
            return
        bodiless = self.head_request or status in (204, 304)
        length = head.length
        # a body delimited by the backend closing the connection ends the client's too
        line = client.response_connection(length is None and head.body is None and not bodiless)
        raw = data[:body_at]
        out = with_connection(raw, line) if line or head.hop_by_hop else raw
        if bodiless:
            if len(data) > body_at:  # a body where none can be: out of step
                self.keepalive = False
            client.transport.write(out)
            self._finish()
            return
        if head.body is not None:
            self.chunks = head.body
            self._chunked(client, data, body_at, out)
            return
        if length is None:
            self.state = _CLOSE
            self.keepalive = False
            client.transport.write(out + data[body_at:])
            return
        if 200 <= status:
            self.last_head = raw
            self.last_length = length
            self.last_keepalive = self.keepalive
            self.last_5xx = status >= 500
            self.last_hop_by_hop = head.hop_by_hop
            self.last_line = line
            self.last_out = out
        have = len(data) - body_at
        if have > length:
            self.keepalive = False
            data = data[: body_at + length]
        if have >= length:
            client.transport.write(out + data[body_at:] if out is not raw else data)
            self._finish()
        else:
            self.remaining = length - have
            self.state = _LEN
            client.transport.write(out + data[body_at:] if out is not raw else data)

    def _chunked(self, client: HttpConnection, data: bytes, pos: int, head: bytes = b"") -> None:
        """Forward chunked body bytes from ``data[pos:]`` up to the body's end, after ``head``
        (the response head as forwarded, when ``data[:pos]`` is the head as received)."""
        chunks = self.chunks
        assert chunks is not None
        try:
            end = chunks.feed(data, pos)
        except FramingError as e:
            log.warning("backend response refused", backend=self.backend.id, reason=e.reason)
            if pos:  # called with the head, which is not forwarded yet: the client gets 502
                self.sent_any = False
            self._fail()
            return
        if end < len(data):
            self.keepalive = False
        client.transport.write(head + data[pos:end])
        if chunks.done:
            self._finish()
        else:
            self.state = _CHUNKED

    def _finish(self) -> None:
        client = self.client
        self.state = _IDLE
        self.chunks = None
        self.used = True
        if client is not None:
            client.response_done(self, self.keepalive)

    def _fail(self) -> None:
        """The backend broke the framing: give up on this connection (502 if nothing of the
        response was forwarded yet, else the client connection is cut)."""
        self.keepalive = False
        self.broken = True
        self.transport.close()

    def eof_received(self) -> bool:
        if self.state == _CLOSE:
            self.keepalive = False
            self._finish()
        elif self.state == _TUNNEL and self.client is not None:
            if self.client.transport.can_write_eof():
                self.client.transport.write_eof()
            return True
        return False

    def pause_writing(self) -> None:
        if self.client is not None:
            self.client.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.client is not None:
            self.client.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.lost(self)
        client = self.client
        if client is None:
            return
        if self.state == _IDLE:
            client.upstream_gone(self)
        elif self.state == _TUNNEL:
            client.transport.close()
        else:
            client.upstream_failed(self)

    def close(self) -> None:
        """Close the connection (idle, or cut during a drain that timed out)."""
        if not self.closed:
            self.transport.close()


class UpstreamPool:
    """Idle keep-alive connections per backend, and every open one (to close them on removal)."""

    def __init__(self) -> None:
        self.idle: dict[Backend, list[HttpUpstream]] = {}
        self.open: dict[Backend, set[HttpUpstream]] = {}

    def take(self, b: Backend) -> HttpUpstream | None:
        """An idle, still open connection to ``b``, or None."""
        idle = self.idle.get(b)
        while idle:
            up = idle.pop()
            if not up.closed:
                return up
        return None

    def give_back(self, up: HttpUpstream) -> None:
        """Keep ``up`` for reuse, unless its backend is leaving or the pool is full."""
        up.client = None
        b = up.backend
        if up.closed:
            return
        idle = self.idle.setdefault(b, [])
        if b.state is BackendState.DRAINING or len(idle) >= IDLE_PER_BACKEND:
            up.close()
            return
        idle.append(up)

    def opened(self, up: HttpUpstream) -> None:
        """Track a newly connected upstream."""
        self.open.setdefault(up.backend, set()).add(up)

    def lost(self, up: HttpUpstream) -> None:
        """Forget a closed upstream."""
        s = self.open.get(up.backend)
        if s is not None:
            s.discard(up)
            if not s:
                del self.open[up.backend]
        idle = self.idle.get(up.backend)
        if idle is not None and up in idle:
            idle.remove(up)

    def close_backend(self, b: Backend) -> None:
        """Close every connection to ``b`` (it was removed)."""
        for up in list(self.open.get(b, ())):
            up.close()
        self.idle.pop(b, None)

    def close_all(self) -> None:
        """Close every upstream connection."""
        for b in list(self.open):
            self.close_backend(b)


# client connection states
_C_HEAD, _C_BODY, _C_WAIT, _C_CONNECTING, _C_TUNNEL, _C_CLOSED = range(6)


class HttpConnection(asyncio.Protocol):
    """One client connection: parses requests, routes by Host, relays to a chosen backend."""

    __slots__ = (
        "backend", "body_remaining", "buf", "chunks", "client_eof", "frontend", "hsts",
        "idle_since", "keep_line", "keepalive", "last_gen", "last_head", "last_key", "last_out",
        "method_head", "paused", "persistent", "req_head", "req_key", "req_sent_body",
        "retried", "service", "started", "state", "transport", "upstream",
    )

    def __init__(self, frontend: HttpFrontend) -> None:
        self.frontend = frontend
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.buf = bytearray()
        self.state = _C_HEAD
        self.service: Service | None = None
        self.upstream: HttpUpstream | None = None
        self.backend: Backend | None = None
        self.body_remaining = 0
        self.chunks: ChunkedBody | None = None
        self.keepalive = True  # the connection goes on after the response in flight
        # what a response says when the connection goes on: nothing (HTTP/1.1), or
        # KEEP_ALIVE_LINE (an HTTP/1.0 client's keep-alive request)
        self.keep_line = b""
        # whether the request head as forwarded lets its upstream connection persist (its own
        # connection-management lines dropped, or an HTTP/1.0 keep-alive): only then may the
        # upstream serve another client once this one closes
        self.persistent = True
        self.method_head = False
        self.req_head = b""
        self.req_key = b""  # the hash-header policy's key of the request in flight
        self.req_sent_body = False
        self.retried = False
        self.started = 0.0
        self.client_eof = False
        self.paused = False
        # the last bodiless request head and its routing: keep-alive clients repeat their
        # heads byte for byte, and a repeated head needs no parsing
        self.last_head = b""
        self.last_out = b""  # what was forwarded for it (with the forwarding headers)
        self.last_gen = -1
        self.last_key: bytes | None = None
        self.hsts = b""  # the Strict-Transport-Security line responses get (HTTPS, hsts set)
        self.idle_since = _now()  # waiting for a request head since (connect, last response)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.frontend.conns.add(self)

    # -- client bytes ------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        state = self.state
        if state == _C_HEAD and not self.buf:
            if data == self.last_head and self.last_gen == self.frontend.generation:
                self._repeat(data)
                return
            # fast path: one whole request head in one segment, nothing buffered
            end = data.find(b"\r\n\r\n")
            if end > 0 and end + 4 == len(data) and not data.startswith(b"\r\n"):
                self._request(data)
                return
            self.buf += data
            self._process()
            return
        if state == _C_BODY:
            self._body(data)
            return
        if state == _C_TUNNEL:
            up = self.upstream
            if up is not None:
                up.transport.write(data)
            return
        self.buf += data
        if state == _C_HEAD:
            self._process()
        elif len(self.buf) > MAX_BUFFERED and not self.paused:
            self.paused = True
            self.transport.pause_reading()

    def _repeat(self, head: bytes) -> None:
        """Serve a request whose head repeats the previous bodiless one (already routed)."""
        service = self.service
        assert service is not None
        self.started = _now()
        head = self.req_head = self.last_out
        self.retried = False
        self.req_sent_body = False
        self.chunks = None
        self.body_remaining = 0
        b = service.policy.pick(service.eligible, self.last_key) if service.picker is None \
            else None
        if b is None:
            self._go_async(self._acquire_then_send(service, b""))
            return
        up = self.upstream
        if up is None or up.backend is not b or up.closed:
            self._send_to(b)
            return
        self.backend = b
        b.outstanding += 1
        b.active += 1
        b.requests += 1
        up.client = self
        up.state = _HEAD
        up.head_request = self.method_head
        up.sent_any = False
        up.keepalive = True
        self.state = _C_WAIT
        up.transport.write(head)

    def _process(self) -> None:
        """Parse and start as many buffered requests as the state allows (one in flight)."""
        while self.state == _C_HEAD and self.buf:
            buf = self.buf
            if buf.startswith(b"\r\n"):  # empty lines before a request line are ignored
                n = 0
                while buf.startswith(b"\r\n", n):
                    n += 2
                del buf[:n]
                continue
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                line_end = buf.find(b"\n")
                if line_end > MAX_REQUEST_LINE or (line_end < 0 and len(buf) > MAX_REQUEST_LINE):
                    self._error(R414)
                elif len(buf) > MAX_HEAD:
                    self._error(R431)
                elif b"\n\n" in buf or b"\n\r\n" in buf:
                    # a head ended by a bare LF: refused now rather than at the idle timeout
                    self._error(R400)
                return
            head = bytes(buf[: end + 4])
            del buf[: end + 4]
            self._request(head)

    def _request(self, head: bytes) -> None:
        original = head
        try:
            req = read_request_head(head, self.frontend.max_body_size)
        except FramingError as e:
            self._error(e.response)
            return
        self.method_head = req.is_head
        self.keepalive = req.keepalive and not req.upgrade
        self.keep_line = KEEP_ALIVE_LINE if req.http10 else b""
        self.persistent = (req.keepalive or req.hop_by_hop) and not req.upgrade
        self.chunks = req.body
        self.body_remaining = req.length
        host = req.host
        frontend = self.frontend
        service = frontend.route(host)
        if frontend.intercept is not None:
            answer = frontend.intercept(head, host, service)
            if answer is not None:  # an ACME challenge, a redirect to HTTPS
                self.last_head = b""
                self._answer(answer)
                return
        if service is None:
            self._error(R404)
            return
        self.hsts = frontend.hsts_line(service)
        forwarding = frontend.forwarding
        if forwarding is not None:
            peer = self.transport.get_extra_info("peername")
            head = forwarding.rewrite(head, client=peer[0] if peer else "",
                                      proto=frontend.scheme, host=host,
                                      drop=HOP_BY_HOP if req.hop_by_hop else ())
        elif req.hop_by_hop:
            head = without_hop_by_hop(head)
        if service is not self.service:
            if self.service is not None:
                self.service.connections -= 1
            self.service = service
            service.connections += 1
            service.touch()
        self.req_head = head
        self.retried = False
        self.req_sent_body = False
        self.started = _now()
        b: Backend | None = None
        key: bytes | None = None
        if service.policy.needs_key:
            key = (req.header(service.hash_header) if service.hash_header
                   else self._client_ip())
        self.req_key = key or b""
        if self.chunks is None and self.body_remaining == 0 and self.keepalive:
            self.last_head, self.last_gen, self.last_key = original, self.frontend.generation, key
            self.last_out = head
        else:
            self.last_head = b""
        if service.picker is None:
            b = service.policy.pick(service.eligible, key)
        if b is None:
            self._go_async(self._acquire_then_send(service, host))
            return
        self._send_to(b)

    def _client_ip(self) -> bytes:
        peer = self.transport.get_extra_info("peername")
        return peer[0].encode() if peer else b""

    def _go_async(self, coro: object) -> None:
        self.state = _C_CONNECTING
        if not self.paused:
            self.paused = True
            self.transport.pause_reading()
        asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]

    async def _acquire_then_send(self, service: Service, host: bytes) -> None:
        peer = self.transport.get_extra_info("peername")
        client = f"{peer[0]}:{peer[1]}" if peer else ""
        key = self.req_key if service.policy.needs_key and service.hash_header \
            else self._client_ip()
        b = await service.acquire(key, client=client, host=host.decode("latin-1"))
        if self.state == _C_CLOSED:
            return
        if b is None:
            self._error(R503)
            return
        self._send_to(b)

    def _send_to(self, b: Backend) -> None:
        up = self.upstream
        if up is not None and (up.backend is not b or up.closed):
            self.upstream = None
            self.frontend.pool.give_back(up)
            up = None
        if up is None:
            up = self.frontend.pool.take(b)
        if up is None:
            self._go_async(self._connect_then_send(b))
            return
        self._start(up, b)

    async def _connect_then_send(self, b: Backend, attempts: int = 3) -> None:
        loop = asyncio.get_running_loop()
        pool = self.frontend.pool
        service = self.service
        tried: set[str] = set()
        for _ in range(attempts):
            tried.add(b.id)
            try:
                _, up = await loop.create_connection(
                    partial(HttpUpstream, b, pool), b.host, b.port)
            except OSError:
                b.connect_failures += 1
                nb = None
                if service is not None:
                    others = [x for x in service.eligible if x.id not in tried]
                    nb = service.policy.pick(others, self._client_ip()) if others else None
                if nb is None:
                    break
                b = nb
                continue
            if self.state == _C_CLOSED:
                up.close()
                return
            self._start(up, b)
            return
        b.errors_5xx += 1
        self._error(R502)

    def _start(self, up: HttpUpstream, b: Backend) -> None:
        self.upstream = up
        self.backend = b
        b.outstanding += 1
        b.active += 1
        b.requests += 1
        up.begin(self, self.method_head)
        if self.chunks is None and self.body_remaining == 0:
            self.state = _C_WAIT
            up.transport.write(self.req_head)
        else:
            # the head goes out with the body bytes already here, once they are checked: a
            # body that is malformed in them is refused before anything reaches the backend
            self.state = _C_BODY
            self.req_sent_body = True
            data = bytes(self.buf)
            self.buf.clear()
            self._body(data, self.req_head)
        if self.paused and self.state != _C_CONNECTING:
            self.paused = False
            self.transport.resume_reading()

    def _body(self, data: bytes, head: bytes = b"") -> None:
        """Forward body bytes (after ``head``, the request head if not sent yet)."""
        up = self.upstream
        assert up is not None
        chunks = self.chunks
        if chunks is not None:
            try:
                pos = chunks.feed(data)
            except FramingError as e:
                self._body_refused(up, e)
                return
            up.transport.write(head + data if pos == len(data) else head + data[:pos])
            if chunks.done:
                self.state = _C_WAIT
                if pos < len(data):
                    self.buf += data[pos:]
            return
        n = len(data)
        if n <= self.body_remaining:
            self.body_remaining -= n
            up.transport.write(head + data if head else data)
        else:
            up.transport.write(head + data[: self.body_remaining])
            self.buf += data[self.body_remaining :]
            self.body_remaining = 0
        if self.body_remaining == 0:
            self.state = _C_WAIT

    def _body_refused(self, up: HttpUpstream, e: FramingError) -> None:
        """A chunked body went wrong after its head was forwarded: the backend has part of a
        request, so its connection is closed (never pooled), and so is the client's."""
        self.upstream = None
        up.client = None
        up.keepalive = False
        up.close()
        if up.sent_any:
            self._close()
        else:
            self._error(e.response)

    # -- upstream events ---------------------------------------------------------------------

    def response_connection(self, must_close: bool) -> bytes:
        """The connection line of the response about to go out (``with_connection``), which
        this connection then keeps to: CLOSE_LINE, and closed after the response, when the
        client asked to close (``Connection: close``, HTTP/1.0 without keep-alive, an upgrade
        not taken), half-closed, is answered before its request body ended, or
        ``must_close`` (a body delimited by the close, or one left unread); else its
        ``keep_line``. One verdict per response: a response that said keep-alive is never
        followed by a close the client did not cause, nor one that said close by another
        request."""
        if self.keepalive and not must_close and not self.client_eof and self.state != _C_BODY:
            return self.keep_line
        self.keepalive = False
        return CLOSE_LINE

    def _request_over(self, b: Backend) -> None:
        b.outstanding -= 1
        b.active -= 1
        b.latency.observe(_now() - self.started)
        self.backend = None

    def response_done(self, up: HttpUpstream, upstream_keepalive: bool) -> None:
        """The response was forwarded entirely; go on with the next request or close."""
        b = self.backend
        if b is not None:
            self._request_over(b)
        if not upstream_keepalive:
            self.upstream = None
            up.client = None
            up.close()
        if self.state == _C_BODY or not self.keepalive or self.client_eof:
            # answered before the request body ended (the upstream may hold part of it:
            # closed with the client), or the client asked to close: its upstream, idle and
            # in step, goes back to the pool for the next client
            if (self.state != _C_BODY and upstream_keepalive and self.persistent
                    and self.upstream is up):
                self.upstream = None
                self.frontend.pool.give_back(up)
            self._close()
            return
        if self.state == _C_CLOSED:
            return
        self.state = _C_HEAD
        self.idle_since = _now()
        if self.paused:
            self.paused = False
            self.transport.resume_reading()
        if self.buf:
            self._process()

    def upstream_gone(self, up: HttpUpstream) -> None:
        """An idle upstream held between requests closed: just forget it."""
        if self.upstream is up:
            self.upstream = None

    def upstream_failed(self, up: HttpUpstream) -> None:
        """The upstream closed mid-request: retry once if safe, else 502 or close."""
        if self.upstream is up:
            self.upstream = None
        b = self.backend
        if self.state == _C_CLOSED:
            if b is not None:
                self._request_over(b)
            return
        safe = (up.used and not up.sent_any and not self.req_sent_body and not self.retried
                and not up.broken)
        if b is not None:
            self._request_over(b)
        if safe and self.service is not None:
            # a kept-alive connection closed by the backend just as we reused it: the request
            # never reached the app, so sending it again cannot apply it twice
            self.retried = True
            self._go_async(self._acquire_then_send(self.service, b""))
            return
        if up.sent_any:
            self._close()
        else:
            if b is not None:
                b.errors_5xx += 1
            self._error(R502)

    def upgrade(self) -> None:
        """The backend switched protocols (101): relay raw bytes both ways from now on."""
        b = self.backend
        if b is not None:
            self._request_over(b)
        self.state = _C_TUNNEL
        if self.buf and self.upstream is not None:
            self.upstream.transport.write(bytes(self.buf))
            self.buf.clear()

    # -- teardown ------------------------------------------------------------------------------

    def _answer(self, response: bytes) -> None:
        """Answer the request here (a whole response without connection-management lines,
        given the one ``response_connection`` says); the connection stays open when the
        client and the request allow it (not with a request body, which is not read)."""
        line = self.response_connection(self.chunks is not None or self.body_remaining > 0)
        if line:
            end = response.find(b"\r\n\r\n") + 4
            response = with_connection(response[:end], line) + response[end:]
        self.transport.write(response)
        if not self.keepalive:
            self._close()
            return
        self.idle_since = _now()
        if self.buf:
            self._process()

    def _error(self, response: bytes) -> None:
        self.transport.write(response)
        self._close()

    def _close(self) -> None:
        self.state = _C_CLOSED
        self.transport.close()

    def eof_received(self) -> bool:
        self.client_eof = True
        if self.state == _C_TUNNEL and self.upstream is not None:
            if self.upstream.transport.can_write_eof():
                self.upstream.transport.write_eof()
            return True
        if self.state in (_C_WAIT, _C_CONNECTING, _C_BODY):
            return True  # answer the request in flight, then close
        return False

    def pause_writing(self) -> None:
        up = self.upstream
        if up is not None:
            up.transport.pause_reading()

    def resume_writing(self) -> None:
        up = self.upstream
        if up is not None:
            up.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.frontend.conns.discard(self)
        self.frontend.released()
        prev = self.state
        self.state = _C_CLOSED
        b = self.backend
        if b is not None:
            self._request_over(b)
        up = self.upstream
        self.upstream = None
        if up is not None:
            if prev in (_C_HEAD,) and up.state == _IDLE:
                self.frontend.pool.give_back(up)
            else:
                up.client = None
                up.close()
        if self.service is not None:
            self.service.connections -= 1
            self.service.touch()


class HttpFrontend:
    """An HTTP listener shared by every service registered on its port, routed by Host.

    With ``idle_timeout`` (s), a client connection that has not sent a whole request head
    for that long since it connected or since its previous response is closed: idle
    keep-alive connections and heads sent too slowly alike (checked every min(1 s, 1/4 of it)).
    ``max_body_size`` (bytes, 0: none) bounds a request body (413). With ``max_connections``
    (0: none) client connections open at once, the frontend stops accepting until one closes:
    the next clients wait in the kernel's listen backlog, as with HAProxy's ``maxconn``.
    """

    def __init__(self, *, idle_timeout: float = 0.0, max_body_size: int = 0,
                 max_connections: int = 0, forwarding: Forwarding | None = None,
                 scheme: bytes = b"http", strict: bool = False,
                 ssl_context: Callable[[], ssl.SSLContext] | None = None,
                 intercept: Callable[[bytes, bytes, Service | None], bytes | None] | None = None,
                 ) -> None:
        self.idle_timeout = idle_timeout
        self.max_body_size = max_body_size
        # what backends are told of the client (X-Forwarded-*, Forwarded), None: nothing
        self.forwarding = forwarding
        self.scheme = scheme  # b"http" or b"https", for X-Forwarded-Proto
        self.strict = strict  # shared frontends: an unknown Host is 404, never "the only one"
        # TLS is terminated here (the shared HTTPS frontend): the context to accept with,
        # asked per connection (the SNI router replaces it to rotate session-ticket keys)
        self.ssl_context = ssl_context
        # a request answered here before routing (head, host, service or None) -> response
        self.intercept = intercept
        self._sweeper: asyncio.Task[None] | None = None
        self.routes: dict[bytes, Service] = {}
        self.generation = 0  # bumped on every route change: invalidates cached routing
        self.pool = UpstreamPool()
        self.conns: set[HttpConnection] = set()
        self.listener = Listener(self._on_client, max_connections=max_connections)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._new_connection = partial(HttpConnection, self)
        # accepted connections being set up (TLS handshake), with their sockets; see _step
        self._setups: dict[Coroutine[Any, Any, Any], socket.socket] = {}
        self._removers: dict[str, Callable[[Backend], None]] = {}

    def hsts_line(self, service: Service) -> bytes:
        """The Strict-Transport-Security line the service's responses get here, or b""."""
        max_age = service.config.hsts
        if self.scheme != b"https" or max_age <= 0:
            return b""
        return b"\r\nStrict-Transport-Security: max-age=%d" % int(max_age)

    def add(self, service: Service, names: list[str] | None = None) -> None:
        """Serve ``service`` for requests whose Host is its name (or one of ``names``)."""
        for name in names if names is not None else [service.name]:
            self.routes[name.lower().encode()] = service
        self.generation += 1
        remover = self.pool.close_backend
        service.on_remove.append(remover)
        self._removers[service.name] = remover

    def remove(self, service: Service) -> None:
        """Stop serving ``service`` (under every name it had here)."""
        for name in [n for n, s in self.routes.items() if s is service]:
            del self.routes[name]
        self.generation += 1
        remover = self._removers.pop(service.name, None)
        if remover is not None and remover in service.on_remove:
            service.on_remove.remove(remover)

    def route(self, host: bytes) -> Service | None:
        """The service for a Host header value (port ignored); the only one if just one."""
        routes = self.routes
        s = routes.get(host)
        if s is not None:
            return s
        if len(routes) == 1 and not self.strict:
            return next(iter(routes.values()))
        if host.startswith(b"["):
            name = host[: host.find(b"]") + 1]
        else:
            name = host.rsplit(b":", 1)[0]
        return routes.get(name)

    @property
    def listen(self) -> str:
        """The address this frontend listens on ('host:port')."""
        return self.listener.listen

    async def start(self, host: str, port: int, *, sock: socket.socket | None = None) -> None:
        """Listen on (host, port), or on ``sock``: listening already (one the kernel kept)."""
        loop = self._loop = asyncio.get_running_loop()
        self.listener.start(sock if sock is not None else listening_socket(host, port))
        if self.idle_timeout > 0:
            self._sweeper = loop.create_task(self._sweep_idle(), name=f"http idle {port}")

    def _on_client(self, client: socket.socket, _peer: Any) -> bool:
        assert self._loop is not None
        try:
            tls = self.ssl_context() if self.ssl_context is not None else None
        except Exception as e:  # no context to accept with: refused, never a connection
            log.warning("cannot accept a TLS client", listen=self.listen, error=str(e))
            client.close()
            return False
        # TCP_NODELAY is the loop's: asyncio and uvloop set it on every TCP transport
        setup = self._loop.connect_accepted_socket(
            self._new_connection, client, ssl=tls,
            ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT if tls is not None else None)
        self._setups[setup] = client
        return self._step(setup)  # open (being set up) until released()

    def _step(self, setup: Coroutine[Any, Any, Any]) -> bool:
        """Run ``setup`` (``connect_accepted_socket`` of one client) to its next wait; return
        whether its connection lives on (being set up, or set up: its HttpConnection's).

        It waits only on futures (the TLS handshake, the transport), so it is stepped here,
        from the accept and then from the done-callback of the future it waits on, rather
        than run as a Task: a Task with its scheduled steps and its registration costs
        several microseconds more per connection, about 2 % of a new TLS connection. A setup
        that fails (a TLS handshake refused or timed out, a client reset before we got to
        it) closes its socket: it was never a connection.
        """
        client = self._setups[setup]
        try:
            waiting = setup.send(None)
        except StopIteration:
            del self._setups[setup]
            return True
        except (Exception, asyncio.CancelledError):
            del self._setups[setup]
            client.close()
            return False
        if waiting is None:  # a bare yield (asyncio.sleep(0)): step on at the next turn
            assert self._loop is not None
            self._loop.call_soon(self._stepped, setup, None)
        else:
            waiting.add_done_callback(partial(self._stepped, setup))
        return True

    def _stepped(self, setup: Coroutine[Any, Any, Any], _done: object) -> None:
        """What ``setup`` waited on is done: step it on; a setup that fails now releases the
        connection, which counted as open since its accept."""
        if setup in self._setups and not self._step(setup):  # not closed with the frontend
            self.released()

    def released(self) -> None:
        """A client connection closed: accept again if the cap had stopped accepting."""
        self.listener.released()

    def metrics(self) -> dict[str, Any]:
        """Client connections: accepted so far, open now, the cap, times the cap was hit."""
        return self.listener.metrics()

    async def _sweep_idle(self) -> None:
        timeout = self.idle_timeout
        every = min(1.0, max(0.01, timeout / 4))
        while True:
            await asyncio.sleep(every)
            now = _now()
            for c in [c for c in self.conns
                      if c.state == _C_HEAD and now - c.idle_since > timeout]:
                c._close()

    async def close(self) -> None:
        """Stop listening and close every connection."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        self.listener.close()
        setups, self._setups = self._setups, {}
        for setup in setups:
            setup.close()  # at its wait: the loop closes the connection's transport
        for c in list(self.conns):
            c.transport.close()
        self.pool.close_all()
