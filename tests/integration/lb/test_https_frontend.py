"""The HTTPS frontend's client connections for real: loopback TLS, on asyncio's loop and on
uvloop (the driver's).

A connection counts as open from its accept, through its TLS handshake, until it closes
(what ``max_connections`` caps): one whose handshake is refused or times out was never a
connection and is released at once, and closing the frontend closes the connections still
in their handshake.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trustme

from corral.testing import wait_for_async
from corral_lb import proxy_http
from corral_lb.config import load_lb_config
from corral_lb.forwarded import Forwarding
from corral_lb.proxy_http import HttpFrontend
from corral_lb.service import Service
from corral_lb.tls import SniRouter, server_context
from integration.lb.recording_backend import RecordingBackend

NAME = "svc.test"
REQUEST = b"GET /x HTTP/1.1\r\nHost: svc.test\r\nConnection: close\r\n\r\n"
# the backend's answer, saying what the proxy does next: close, as the client asked
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n/x"

Main = Callable[[], Awaitable[None]]




class Frontend:
    """An HTTPS frontend for NAME, proxying to a RecordingBackend."""

    def __init__(self, frontend: HttpFrontend, backend: RecordingBackend, ca: trustme.CA
                 ) -> None:
        self.frontend = frontend
        self.backend = backend
        self.client = ssl.create_default_context()
        ca.configure_trust(self.client)
        assert frontend.listener.sock is not None
        self.port = frontend.listener.sock.getsockname()[1]

    def metrics(self) -> dict[str, Any]:
        return self.frontend.metrics()

    async def tls(self, name: str = NAME
                  ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port, ssl=self.client,
                                             server_hostname=name)

    async def tcp(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A client that connects and never starts its TLS handshake."""
        return await asyncio.open_connection("127.0.0.1", self.port)


@asynccontextmanager
async def https_frontend(ca: trustme.CA, *, max_connections: int = 0,
                         context: Callable[[SniRouter], ssl.SSLContext] | None = None
                         ) -> AsyncIterator[Frontend]:
    """The frontend accepts with ``context(router)`` (default: the router's context)."""
    leaf = ca.issue_cert(NAME, key_type=trustme.KeyType.ECDSA)
    router = SniRouter()
    router.set(NAME, server_context(b"".join(p.bytes() for p in leaf.cert_chain_pems),
                                    leaf.private_key_pem.bytes()))
    accepting = context or (lambda r: r.context)
    backend = RecordingBackend()
    port = await backend.start()
    service = Service(load_lb_config({"mode": "http", "domains": [NAME], "tls": "auto"},
                                     app="svc"), app="svc")
    service.add("rec", "127.0.0.1", port, healthy=True)
    frontend = HttpFrontend(forwarding=Forwarding(), scheme=b"https", strict=True,
                            ssl_context=lambda: accepting(router),
                            max_connections=max_connections)
    frontend.add(service, [NAME])
    await frontend.start("127.0.0.1", 0)
    try:
        yield Frontend(frontend, backend, ca)
    finally:
        await frontend.close()
        await service.close()
        await backend.close()


async def released(e: Frontend) -> None:
    await wait_for_async(lambda: e.metrics()["active"] == 0, timeout=5,
                         what="the frontend released every connection")


def test_a_request_over_tls_is_proxied_and_its_connection_released(
        ca: trustme.CA, run: Callable[[Main], None]) -> None:
    """Handshake, one request with Connection: close, the backend's answer, then the
    frontend closes and counts the connection as gone."""

    async def main() -> None:
        async with https_frontend(ca) as e:
            r, w = await e.tls()
            w.write(REQUEST)
            assert await asyncio.wait_for(r.read(), 5) == ANSWER  # then the close
            w.close()
            await released(e)
            assert e.metrics()["accepted"] == 1
            forwarded = bytes(e.backend.conns[-1].data)
            assert b"X-Forwarded-Proto: https" in forwarded
            assert b"Connection: close" not in forwarded  # the client's, not the backend's

    run(main)


