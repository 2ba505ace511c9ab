"""The framing layer alone: chunked bodies across segments, and the proxy's host limits."""

from __future__ import annotations

import gc
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.errors import CorralError
from corral_lb.config import MAX_BODY_SIZE, MAX_CONNECTIONS, proxy_limits
from corral_lb.http_framing import (
    CLOSE_LINE,
    KEEP_ALIVE_LINE,
    R400,
    R413,
    FramingError,
    _bad_bytes,
    read_request_head,
    read_response_head,
    with_connection,
    without_hop_by_hop,
)

HEAD = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"


def test_chunked_body_finds_the_end_at_any_split() -> None:
    """The body ends right after the last chunk and trailers, however it is segmented, and
    llhttp agrees on that byte."""
    body = b"4\r\nWiki\r\n5;ext=1\r\npedia\r\n0\r\nX-Trailer: 1\r\n\r\nNEXT"
    for split in range(1, len(body)):
        framer = read_request_head(HEAD).body
        assert framer is not None
        pos = framer.feed(body[:split])
        if not framer.done:
            assert pos == split
            pos = framer.feed(body[split:])
            assert framer.done and body[split:][pos:] == b"NEXT"
        else:
            assert body[pos:] == b"NEXT"


@pytest.mark.parametrize("bad", [b"0x4\r\nWiki\r\n0\r\n\r\n", b"4\r\nWikiXX0\r\n\r\n",
                                 b"4 \r\nWiki\r\n0\r\n\r\n", b"4\nWiki\r\n0\r\n\r\n"])
def test_chunked_body_errors_at_any_split(bad: bytes) -> None:
    """A malformed chunked body is refused whichever segment brings the bad byte."""
    for split in range(1, len(bad)):
        framer = read_request_head(HEAD).body
        assert framer is not None
        with pytest.raises(FramingError) as e:
            framer.feed(bad[:split])
            framer.feed(bad[split:])
        assert e.value.response is R400


def test_chunked_body_limit() -> None:
    """Data bytes over max_body_size are 413 (extensions and framing do not count)."""
    framer = read_request_head(HEAD, max_body=8).body
    assert framer is not None
    framer.feed(b"4;long-extension=1\r\nWiki\r\n4\r\nWiki\r\n")
    with pytest.raises(FramingError) as e:
        framer.feed(b"1\r\n")
    assert e.value.response is R413


def test_proxy_limits_defaults_values_and_errors() -> None:
    """max_body_size takes the kernel's size notation, max_connections_per_frontend a whole
    number; 0 lifts either; a bad value names its key."""
    assert proxy_limits({}) == (MAX_BODY_SIZE, MAX_CONNECTIONS) == (1024**3, 10_000)
    assert proxy_limits({"max_body_size": "10MiB", "max_connections_per_frontend": 5}) == (
        10 * 1024**2, 5)
    assert proxy_limits({"max_body_size": 0, "max_connections_per_frontend": 0}) == (0, 0)
    for key, value in (("max_body_size", "lots"), ("max_body_size", -1),
                       ("max_connections_per_frontend", "many"),
                       ("max_connections_per_frontend", -1),
                       ("max_connections_per_frontend", True)):
        with pytest.raises(CorralError, match=rf"\[drivers.lb\] config: {key}"):
            proxy_limits({key: value})


def test_connection_management_lines_are_dropped_and_nothing_else() -> None:
    """Connection, Keep-Alive and Proxy-Connection (any case) are the proxy's business with
    each side: dropped from an HTTP/1.1 head; every other line kept byte for byte, also the
    fields a Connection header names (a client cannot make the proxy drop framing fields)."""
    head = (b"GET /a HTTP/1.1\r\nHost: x\r\nconnection: close, Content-Length, X-Keep\r\n"
            b"X-Keep: 1\r\nKeep-Alive: timeout=5\r\nPROXY-CONNECTION: keep-alive\r\n"
            b"Content-Length: 0\r\nX-Connection-Id: 7\r\n\r\n")
    req = read_request_head(head)
    assert req.hop_by_hop
    assert without_hop_by_hop(head) == (b"GET /a HTTP/1.1\r\nHost: x\r\nX-Keep: 1\r\n"
                                        b"Content-Length: 0\r\nX-Connection-Id: 7\r\n\r\n")
    # nothing to drop: the flag is off (the head is forwarded as it came)
    assert not read_request_head(b"GET / HTTP/1.1\r\nHost: x\r\nX-Connection: 1\r\n\r\n"
                                 ).hop_by_hop


