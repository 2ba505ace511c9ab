"""An in-process HTTP/1.1 backend for framing tests: records every byte and every request.

Each connection's bytes are kept as received; requests are framed by llhttp (strict) and each
complete one is answered ``200`` with its target as the body (``/echo``: the request body),
or with a canned raw response for targets in ``responses``. ``Expect: 100-continue`` gets an
interim ``100 Continue``. A request llhttp refuses is recorded in ``errors``: the proxy
forwarded something a strict parser reads differently.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from httptools import HttpParserError, HttpParserUpgrade, HttpRequestParser


@dataclass
class Recorded:
    """One connection from the proxy."""

    data: bytearray = field(default_factory=bytearray)
    requests: list[bytes] = field(default_factory=list)
    closed: bool = False


class _Conn(asyncio.Protocol):
    def __init__(self, backend: RecordingBackend) -> None:
        self.backend = backend
        self.rec = Recorded()
        backend.conns.append(self.rec)
        self.transport: asyncio.Transport | None = None
        self._new_parser()

    def _new_parser(self) -> None:
        self.parser = HttpRequestParser(self)
        self.url = b""
        self.body = bytearray()
        self.headers: list[tuple[bytes, bytes]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.rec.data += data
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade:
            self._close()
        except HttpParserError as e:
            self.backend.errors.append(f"{type(e).__name__}: {e}: {bytes(self.rec.data)!r}")
            self._close()

    # llhttp callbacks
    def on_message_begin(self) -> None:
        self.url = b""
        self.body = bytearray()
        self.headers = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        if (b"expect", b"100-continue") in self.headers and self.transport is not None:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        target = self.url
        self.rec.requests.append(target)
        self.backend.requests.append(target)
        assert self.transport is not None
        canned = self.backend.responses.get(target)
        if canned is not None:
            self.transport.write(canned)
            return
        payload = bytes(self.body) if target == b"/echo" else target
        head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(payload)
        self.transport.write(head if self.parser.get_method() == b"HEAD" else head + payload)

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.rec.closed = True


class RecordingBackend:
    """Listens on 127.0.0.1 (``port`` once started)."""

    def __init__(self, responses: dict[bytes, bytes] | None = None) -> None:
        self.responses = responses or {}
        self.conns: list[Recorded] = []
        self.requests: list[bytes] = []  # targets of complete requests, every connection
        self.errors: list[str] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Conn(self), "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    @property
    def received(self) -> int:
        """Bytes received on every connection (health checks connect without sending)."""
        return sum(len(c.data) for c in self.conns)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
