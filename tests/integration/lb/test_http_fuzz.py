"""Fuzzing the proxy's framing: mutated requests followed by a valid one on the same
connection never desynchronise the proxy from a strict backend."""

from __future__ import annotations

import asyncio
import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corral.testing import free_port
from corral_lb.balancer import Balancer
from corral_lb.config import load_lb_config
from integration.lb.recording_backend import RecordingBackend

H = b"Host: svc.test\r\n"
SEEDS = [
    b"GET /g HTTP/1.1\r\n" + H + b"\r\n",
    b"POST /p HTTP/1.1\r\n" + H + b"Content-Length: 5\r\n\r\nhello",
    b"POST /p HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
    b"5;e=1\r\nhello\r\n3\r\nabc\r\n0\r\nX-T: 1\r\n\r\n",
    b"GET /ten HTTP/1.0\r\nConnection: keep-alive\r\n" + H + b"\r\n",
    b"GET /g HTTP/1.1\r\n" + H + b"Connection: close\r\n\r\n",
]
SENTINEL = b"GET /sentinel HTTP/1.1\r\n" + H + b"\r\n"
# what smuggling attempts are made of
TOKENS = [b" ", b"\t", b"\r", b"\n", b"\r\n", b"\r\n ", b":", b" :", b",", b";", b"+", b"-",
          b"_", b"0", b"5", b"00", b"0x", b"a", b"F", b"\x00", b"\x01", b"\x7f", b"\xff",
          b"chunked", b"x", b"Content-Length: 5\r\n", b"Content-Length: 0\r\n",
          b"Transfer-Encoding: chunked\r\n", b"Transfer-Encoding: x\r\n", b"Host: y\r\n",
          b"0\r\n\r\n", b"\r\n\r\n", b"HTTP/1.0", b"GET / HTTP/1.1\r\n"]

mutation = st.tuples(
    st.sampled_from(["insert", "replace", "delete"]),
    st.floats(min_value=0.0, max_value=1.0),
    st.one_of(st.sampled_from(TOKENS), st.binary(min_size=1, max_size=2)),
)


def mutate(seed: bytes, ops: list[tuple[str, float, bytes]]) -> bytes:
    data = bytearray(seed)
    for op, where, token in ops:
        i = min(int(where * len(data)), len(data))
        if op == "insert":
            data[i:i] = token
        elif op == "replace":
            data[i:i + len(token)] = token
        else:
            del data[i:i + len(token)]
    return bytes(data)


_HEAD = re.compile(rb"HTTP/1\.1 (\d{3}) [^\r\n]*\r\n((?:[^\r\n]+\r\n)*)\r\n")


def responses(stream: bytes) -> list[tuple[int, bytes]]:
    """(status, body) of each Content-Length framed response in the client's stream."""
    out = []
    pos = 0
    while pos < len(stream):
        m = _HEAD.match(stream, pos)
        assert m is not None, f"unframed bytes from the proxy: {stream[pos:pos + 200]!r}"
        n = int(re.search(rb"(?i)content-length: (\d+)", m.group(2)).group(1))  # type: ignore[union-attr]
        out.append((int(m.group(1)), stream[m.end():m.end() + n]))
        pos = m.end() + n
    return out


async def exchange(port: int, data: bytes) -> bytes:
    """Send ``data`` and half-close; everything the proxy answers until it closes (or until
    it waits for more, e.g. a body longer than what was sent)."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(data)
    w.write_eof()
    got = bytearray()
    try:
        async with asyncio.timeout(0.5):
            while chunk := await r.read(65536):
                got += chunk
    except TimeoutError:
        pass
    w.close()
    return bytes(got)


def test_mutated_requests_never_desynchronise_the_proxy() -> None:
    """300 mutations of valid requests, each followed by a valid request: the backend (a
    strict llhttp parser) sees exactly the requests whose answers the client got, in order,
    and never a byte it cannot parse."""
    loop = asyncio.new_event_loop()
    backend = RecordingBackend()
    lb = Balancer()
    fe = free_port()

    async def setup() -> None:
        port = await backend.start()
        await lb.attach("svc", load_lb_config(
            {"name": "svc.test", "frontend": f"127.0.0.1:{fe}", "mode": "http",
             "health": {"interval": "1s"}}, app="svc"))
        assert await lb.add_backend("svc", "rec", "127.0.0.1", port, wait=5)

    loop.run_until_complete(setup())
    ran = 0

    @settings(max_examples=300, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(seed=st.sampled_from(SEEDS), ops=st.lists(mutation, min_size=1, max_size=3))
    def one(seed: bytes, ops: list[tuple[str, float, bytes]]) -> None:
        nonlocal ran
        ran += 1
        data = mutate(seed, ops)
        start, errors = len(backend.requests), len(backend.errors)
        stream = loop.run_until_complete(exchange(fe, data + SENTINEL))
        loop.run_until_complete(asyncio.sleep(0.01))
        assert backend.errors[errors:] == [], (data, backend.errors[errors:])
        seen = backend.requests[start:]
        answered = [body for status, body in responses(stream) if status == 200]
        # the backend answers each request with its target: the same list on both sides
        assert seen == answered, (data, seen, answered)

    try:
        one()
    finally:
        loop.run_until_complete(lb.close())
        loop.run_until_complete(backend.close())
        loop.close()
    assert ran >= 300
