"""Strict HTTP/1.1 framing through the real proxy: refused requests never reach a backend,
valid ones still work, and a backend breaking the framing never poisons the pool."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from corral.testing import free_port, wait_for_async
from corral_lb.balancer import Balancer
from corral_lb.config import load_lb_config
from integration.lb.recording_backend import RecordingBackend

MAX_BODY = 1000  # the balancer's max_body_size in these tests

H = b"Host: svc.test\r\n"
GET = b"GET / HTTP/1.1\r\n" + H
POST = b"POST /p HTTP/1.1\r\n" + H
CHUNKED = POST + b"Transfer-Encoding: chunked\r\n\r\n"

# (case id, raw request, expected status); every one must be refused, answered, closed, and
# not one byte of it may reach the backend
MALFORMED: list[tuple[str, bytes, int]] = [
    # Content-Length that is not 1*DIGIT
    ("cl-plus", POST + b"Content-Length: +5\r\n\r\nhello", 400),
    ("cl-minus", POST + b"Content-Length: -5\r\n\r\nhello", 400),
    ("cl-underscore", POST + b"Content-Length: 1_0\r\n\r\nhellohello", 400),
    ("cl-hex", POST + b"Content-Length: 0x5\r\n\r\nhello", 400),
    ("cl-space-inside", POST + b"Content-Length: 1 0\r\n\r\nhellohello", 400),
    ("cl-overflow", POST + b"Content-Length: 99999999999999999999999\r\n\r\n", 400),
    ("cl-empty", POST + b"Content-Length: \r\n\r\n", 400),
    ("cl-list", POST + b"Content-Length: 5, 5\r\n\r\nhello", 400),
    ("cl-decimal", POST + b"Content-Length: 5.0\r\n\r\nhello", 400),
    ("cl-differ", POST + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!", 400),
    ("cl-twice-same", POST + b"Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello", 400),
    # Content-Length with Transfer-Encoding, either order
    ("cl-and-te", POST + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"0\r\n\r\n", 400),
    ("te-and-cl", POST + b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n"
     b"0\r\n\r\n", 400),
    # Transfer-Encoding whose final coding is not exactly chunked; unknown codings 501
    ("te-xchunked", POST + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n", 501),
    ("te-unknown-then-chunked", POST + b"Transfer-Encoding: foo, chunked\r\n\r\n0\r\n\r\n",
     501),
    ("te-identity", POST + b"Transfer-Encoding: identity\r\n\r\n", 501),
    ("te-chunked-not-last", POST + b"Transfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n", 400),
    ("te-gzip-only", POST + b"Transfer-Encoding: gzip\r\n\r\n", 400),
    ("te-upper-case", POST + b"Transfer-Encoding: Chunked\r\n\r\n0\r\n\r\n", 400),
    ("te-chunked-twice", POST + b"Transfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n", 400),
    ("te-two-fields", POST + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n"
     b"\r\n0\r\n\r\n", 400),
    ("te-with-parameter", POST + b"Transfer-Encoding: chunked;q=1\r\n\r\n0\r\n\r\n", 400),
    ("te-in-http10", b"POST /p HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    # chunk sizes that are not 1*HEXDIG, chunks not ended by CRLF
    ("chunk-0x", CHUNKED + b"0x5\r\nhello\r\n0\r\n\r\n", 400),
    ("chunk-underscore", CHUNKED + b"5_0\r\nhello\r\n0\r\n\r\n", 400),
    ("chunk-plus", CHUNKED + b"+5\r\nhello\r\n0\r\n\r\n", 400),
    ("chunk-minus-zero", CHUNKED + b"-0\r\n\r\n", 400),
    ("chunk-leading-space", CHUNKED + b" 5\r\nhello\r\n0\r\n\r\n", 400),
    ("chunk-trailing-space", CHUNKED + b"5 \r\nhello\r\n0\r\n\r\n", 400),
    ("chunk-empty-size", CHUNKED + b"\r\nhello\r\n0\r\n\r\n", 400),
    ("chunk-size-overflow", CHUNKED + b"fffffffffffffffff\r\nhello\r\n0\r\n\r\n", 400),
    ("chunk-bare-lf", CHUNKED + b"5\nhello\r\n0\r\n\r\n", 400),
    ("chunk-data-too-long", CHUNKED + b"5\r\nhelloXX\r\n0\r\n\r\n", 400),
    ("chunk-last-bare-lf", CHUNKED + b"0\n\n", 400),
    # whitespace between a field name and its colon
    ("space-before-colon", POST + b"Content-Length : 5\r\n\r\nhello", 400),
    ("tab-before-colon", POST + b"Content-Length\t: 5\r\n\r\nhello", 400),
    ("space-before-colon-host", b"GET / HTTP/1.1\r\nHost : svc.test\r\n\r\n", 400),
    ("te-space-before-colon", POST + b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n", 400),
    # obs-fold
    ("obs-fold-space", GET + b"X-A: a\r\n b\r\n\r\n", 400),
    ("obs-fold-tab", GET + b"X-A: a\r\n\tb\r\n\r\n", 400),
    ("obs-fold-first-field", b"GET / HTTP/1.1\r\n Host: svc.test\r\n\r\n", 400),
    # control characters in names, values or the target
    ("ctl-in-value", GET + b"X-A: a\x01b\r\n\r\n", 400),
    ("nul-in-value", GET + b"X-A: a\x00b\r\n\r\n", 400),
    ("del-in-value", GET + b"X-A: a\x7fb\r\n\r\n", 400),
    ("bare-cr-in-value", GET + b"X-A: a\rb\r\n\r\n", 400),
    ("bare-lf-in-value", GET + b"X-A: a\nb: c\r\n\r\n", 400),
    ("ctl-in-name", GET + b"X\x01A: a\r\n\r\n", 400),
    ("empty-name", GET + b": a\r\n\r\n", 400),
    ("ctl-in-target", b"GET /a\x01b HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("del-in-target", b"GET /a\x7fb HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("tab-in-target", b"GET /a\tb HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("bare-lf-head", b"GET / HTTP/1.1\nHost: svc.test\n\n", 400),
    # Host missing or repeated in HTTP/1.1
    ("host-missing", b"GET / HTTP/1.1\r\nX-A: a\r\n\r\n", 400),
    ("host-twice", b"GET / HTTP/1.1\r\nHost: svc.test\r\nHost: other.test\r\n\r\n", 400),
    ("host-twice-same", GET + H + b"\r\n", 400),
    ("host-twice-http10", b"GET / HTTP/1.0\r\n" + H + H + b"\r\n", 400),
    # request line shape and version
    ("double-space", b"GET  / HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("http09", b"GET /\r\n\r\n", 400),
    ("http12", b"GET / HTTP/1.2\r\n" + H + b"\r\n", 400),
    ("http20", b"GET / HTTP/2.0\r\n" + H + b"\r\n", 505),
    ("lower-case-method", b"get / HTTP/1.1\r\n" + H + b"\r\n", 501),
    # limits
    ("request-line-too-long", b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n" + H + b"\r\n", 414),
    ("head-too-large", GET + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 1000) for i in range(70))
     + b"\r\n", 431),
    ("cl-body-too-large", POST + b"Content-Length: %d\r\n\r\n" % (MAX_BODY + 1)
     + b"x" * (MAX_BODY + 1), 413),
    ("chunked-body-too-large", CHUNKED + b"%x\r\n" % (MAX_BODY + 1) + b"x" * (MAX_BODY + 1)
     + b"\r\n0\r\n\r\n", 413),
]


def _cfg(port: int) -> object:
    return load_lb_config({"name": "svc.test", "frontend": f"127.0.0.1:{port}", "mode": "http",
                           "health": {"interval": "100ms", "timeout": "500ms"}}, app="svc")


@contextlib.asynccontextmanager
async def proxy(responses: dict[bytes, bytes] | None = None
                ) -> AsyncIterator[tuple[int, RecordingBackend, Balancer]]:
    """A balancer with one HTTP frontend in front of a recording backend."""
    backend = RecordingBackend(responses)
    port = await backend.start()
    lb = Balancer()
    lb.max_body_size = MAX_BODY
    fe = free_port()
    try:
        await lb.attach("svc", _cfg(fe))  # type: ignore[arg-type]
        assert await lb.add_backend("svc", "rec", "127.0.0.1", port, wait=5)
        yield fe, backend, lb
    finally:
        await lb.close()
        await backend.close()


async def read_all(r: asyncio.StreamReader, timeout: float = 3.0) -> bytes:
    """Everything until the proxy closes the connection (fails if it does not)."""
    return await asyncio.wait_for(r.read(-1), timeout)


@pytest.mark.parametrize(("raw", "status"), [pytest.param(r, s, id=i) for i, r, s in MALFORMED])
def test_malformed_request_is_refused_closed_and_never_forwarded(raw: bytes, status: int
                                                                 ) -> None:
    """Each malformed request gets its status with Connection: close, the connection is
    closed, and the backend receives zero bytes."""

    async def main() -> None:
        async with proxy() as (fe, backend, _):
            r, w = await asyncio.open_connection("127.0.0.1", fe)
            w.write(raw)
            answer = await read_all(r)  # EOF: the proxy closed the connection
            w.close()
            assert answer[:12] == b"HTTP/1.1 %d" % status, answer[:200]
            assert b"\r\nConnection: close\r\n" in answer.split(b"\r\n\r\n")[0] + b"\r\n"
            await asyncio.sleep(0.05)
            assert backend.received == 0, [bytes(c.data) for c in backend.conns if c.data]
            assert backend.requests == []

    asyncio.run(main())


def test_the_corpus_covers_every_edge_md_item() -> None:
    """At least 40 cases, and every statute of EDGE.md's list has cases (by id prefix)."""
    ids = [i for i, _, _ in MALFORMED]
    assert len(ids) >= 40 and len(set(ids)) == len(ids)
    for prefix in ("cl-", "cl-differ", "cl-and-te", "te-", "chunk-", "space-before-colon",
                   "obs-fold", "ctl-in-", "host-missing", "host-twice", "te-in-http10",
                   "request-line-too-long", "head-too-large", "cl-body-too-large"):
        assert any(i.startswith(prefix) for i in ids), prefix


