"""What a forwarded response says of the client connection, and that the proxy does it.

The proxy's own ``HttpConnection`` and ``HttpUpstream`` on in-memory transports: a request
goes in as a client's bytes, the backend's answer as the upstream's, and what the client gets
is checked. A response says ``Connection: close`` exactly when the proxy closes after it, an
HTTP/1.0 keep-alive client is told ``keep-alive``, and a backend's own connection-management
lines never reach a client, on the parsed path and on the path that forwards a head repeating
the upstream's previous one without parsing it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from corral_lb.config import load_lb_config
from corral_lb.proxy_http import HttpConnection, HttpFrontend, HttpUpstream
from corral_lb.service import Service

KEEP = (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n"
        b"Keep-Alive: timeout=5, max=100\r\n\r\nok")
CLOSING = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
GET = b"GET / HTTP/1.1\r\nHost: svc.test\r\n\r\n"
GET_CLOSE = b"GET / HTTP/1.1\r\nHost: svc.test\r\nConnection: close\r\n\r\n"
GET10 = b"GET / HTTP/1.0\r\nHost: svc.test\r\n\r\n"
GET10_KEEP = b"GET / HTTP/1.0\r\nHost: svc.test\r\nConnection: keep-alive\r\n\r\n"


class Transport:
    """An in-memory transport: what was written, and whether it was closed."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        assert not self.closed, "written after the close"
        self.out += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("203.0.113.7", 40000) if name == "peername" else default


class Rig:
    """A frontend for svc.test with one backend and one idle upstream connection to it."""

    def __init__(self, intercept: Callable[[bytes, bytes, Service | None], bytes | None]
                 | None = None) -> None:
        self.frontend = HttpFrontend(intercept=intercept)
        self.service = Service(load_lb_config({"mode": "http", "domains": ["svc.test"]}, app="svc"),
                               app="svc")
        self.frontend.add(self.service, ["svc.test"])
        backend = self.service.add("b", "127.0.0.1", 9, healthy=True)
        self.up = HttpUpstream(backend, self.frontend.pool)
        self.up_transport = Transport()
        self.up.connection_made(self.up_transport)  # type: ignore[arg-type]
        self.frontend.pool.give_back(self.up)

    def client(self) -> tuple[HttpConnection, Transport]:
        c = HttpConnection(self.frontend)
        t = Transport()
        c.connection_made(t)  # type: ignore[arg-type]
        return c, t

    def exchange(self, c: HttpConnection, t: Transport, request: bytes, response: bytes,
                 split: int = 0) -> bytes:
        """The client sends ``request``, the upstream answers ``response`` (in two segments
        at ``split``, if given); what the client got for it."""
        before = len(t.out)
        c.data_received(request)
        assert self.up.client is c, "the request did not go to the rig's upstream"
        if split:
            self.up.data_received(response[:split])
            self.up.data_received(response[split:])
        else:
            self.up.data_received(response)
        return bytes(t.out[before:])

    async def close(self) -> None:
        await self.service.close()


def run(test: Callable[[Rig], None], **kw: Any) -> None:
    async def main() -> None:
        rig = Rig(**kw)
        try:
            test(rig)
        finally:
            await rig.close()
    asyncio.run(main())


def head_of(answer: bytes) -> list[bytes]:
    return answer.split(b"\r\n\r\n")[0].split(b"\r\n")


def connection_lines(answer: bytes) -> list[bytes]:
    return [line for line in head_of(answer)
            if line.split(b":")[0].lower() in (b"connection", b"keep-alive",
                                               b"proxy-connection")]


def test_close_is_said_when_the_client_asked_it_also_on_a_repeated_head() -> None:
    """A keep-alive request, then Connection: close on the same connection, then a new client
    with Connection: close: the backend sends the same keep-alive head each time (the second
    and third are forwarded without parsing); the first answer carries no connection line
    and the connection stays, the others say close, and the proxy closes after each."""

    def test(rig: Rig) -> None:
        c, t = rig.client()
        first = rig.exchange(c, t, GET, KEEP)
        assert connection_lines(first) == [] and first.endswith(b"\r\n\r\nok")
        assert not t.closed
        assert rig.up.last_head  # the head is cached: what follows takes the repeat path
        second = rig.exchange(c, t, GET_CLOSE, KEEP)
        assert connection_lines(second) == [b"Connection: close"], second
        assert second.endswith(b"\r\n\r\nok") and t.closed
        c2, t2 = rig.client()
        third = rig.exchange(c2, t2, GET_CLOSE, KEEP, split=len(KEEP) - 1)
        assert connection_lines(third) == [b"Connection: close"] and t2.closed
        # and back: a keep-alive client after the closing ones is not told to close
        c3, t3 = rig.client()
        fourth = rig.exchange(c3, t3, GET, KEEP)
        assert connection_lines(fourth) == [] and not t3.closed
        assert not rig.up_transport.closed  # the upstream stayed in the pool throughout

    run(test)