@pytest.mark.parametrize("head", [
    # an upgrade needs its Connection: upgrade to reach the backend
    b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    # HTTP/1.0 keep-alive is only what Connection says: forwarded as it came
    b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
])
def test_upgrades_and_http10_keep_their_connection_lines(head: bytes) -> None:
    assert not read_request_head(head).hop_by_hop


_LOOKAROUND_CTL = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]|\r(?!\n)|(?<!\r)\n")


@settings(max_examples=3000, deadline=None)
@given(st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b"\t", b"\x00", b"\x1f", b"\x7f",
                                 b"a", b" ", b":", b"\x80", b"\xff"]), max_size=40))
def test_bad_bytes_agrees_with_the_look_around_expression(parts: list[bytes]) -> None:
    """The three-count check finds exactly what the plain expression finds (a control
    character, a CR or an LF outside a CRLF) in a head ending with its empty line."""
    head = b"".join(parts) + b"\r\n\r\n"
    expected = _LOOKAROUND_CTL.search(head, 0, len(head) - 4) is not None
    assert _bad_bytes(head) is expected, head


def test_parsing_a_head_leaves_nothing_to_the_garbage_collector() -> None:
    """A head's parser and the reader whose callbacks it holds are freed by reference
    counting when the head is done with, whether it passed or was refused: a reference cycle
    between them would leave every head's parser to the cyclic collector, whose passes cost
    the proxy more than the parsing itself."""
    heads = [b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
             b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
             b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
             b"BREW / HTTP/1.1\r\nHost: x\r\n\r\n"]
    gc.collect()
    gc.disable()
    try:
        for _ in range(3):
            for head in heads:
                try:
                    read_request_head(head)
                except FramingError:
                    pass
            read_response_head(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n")
            read_response_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        assert gc.collect() == 0
    finally:
        gc.enable()


def test_with_connection_replaces_the_connection_lines_and_keeps_the_rest() -> None:
    """A response head's Connection, Keep-Alive and Proxy-Connection lines (any case) give way
    to the one line the proxy means, after the last field; every other line byte for byte,
    in its order; a head without fields gets just the line."""
    head = (b"HTTP/1.1 200 OK\r\nX-A: 1\r\nconnection: keep-alive\r\nKeep-Alive: timeout=5, "
            b"max=100\r\nContent-Length: 2\r\nPROXY-CONNECTION: close\r\nX-Connection: 2\r\n"
            b"\r\n")
    resp = read_response_head(head)
    assert resp.hop_by_hop and resp.length == 2
    kept = b"HTTP/1.1 200 OK\r\nX-A: 1\r\nContent-Length: 2\r\nX-Connection: 2\r\n"
    assert with_connection(head, CLOSE_LINE) == kept + b"Connection: close\r\n\r\n"
    assert with_connection(head, KEEP_ALIVE_LINE) == kept + b"Connection: keep-alive\r\n\r\n"
    assert with_connection(head, b"") == kept + b"\r\n"
    assert with_connection(b"HTTP/1.1 204 No Content\r\n\r\n", CLOSE_LINE) == (
        b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
    assert not read_response_head(b"HTTP/1.1 200 OK\r\nX-Connection: 1\r\n"
                                  b"Content-Length: 0\r\n\r\n").hop_by_hop


def test_a_request_head_says_whether_it_is_http10() -> None:
    """HTTP/1.0 requests persist only when told so (the proxy's answer says keep-alive)."""
    assert read_request_head(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").http10
    assert not read_request_head(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").http10