async def _read_response(r: asyncio.StreamReader) -> tuple[int, bytes]:
    """One Content-Length framed response (interim 1xx responses skipped)."""
    while True:
        head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
        status = int(head[9:12])
        if status >= 200:
            break
    n = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    return status, await r.readexactly(n)


def test_valid_requests_still_work() -> None:
    """Content-Length and chunked bodies (with extensions and trailers), large bodies,
    keep-alive, pipelined requests, HEAD, Expect: 100-continue, an empty line before a
    request line: all served, byte for byte, and the backend's strict parser agrees."""

    async def main() -> None:
        async with proxy() as (fe, backend, lb):
            lb_fe = lb._http[("127.0.0.1", fe)]
            lb_fe.max_body_size = 0  # large bodies: no limit on this frontend
            r, w = await asyncio.open_connection("127.0.0.1", fe)
            sent = bytearray()

            async def send(data: bytes) -> None:
                sent.extend(data)
                w.write(data)
                await w.drain()

            await send(GET + b"\r\n")
            assert await _read_response(r) == (200, b"/")
            await send(b"POST /echo HTTP/1.1\r\n" + H + b"Content-Length: 5\r\n\r\nhello")
            assert await _read_response(r) == (200, b"hello")
            await send(b"POST /echo HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
                       b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n")
            assert await _read_response(r) == (200, b"hello world")
            big = bytes(range(256)) * 8192  # 2 MiB
            await send(b"POST /echo HTTP/1.1\r\n" + H + b"Content-Length: %d\r\n\r\n" % len(big)
                       + big)
            assert await _read_response(r) == (200, big)
            chunked = b"".join(b"%x\r\n%s\r\n" % (len(big[i:i + 70000]), big[i:i + 70000])
                               for i in range(0, len(big), 70000)) + b"0\r\n\r\n"
            await send(b"POST /echo HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n")
            for i in range(0, len(chunked), 4099):  # arbitrary segment boundaries
                await send(chunked[i:i + 4099])
            assert await _read_response(r) == (200, big)
            # pipelined: three requests in one write, answered in order
            await send(b"".join(b"GET /p%d HTTP/1.1\r\n" % i + H + b"\r\n" for i in range(3)))
            assert [await _read_response(r) for _ in range(3)] == [
                (200, b"/p0"), (200, b"/p1"), (200, b"/p2")]
            # HEAD: a Content-Length but no body, and the connection stays in step
            await send(b"HEAD /h HTTP/1.1\r\n" + H + b"\r\n")
            head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200") and b"Content-Length: 2" in head
            # Expect: 100-continue: the interim response comes back, then the final one
            await send(b"POST /echo HTTP/1.1\r\n" + H + b"Expect: 100-continue\r\n"
                       b"Content-Length: 4\r\n\r\n")
            interim = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
            assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
            await send(b"body")
            assert await _read_response(r) == (200, b"body")
            # an empty line before a request line is ignored (RFC 9112 2.2), not forwarded
            w.write(b"\r\n" + GET + b"\r\n")
            assert await _read_response(r) == (200, b"/")
            w.close()
            assert backend.errors == []
            assert backend.requests == [b"/", b"/echo", b"/echo", b"/echo", b"/echo", b"/p0",
                                        b"/p1", b"/p2", b"/h", b"/echo", b"/"]
            # forwarded byte for byte: everything sent, less the empty line, in one upstream
            received = b"".join(bytes(c.data) for c in backend.conns)
            assert received == bytes(sent) + GET + b"\r\n"

    asyncio.run(main())


def test_chunk_error_mid_body_closes_both_connections_and_is_not_pooled() -> None:
    """A chunked body that goes wrong after its head was forwarded: the client gets 400 and
    is closed, the backend connection is closed too, and the next client gets a new one."""

    async def main() -> None:
        async with proxy() as (fe, backend, _):
            r, w = await asyncio.open_connection("127.0.0.1", fe)
            w.write(GET + b"\r\n")  # an upstream connection, then a chunked request on it
            assert await _read_response(r) == (200, b"/")
            w.write(CHUNKED + b"5\r\nhello\r\n")
            await wait_for_async(lambda: b"hello" in b"".join(bytes(c.data) for c in backend.conns))
            used = [c for c in backend.conns if c.data]
            assert len(used) == 1
            w.write(b"0x5\r\nworld\r\n0\r\n\r\n")
            answer = await read_all(r)
            assert answer.startswith(b"HTTP/1.1 400")
            await wait_for_async(lambda: used[0].closed)
            assert b"0x5" not in used[0].data  # the bad chunk line itself never went out
            assert await _get(fe) == (200, b"/")
            assert [c for c in backend.conns if c.data][1:] != []  # served on a new connection
            assert backend.errors == []

    asyncio.run(main())


async def _get(port: int, target: bytes = b"/") -> tuple[int, bytes]:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    try:
        w.write(b"GET " + target + b" HTTP/1.1\r\n" + H + b"\r\n")
        return await _read_response(r)
    finally:
        w.close()


BAD_RESPONSES: list[tuple[str, bytes]] = [
    ("cl-plus", b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\nhello"),
    ("cl-hex", b"HTTP/1.1 200 OK\r\nContent-Length: 0x5\r\n\r\nhello"),
    ("cl-differ", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello"),
    ("cl-and-te", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"0\r\n\r\n"),
    ("te-xchunked", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n"),
    ("te-http10", b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    ("chunk-0x", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n"
     b"0\r\n\r\n"),
    ("chunk-plus", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n+5\r\nhello\r\n"
     b"0\r\n\r\n"),
    ("space-before-colon", b"HTTP/1.1 200 OK\r\nContent-Length : 5\r\n\r\nhello"),
    ("obs-fold", b"HTTP/1.1 200 OK\r\nX-A: a\r\n b\r\nContent-Length: 5\r\n\r\nhello"),
    ("ctl-in-reason", b"HTTP/1.1 200 O\x01K\r\nContent-Length: 5\r\n\r\nhello"),
    ("status-099", b"HTTP/1.1 099 Odd\r\nContent-Length: 5\r\n\r\nhello"),
    ("http2-version", b"HTTP/2.0 200 OK\r\nContent-Length: 5\r\n\r\nhello"),
]


@pytest.mark.parametrize("raw", [pytest.param(r, id=i) for i, r in BAD_RESPONSES])
def test_malformed_response_is_502_and_its_connection_never_reused(raw: bytes) -> None:
    """A backend answering with ambiguous framing: the client gets 502 (nothing of that
    response), the backend connection is closed, and the next request uses a new one."""

    async def main() -> None:
        async with proxy({b"/bad": raw}) as (fe, backend, _):
            r, w = await asyncio.open_connection("127.0.0.1", fe)
            w.write(GET + b"\r\n")
            assert await _read_response(r) == (200, b"/")  # an upstream connection in use
            w.write(b"GET /bad HTTP/1.1\r\n" + H + b"\r\n")
            answer = await read_all(r)
            w.close()
            assert answer.startswith(b"HTTP/1.1 502 "), answer
            assert b"hello" not in answer
            used = [c for c in backend.conns if c.requests]
            assert len(used) == 1 and used[0].requests == [b"/", b"/bad"]
            await wait_for_async(lambda: used[0].closed)
            assert await _get(fe, b"/next") == (200, b"/next")
            assert [c.requests for c in backend.conns if c.requests][1:] == [[b"/next"]]

    asyncio.run(main())


def test_bytes_after_a_response_keep_its_connection_out_of_the_pool() -> None:
    """A backend sending more than its response (a second response, say): the client gets the
    first one only, and that connection is not reused."""

    async def main() -> None:
        extra = (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                 b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nevil!")
        async with proxy({b"/two": extra}) as (fe, backend, _):
            r, w = await asyncio.open_connection("127.0.0.1", fe)
            w.write(b"GET /two HTTP/1.1\r\n" + H + b"\r\n")
            assert await _read_response(r) == (200, b"ok")
            w.write(GET + b"\r\n")
            assert await _read_response(r) == (200, b"/")  # not "evil!"
            w.close()
            first = next(c for c in backend.conns if c.requests)
            assert first.requests == [b"/two"]
            assert first.closed or await _closed_soon(first)

    asyncio.run(main())


async def _closed_soon(rec: object) -> bool:
    await wait_for_async(lambda: rec.closed)  # type: ignore[attr-defined]
    return True


def test_a_client_closing_leaves_its_upstream_to_the_next_client() -> None:
    """Clients that each send one request with "Connection: close": each is answered and
    closed, the backend never sees their connection-management lines, and one upstream
    connection carries every request (as HAProxy reuses it), not a new one per client."""

    async def main() -> None:
        async with proxy() as (fe, backend, _):
            for n in range(3):
                r, w = await asyncio.open_connection("127.0.0.1", fe)
                w.write(b"GET /c%d HTTP/1.1\r\n" % n + H
                        + b"Connection: close\r\nKeep-Alive: timeout=5\r\nX-Kept: 1\r\n\r\n")
                assert await _read_response(r) == (200, b"/c%d" % n)
                assert await asyncio.wait_for(r.read(), 5) == b""  # the proxy closed it
                w.close()
            assert backend.errors == []
            used = [c for c in backend.conns if c.requests]  # (health checks send none)
            assert [c.requests for c in used] == [[b"/c0", b"/c1", b"/c2"]]
            forwarded = bytes(used[0].data).lower()
            assert b"connection:" not in forwarded and b"keep-alive:" not in forwarded
            assert forwarded.count(b"x-kept: 1\r\n") == 3
            # an HTTP/1.0 request without keep-alive is forwarded as it came, so the backend
            # may close after it: that upstream is never handed to the next client
            for target in (b"/old", b"/next"):
                r, w = await asyncio.open_connection("127.0.0.1", fe)
                w.write(b"GET " + target + b" HTTP/1.0\r\n" + H + b"\r\n" if target == b"/old"
                        else b"GET " + target + b" HTTP/1.1\r\n" + H + b"\r\n")
                assert await _read_response(r) == (200, target)
                w.close()
            used = [c for c in backend.conns if c.requests]
            assert [c.requests for c in used] == [[b"/c0", b"/c1", b"/c2", b"/old"], [b"/next"]]
            assert backend.errors == []

    asyncio.run(main())
