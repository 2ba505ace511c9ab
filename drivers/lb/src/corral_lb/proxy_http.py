"""Userspace HTTP/1.1 reverse proxy: keep-alive both ways, Host routing, per-request balancing.

The parser reads only what routing and framing need (request line, Host, Content-Length,
Transfer-Encoding, Connection) and forwards heads and bodies byte for byte, so the common
request costs one ``find`` and a few slices. Upstream connections are kept alive and reused:
a client connection keeps its upstream between requests while the policy keeps choosing the
same backend, and otherwise hands it back to a per-backend idle pool.

Not done on purpose (documented in docs/drivers/lb.md): header rewriting (no
X-Forwarded-For), HTTP/2, request pipelining to backends (pipelined client requests are
served one after the other).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from functools import partial

import structlog

from corral_lb.backend import Backend, BackendState
from corral_lb.service import Service

log = structlog.get_logger("corral_lb")

MAX_HEAD = 64 * 1024
MAX_BUFFERED = 1024 * 1024  # client bytes buffered while a request is in flight
IDLE_PER_BACKEND = 512
_now = time.monotonic


def _reply(status: int, reason: str) -> bytes:
    body = f"{status} {reason}\n".encode()
    return (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body


R400 = _reply(400, "Bad Request")
R404 = _reply(404, "Not Found")
R431 = _reply(431, "Request Header Fields Too Large")
R502 = _reply(502, "Bad Gateway")
R503 = _reply(503, "Service Unavailable")


def header_value(lower_head: bytes, name: bytes) -> bytes | None:
    """Value of header ``name`` (b"\\r\\nname:") in a lower-cased head, stripped; None if absent."""
    i = lower_head.find(name)
    if i < 0:
        return None
    start = i + len(name)
    end = lower_head.find(b"\r\n", start)
    return lower_head[start : end if end >= 0 else len(lower_head)].strip()


class ChunkScanner:
    """Finds the end of a chunked body without decoding it (bytes are forwarded as they are)."""

    __slots__ = ("done", "line", "remaining", "state")

    SIZE, DATA, TRAILER = 0, 1, 2

    def __init__(self) -> None:
        self.state = self.SIZE
        self.remaining = 0
        self.line = b""
        self.done = False

    def feed(self, data: bytes | bytearray, pos: int = 0) -> int:
        """Consume ``data[pos:]`` up to the end of the body; return the index after it.

        Raises ValueError on a malformed chunk size line.
        """
        n = len(data)
        while pos < n and not self.done:
            if self.state == self.DATA:
                take = min(self.remaining, n - pos)
                pos += take
                self.remaining -= take
                if self.remaining == 0:
                    self.state = self.SIZE
                continue
            i = data.find(b"\n", pos)
            if i < 0:
                self.line += bytes(data[pos:])
                if len(self.line) > 4096:
                    raise ValueError("chunk line too long")
                return n
            line = self.line + bytes(data[pos:i])
            self.line = b""
            pos = i + 1
            if self.state == self.SIZE:
                size = int(line.split(b";", 1)[0].strip(), 16)
                if size < 0:
                    raise ValueError("negative chunk size")
                if size == 0:
                    self.state = self.TRAILER
                else:
                    self.remaining = size + 2  # data plus its CRLF
                    self.state = self.DATA
            elif line in (b"", b"\r"):  # TRAILER: an empty line ends the message
                self.done = True
        return pos


# upstream response states
_IDLE, _HEAD, _LEN, _CHUNKED, _CLOSE, _TUNNEL = range(6)


class HttpUpstream(asyncio.Protocol):
    """One keep-alive connection to a backend; carries one request at a time."""

    __slots__ = (
        "backend", "chunks", "client", "closed", "head_request", "keepalive", "last_5xx",
        "last_head", "last_keepalive", "last_length", "pool", "rbuf", "remaining", "sent_any",
        "state", "transport", "used",
    )

    def __init__(self, backend: Backend, pool: UpstreamPool) -> None:
        self.backend = backend
        self.pool = pool
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.client: HttpConnection | None = None
        self.state = _IDLE
        self.rbuf = bytearray()
        self.remaining = 0
        self.chunks: ChunkScanner | None = None
        self.keepalive = True
        self.head_request = False
        self.sent_any = False  # response bytes already forwarded to the client
        self.closed = False
        self.used = False  # carried a request before (a failure on reuse may be retried)
        # the last Content-Length-framed response head and what it said: backends repeat
        # their heads byte for byte, and a repeated head needs no parsing
        self.last_head = b""
        self.last_length = 0
        self.last_keepalive = True
        self.last_5xx = False

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
            self.transport.close()  # unsolicited bytes: the connection is not reusable
            return
        if state == _LEN:
            n = len(data)
            if n < self.remaining:
                self.remaining -= n
                client.transport.write(data)
                return
            client.transport.write(data[: self.remaining] if n > self.remaining else data)
            self._finish()
            return
        if state == _HEAD:
            lh = self.last_head
            if lh and not self.rbuf and not self.head_request and data.startswith(lh):
                length = self.last_length
                have = len(data) - len(lh)
                if self.last_5xx:
                    self.backend.errors_5xx += 1
                self.sent_any = True
                self.keepalive = self.last_keepalive
                if have >= length:
                    client.transport.write(data if have == length else data[: len(lh) + length])
                    self._finish()
                else:
                    self.remaining = length - have
                    self.state = _LEN
                    client.transport.write(data)
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
            assert self.chunks is not None
            try:
                pos = self.chunks.feed(data)
            except ValueError:
                self._fail()
                return
            client.transport.write(data if pos == len(data) else data[:pos])
            if self.chunks.done:
                self._finish()
            return
        client.transport.write(data)  # _CLOSE or _TUNNEL

    def _response_head(self, client: HttpConnection, data: bytes, body_at: int) -> None:
        try:
            status = int(data[9:12])
        except ValueError:
            self._fail()
            return
        b = self.backend
        if 100 <= status < 200 and status != 101:
            # interim response (100 Continue...): forward it and wait for the final one
            client.transport.write(data[:body_at])
            self.sent_any = True
            if len(data) > body_at:
                self.data_received(data[body_at:])
            return
        self.sent_any = True
        if status >= 500:
            b.errors_5xx += 1
        lower = data[:body_at].lower()
        conn = header_value(lower, b"\r\nconnection:")
        if conn is not None and b"close" in conn:
            self.keepalive = False
        elif data.startswith(b"HTTP/1.0") and (conn is None or b"keep-alive" not in conn):
            self.keepalive = False
        if status == 101:
            self.state = _TUNNEL
            self.keepalive = False
            client.upgrade()
            client.transport.write(data)
            return
        if self.head_request or status in (204, 304):
            client.transport.write(data[:body_at])
            self._finish()
            return
        if b"\r\ntransfer-encoding:" in lower and b"chunked" in (
            header_value(lower, b"\r\ntransfer-encoding:") or b""
        ):
            self.chunks = scanner = ChunkScanner()
            try:
                pos = scanner.feed(data, body_at)
            except ValueError:
                self._fail()
                return
            client.transport.write(data if pos == len(data) else data[:pos])
            if scanner.done:
                self._finish()
            else:
                self.state = _CHUNKED
            return
        cl = header_value(lower, b"\r\ncontent-length:")
        if cl is None:
            self.state = _CLOSE  # delimited by the backend closing the connection
            self.keepalive = False
            client.transport.write(data)
            return
        try:
            length = int(cl)
        except ValueError:
            self._fail()
            return
        if not self.head_request and 200 <= status:
            self.last_head = data[:body_at]
            self.last_length = length
            self.last_keepalive = self.keepalive
            self.last_5xx = status >= 500
        have = len(data) - body_at
        if have >= length:
            client.transport.write(data if have == length else data[: body_at + length])
            self._finish()
        else:
            self.remaining = length - have
            self.state = _LEN
            client.transport.write(data)

    def _finish(self) -> None:
        client = self.client
        self.state = _IDLE
        self.chunks = None
        self.used = True
        if client is not None:
            client.response_done(self, self.keepalive)

    def _fail(self) -> None:
        """The backend sent something unparseable: give up on this connection."""
        self.keepalive = False
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
        "backend", "body_remaining", "buf", "chunks", "client_eof", "frontend", "idle_since",
        "keepalive", "last_gen", "last_head", "last_key", "method_head", "paused", "req_head",
        "req_sent_body", "retried", "service", "started", "state", "transport", "upstream",
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
        self.chunks: ChunkScanner | None = None
        self.keepalive = True
        self.method_head = False
        self.req_head = b""
        self.req_sent_body = False
        self.retried = False
        self.started = 0.0
        self.client_eof = False
        self.paused = False
        # the last bodiless request head and its routing: keep-alive clients repeat their
        # heads byte for byte, and a repeated head needs no parsing
        self.last_head = b""
        self.last_gen = -1
        self.last_key: bytes | None = None
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
            if end >= 0 and end + 4 == len(data):
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
        self.req_head = head
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
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD:
                    self._error(R431)
                return
            head = bytes(buf[: end + 4])
            del buf[: end + 4]
            self._request(head)

    def _request(self, head: bytes) -> None:
        lower = head.lower()
        sp = head.find(b" ")
        if sp <= 0:
            self._error(R400)
            return
        self.method_head = head[:sp] == b"HEAD"
        line_end = head.find(b"\r\n")
        http10 = head[line_end - 8 : line_end] == b"HTTP/1.0"
        conn = header_value(lower, b"\r\nconnection:")
        if http10:
            self.keepalive = conn is not None and b"keep-alive" in conn
        else:
            self.keepalive = conn is None or b"close" not in conn
        # body framing; both Transfer-Encoding and Content-Length is a smuggling attempt
        te = header_value(lower, b"\r\ntransfer-encoding:")
        cl = header_value(lower, b"\r\ncontent-length:")
        self.chunks = None
        self.body_remaining = 0
        if te is not None:
            if cl is not None or not te.endswith(b"chunked"):
                self._error(R400)
                return
            self.chunks = ChunkScanner()
        elif cl is not None:
            try:
                self.body_remaining = int(cl)
            except ValueError:
                self._error(R400)
                return
            if self.body_remaining < 0 or lower.count(b"\r\ncontent-length:") > 1:
                self._error(R400)
                return
        host = header_value(lower, b"\r\nhost:") or b""
        service = self.frontend.route(host)
        if service is None:
            self._error(R404)
            return
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
            key = header_value(lower, b"\r\n" + service.hash_header + b":") if (
                service.hash_header) else self._client_ip()
        if self.chunks is None and self.body_remaining == 0 and self.keepalive:
            self.last_head, self.last_gen, self.last_key = head, self.frontend.generation, key
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
        key = self._client_ip()
        if service.policy.needs_key and service.hash_header:
            key = header_value(self.req_head.lower(), b"\r\n" + service.hash_header + b":") or b""
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
            self.state = _C_BODY
            up.transport.write(self.req_head)
            self.req_sent_body = True
            if self.buf:
                data = bytes(self.buf)
                self.buf.clear()
                self._body(data)
        if self.paused and self.state != _C_CONNECTING:
            self.paused = False
            self.transport.resume_reading()

    def _body(self, data: bytes) -> None:
        up = self.upstream
        assert up is not None
        if self.chunks is not None:
            try:
                pos = self.chunks.feed(data)
            except ValueError:
                self._error(R400)
                return
            up.transport.write(data if pos == len(data) else data[:pos])
            if self.chunks.done:
                self.state = _C_WAIT
                if pos < len(data):
                    self.buf += data[pos:]
            return
        n = len(data)
        if n <= self.body_remaining:
            self.body_remaining -= n
            up.transport.write(data)
        else:
            up.transport.write(data[: self.body_remaining])
            self.buf += data[self.body_remaining :]
            self.body_remaining = 0
        if self.body_remaining == 0:
            self.state = _C_WAIT

    # -- upstream events ---------------------------------------------------------------------

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
            # answered before the request body ended, or the client asked to close
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
        safe = up.used and not up.sent_any and not self.req_sent_body and not self.retried
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
    """

    def __init__(self, *, idle_timeout: float = 0.0) -> None:
        self.idle_timeout = idle_timeout
        self._sweeper: asyncio.Task[None] | None = None
        self.routes: dict[bytes, Service] = {}
        self.generation = 0  # bumped on every route change: invalidates cached routing
        self.pool = UpstreamPool()
        self.conns: set[HttpConnection] = set()
        self.server: asyncio.Server | None = None
        self._removers: dict[str, Callable[[Backend], None]] = {}

    def add(self, service: Service) -> None:
        """Serve ``service`` for requests whose Host is its name."""
        self.routes[service.name.lower().encode()] = service
        self.generation += 1
        remover = self.pool.close_backend
        service.on_remove.append(remover)
        self._removers[service.name] = remover

    def remove(self, service: Service) -> None:
        """Stop serving ``service``."""
        self.routes.pop(service.name.lower().encode(), None)
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
        if len(routes) == 1:
            return next(iter(routes.values()))
        if host.startswith(b"["):
            name = host[: host.find(b"]") + 1]
        else:
            name = host.rsplit(b":", 1)[0]
        return routes.get(name)

    async def start(self, host: str, port: int) -> None:
        """Listen on (host, port)."""
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: HttpConnection(self), host, port, reuse_address=True, backlog=4096
        )
        if self.idle_timeout > 0:
            self._sweeper = loop.create_task(self._sweep_idle(), name=f"http idle {port}")

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
        if self.server is not None:
            self.server.close()
        for c in list(self.conns):
            c.transport.close()
        self.pool.close_all()
        if self.server is not None:
            await self.server.wait_closed()