@pytest.mark.parametrize(("request_head", "said", "closes"), [
    (GET, [], False),
    (GET_CLOSE, [b"Connection: close"], True),
    (b"GET / HTTP/1.1\r\nHost: svc.test\r\nConnection: Close, X-A\r\n\r\n",
     [b"Connection: close"], True),
    (GET10, [b"Connection: close"], True),
    (GET10_KEEP, [b"Connection: keep-alive"], False),
])
@pytest.mark.parametrize("response", [KEEP, CLOSING], ids=["backend-keep", "backend-close"])
@pytest.mark.parametrize("repeat", [False, True], ids=["parsed", "repeated"])
def test_the_answer_says_what_the_proxy_does(request_head: bytes, said: list[bytes],
                                             closes: bool, response: bytes,
                                             repeat: bool) -> None:
    """Whatever the backend says of its own connection, the client is told what the proxy
    does with the client's: close (then closed), keep-alive for HTTP/1.0, nothing for
    HTTP/1.1 kept alive; on a parsed head and on one repeating the previous."""

    def test(rig: Rig) -> None:
        if repeat:  # the same head answered before, to a keep-alive client
            c0, t0 = rig.client()
            rig.exchange(c0, t0, GET, response)
            if response is CLOSING:
                return  # the upstream went with the backend's close: nothing to repeat on
            assert rig.up.last_head
            c0.connection_lost(None)
        c, t = rig.client()
        answer = rig.exchange(c, t, request_head, response)
        assert connection_lines(answer) == said, answer
        assert answer.endswith(b"\r\n\r\nok")
        assert t.closed is closes
        if not closes:  # and the connection does go on
            again = rig.exchange(c, t, request_head, KEEP) if response is KEEP else None
            assert again is None or connection_lines(again) == said

    run(test)


@pytest.mark.parametrize(("request_head", "response", "body"), [
    (b"HEAD / HTTP/1.1\r\nHost: svc.test\r\nConnection: close\r\n\r\n",
     b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\n", b""),
    (GET_CLOSE, b"HTTP/1.1 204 No Content\r\nConnection: keep-alive\r\n\r\n", b""),
    (GET_CLOSE, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive"
     b"\r\n\r\n2\r\nok\r\n0\r\n\r\n", b"2\r\nok\r\n0\r\n\r\n"),
])
def test_bodiless_and_chunked_answers_say_close_too(request_head: bytes, response: bytes,
                                                    body: bytes) -> None:
    """HEAD, 204 and chunked answers go the other ways through the proxy: also rewritten."""

    def test(rig: Rig) -> None:
        c, t = rig.client()
        answer = rig.exchange(c, t, request_head, response)
        assert connection_lines(answer) == [b"Connection: close"], answer
        assert answer.split(b"\r\n\r\n", 1)[1] == body
        assert t.closed

    run(test)


def test_a_body_delimited_by_the_close_closes_a_keep_alive_client_and_says_so() -> None:
    """No Content-Length nor chunked: the body ends when the backend closes, so the client's
    connection ends there too (it could not tell the body from what follows), and its
    answer says close."""

    def test(rig: Rig) -> None:
        c, t = rig.client()
        answer = rig.exchange(c, t, GET, b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\n\r\nab")
        assert connection_lines(answer) == [b"Connection: close"], answer
        rig.up.data_received(b"cd")
        assert not t.closed
        rig.up.eof_received()
        assert t.closed and t.out.endswith(b"\r\n\r\nabcd")

    run(test)


def test_an_early_answer_to_a_request_whose_body_is_still_coming_says_close() -> None:
    """The backend answers before the request body ended: the proxy closes (the upstream may
    hold part of the body), so the answer says so."""

    def test(rig: Rig) -> None:
        c, t = rig.client()
        answer = rig.exchange(c, t, b"POST / HTTP/1.1\r\nHost: svc.test\r\nContent-Length: 10"
                                    b"\r\n\r\nabc", KEEP)
        assert connection_lines(answer) == [b"Connection: close"], answer
        assert t.closed

    run(test)


@pytest.mark.parametrize(("request_head", "said", "closes"), [
    (GET, [], False),
    (GET_CLOSE, [b"Connection: close"], True),
    (GET10_KEEP, [b"Connection: keep-alive"], False),
])
def test_answers_made_at_the_frontend_say_it_too(request_head: bytes, said: list[bytes],
                                                 closes: bool) -> None:
    """A response the frontend makes itself (an ACME challenge, a redirect to HTTPS) says
    what the proxy does next, like a forwarded one."""
    redirect = b"HTTP/1.1 308 Permanent Redirect\r\nContent-Length: 0\r\nLocation: /x\r\n\r\n"

    def test(rig: Rig) -> None:
        c, t = rig.client()
        c.data_received(request_head)
        assert connection_lines(bytes(t.out)) == said, bytes(t.out)
        assert head_of(bytes(t.out))[:3] == head_of(redirect)[:3]
        assert t.closed is closes

    run(test, intercept=lambda head, host, service: redirect)