def test_a_refused_handshake_releases_its_connection(
        ca: trustme.CA, run: Callable[[Main], None]) -> None:
    """A name the router does not hold: unrecognized_name, and the slot is free again."""

    async def main() -> None:
        async with https_frontend(ca) as e:
            with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
                await asyncio.wait_for(e.tls("other.test"), 5)
            await released(e)
            assert e.metrics()["accepted"] == 1
            assert e.backend.requests == []

    run(main)


def test_a_client_that_never_shakes_hands_is_closed_by_the_timeout_and_released(
        ca: trustme.CA, run: Callable[[Main], None], monkeypatch: pytest.MonkeyPatch) -> None:
    """TLS_HANDSHAKE_TIMEOUT closes a connection that never sends its ClientHello."""
    monkeypatch.setattr(proxy_http, "TLS_HANDSHAKE_TIMEOUT", 0.3)

    async def main() -> None:
        async with https_frontend(ca) as e:
            r, w = await e.tcp()
            await wait_for_async(lambda: e.metrics()["active"] == 1, timeout=5)
            with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
                await asyncio.wait_for(r.readexactly(1), 3)  # closed by the frontend
            await released(e)
            w.close()

    run(main)


def test_a_connection_in_its_handshake_holds_its_slot_under_the_cap(
        ca: trustme.CA, run: Callable[[Main], None]) -> None:
    """max_connections = 1: while one client sits in its handshake, the next one waits in
    the backlog (its handshake does not even start); it is served once the first goes."""

    async def main() -> None:
        async with https_frontend(ca, max_connections=1) as e:
            _, silent = await e.tcp()
            await wait_for_async(lambda: e.metrics()["active"] == 1, timeout=5)
            second = asyncio.ensure_future(e.tls())
            await asyncio.sleep(0.3)
            assert not second.done() and e.metrics()["accepted"] == 1
            assert e.metrics()["limited"] >= 1
            silent.close()  # the first goes: its slot is the second's
            r, w = await asyncio.wait_for(second, 5)
            w.write(REQUEST)
            assert await asyncio.wait_for(r.read(), 5) == ANSWER
            w.close()
            await released(e)
            assert e.metrics()["accepted"] == 2

    run(main)


def test_closing_the_frontend_closes_the_connections_in_their_handshake(
        ca: trustme.CA, run: Callable[[Main], None]) -> None:
    """A client still in its handshake when the frontend closes is disconnected at once,
    not left to its handshake timeout."""

    async def main() -> None:
        async with https_frontend(ca) as e:
            r, w = await e.tcp()
            await wait_for_async(lambda: e.metrics()["active"] == 1, timeout=5)
            await e.frontend.close()
            with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
                await asyncio.wait_for(r.readexactly(1), 2)
            w.close()

    run(main)


@pytest.mark.parametrize("failing", ["context", "setup"])
def test_a_client_that_cannot_be_taken_over_is_closed_and_not_counted(
        ca: trustme.CA, run: Callable[[Main], None], monkeypatch: pytest.MonkeyPatch,
        failing: str) -> None:
    """No TLS context to accept with, or a setup that fails before it waits on anything
    (here: the connection's protocol cannot be made): the client is closed at once and never
    counts as open; the frontend goes on accepting the next clients."""
    failures = [RuntimeError("refused once")]

    def context(router: SniRouter) -> ssl.SSLContext:
        if failing == "context" and failures:
            raise failures.pop()
        return router.context

    if failing == "setup":
        def connection(frontend: HttpFrontend) -> proxy_http.HttpConnection:
            if failures:
                raise failures.pop()
            return made(frontend)

        made = proxy_http.HttpConnection
        monkeypatch.setattr(proxy_http, "HttpConnection", connection)

    async def main() -> None:
        async with https_frontend(ca, context=context) as e:
            r, w = await e.tcp()
            assert await asyncio.wait_for(r.read(), 5) == b""  # closed, nothing said
            w.close()
            assert (e.metrics()["accepted"], e.metrics()["active"]) == (1, 0)
            assert not failures
            r, w = await e.tls()
            w.write(REQUEST)
            assert await asyncio.wait_for(r.read(), 5) == ANSWER
            w.close()
            await released(e)

    run(main)
