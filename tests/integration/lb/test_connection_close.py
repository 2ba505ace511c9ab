"""A client's Connection: close through the real proxy, over HTTP and HTTPS, for real.

The client is Python's ``http.client``, which believes what a response says of the
connection; the backend is Python's ``http.server``, answering every request with
``Connection: keep-alive`` and ``Keep-Alive`` (its head the same bytes each time, so the
proxy forwards the repeats without parsing them). The client must be told ``close`` when it
asked to close, and the proxy must then close; a keep-alive client is told nothing of the
backend's connection and is served on.
"""

from __future__ import annotations

import asyncio
import http.client
import ssl
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import trustme

from corral.testing import wait_for_async
from corral_lb.config import load_lb_config
from corral_lb.forwarded import Forwarding
from corral_lb.proxy_http import HttpFrontend
from corral_lb.service import Service
from corral_lb.tls import SniRouter, server_context

NAME = "svc.test"
Main = Callable[[], Coroutine[Any, Any, None]]


class KeepAliveHandler(BaseHTTPRequestHandler):
    """200 with the path as the body, saying keep-alive (no Date: the same head each time)."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = self.path.encode()
        self.send_response_only(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "keep-alive")
        self.send_header("Keep-Alive", "timeout=30, max=1000")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def backend() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), KeepAliveHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()




class _Https(http.client.HTTPSConnection):
    """To 127.0.0.1, with NAME as the SNI and the name checked."""

    def connect(self) -> None:
        http.client.HTTPConnection.connect(self)
        self.sock = self._context.wrap_socket(  # type: ignore[attr-defined]
            self.sock, server_hostname=NAME)


@asynccontextmanager
async def proxy(scheme: str, backend: int, ca: trustme.CA
                ) -> AsyncIterator[tuple[HttpFrontend, Callable[[], http.client.HTTPConnection]]]:
    """The frontend (HTTPS: TLS terminated with a certificate for NAME) in front of the
    backend, and a factory of clients connected to it."""
    tls: ssl.SSLContext | None = None
    client_ctx = ssl.create_default_context()
    if scheme == "https":
        leaf = ca.issue_cert(NAME, key_type=trustme.KeyType.ECDSA)
        router = SniRouter()
        router.set(NAME, server_context(b"".join(p.bytes() for p in leaf.cert_chain_pems),
                                        leaf.private_key_pem.bytes()))
        tls = router.context
        ca.configure_trust(client_ctx)
    service = Service(load_lb_config({"mode": "http", "domains": [NAME]}, app="svc"),
                      app="svc")
    service.add("py", "127.0.0.1", backend, healthy=True)
    frontend = HttpFrontend(forwarding=Forwarding(), scheme=scheme.encode(), strict=True,
                            ssl_context=(lambda: tls) if tls is not None else None)
    frontend.add(service, [NAME])
    await frontend.start("127.0.0.1", 0)
    assert frontend.listener.sock is not None
    port = frontend.listener.sock.getsockname()[1]

    def client() -> http.client.HTTPConnection:
        if scheme == "https":
            return _Https("127.0.0.1", port, timeout=5, context=client_ctx)
        return http.client.HTTPConnection("127.0.0.1", port, timeout=5)

    try:
        yield frontend, client
    finally:
        await frontend.close()
        await service.close()


def get(conn: http.client.HTTPConnection, path: str, close: bool
        ) -> tuple[bytes, str | None, str | None, bool]:
    """(body, Connection, Keep-Alive, whether http.client will close) of one GET."""
    headers = {"Host": NAME, **({"Connection": "close"} if close else {})}
    conn.request("GET", path, headers=headers)
    resp = conn.getresponse()
    body = resp.read()
    return body, resp.getheader("Connection"), resp.getheader("Keep-Alive"), resp.will_close


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_a_client_asking_to_close_is_told_close_and_closed(
        scheme: str, backend: int, ca: trustme.CA, run: Callable[[Main], None]) -> None:
    """A keep-alive request, then Connection: close on the same connection, then new clients
    with Connection: close on their first request (the pooled upstream, the repeated head):
    each closing answer says close and carries no Keep-Alive, and the proxy closes."""

    async def main() -> None:
        async with proxy(scheme, backend, ca) as (frontend, client):
            conn = client()
            assert (await asyncio.to_thread(get, conn, "/a", False))[0] == b"/a"
            assert await asyncio.to_thread(get, conn, "/a", True) == (
                b"/a", "close", None, True)
            await wait_for_async(lambda: not frontend.conns, timeout=5,
                                 what="the proxy closed the client that asked it")
            conn.close()
            for path in ("/a", "/a", "/c"):
                fresh = client()
                assert await asyncio.to_thread(get, fresh, path, True) == (
                    path.encode(), "close", None, True)
                await wait_for_async(lambda: not frontend.conns, timeout=5,
                                     what="the proxy closed the client that asked it")
                fresh.close()

    run(main)


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_a_keep_alive_client_is_told_nothing_of_the_backends_connection(
        scheme: str, backend: int, ca: trustme.CA, run: Callable[[Main], None]) -> None:
    """The backend's Connection and Keep-Alive (its timeout is not the proxy's) are not
    forwarded; HTTP/1.1 persists without saying so, and the connection serves on."""

    async def main() -> None:
        async with proxy(scheme, backend, ca) as (frontend, client):
            conn = client()
            for path in ("/a", "/a", "/b"):
                assert await asyncio.to_thread(get, conn, path, False) == (
                    path.encode(), None, None, False)
            assert len(frontend.conns) == 1
            conn.close()

    run(main)
