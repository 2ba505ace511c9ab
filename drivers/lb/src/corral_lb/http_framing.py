"""Strict HTTP/1.1 message framing for the proxy: llhttp (through ``httptools``) plus our checks.

The proxy shares keep-alive backend connections between clients, so a message that two parsers
could frame differently is a request-smuggling attempt (docs/security.md). Every head is
parsed by llhttp in its strict mode (httptools leaves all of llhttp's leniencies off), then
checked for what llhttp lets through or does not know about: the request line's shape, the
HTTP version, control characters, Host, Transfer-Encoding's codings and its use in HTTP/1.0,
the body limit. Nothing here rewrites a message: the proxy forwards the bytes it was given.

A chunked body is walked by :class:`ChunkedBody`, which finds where it ends, while llhttp
parses the same bytes and must agree on that end to the byte; any disagreement is an error.
A Content-Length body needs no parsing: llhttp has checked the length, the proxy counts bytes.
"""

from __future__ import annotations

import re

from httptools import (
    HttpParserError,
    HttpParserInvalidMethodError,
    HttpParserUpgrade,
    HttpRequestParser,
    HttpResponseParser,
)

MAX_REQUEST_LINE = 8 * 1024  # bytes, CRLF excluded: longer is 414 (nginx's default buffer)
MAX_HEAD = 64 * 1024  # bytes, the request or response head (start line and fields): 431
MAX_CHUNK_LINE = 4096  # bytes, a chunk-size line with its extensions, or a trailer field


def _reply(status: int, reason: str) -> bytes:
    body = f"{status} {reason}\n".encode()
    return (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body


R400 = _reply(400, "Bad Request")
R404 = _reply(404, "Not Found")
R413 = _reply(413, "Content Too Large")
R414 = _reply(414, "URI Too Long")
R431 = _reply(431, "Request Header Fields Too Large")
R501 = _reply(501, "Not Implemented")
R502 = _reply(502, "Bad Gateway")
R503 = _reply(503, "Service Unavailable")
R505 = _reply(505, "HTTP Version Not Supported")


class FramingError(Exception):
    """A message the proxy refuses; ``response`` is what the client is answered (then closed)."""

    def __init__(self, response: bytes, reason: str) -> None:
        super().__init__(reason)
        self.response = response
        self.reason = reason


# A control character other than HTAB, CR and LF (llhttp checks names, values and the target
# already; this also covers a response's reason phrase); CR and LF: see _bad_bytes.
_CTL = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")
_OWS = b" \t"
# Transfer codings registered with IANA that a backend may apply; any other is 501.
KNOWN_CODINGS = frozenset({b"chunked", b"gzip", b"deflate", b"compress", b"x-gzip",
                           b"x-compress", b"trailers"})


class _Reader:
    """The callbacks llhttp calls while parsing one message (httptools' protocol object)."""

    __slots__ = ("complete", "headers", "keepalive", "messages", "parser")

    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []  # (lower-cased name, value without OWS)
        self.complete = False
        self.keepalive = False
        self.messages = 0
        # the parser, while it parses the head (for its keep-alive verdict): it holds this
        # reader's callbacks, so keeping it after the head would make a reference cycle, left
        # to the garbage collector on every request and response head
        self.parser: HttpRequestParser | HttpResponseParser | None = None

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value.strip(_OWS)))

    def on_headers_complete(self) -> None:
        self.complete = True
        assert self.parser is not None
        self.keepalive = self.parser.should_keep_alive()

    def on_message_complete(self) -> None:
        self.messages += 1


# The fields that manage the connection they arrive on (RFC 9110 7.6.1; Keep-Alive and
# Proxy-Connection are their pre-1.1 forms): the proxy's own business with each side, never
# forwarded, so a client's "Connection: close" does not close the upstream connection too
# (which could then not be reused), as HAProxy does in its default keep-alive mode. Fields a
# Connection header names are left alone: a client must not be able to make the proxy drop
# Host, Content-Length, Transfer-Encoding or the forwarding headers.
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection"})


# What a response the proxy forwards or makes says of the client connection it goes on (the
# only connection-management line it carries; see with_connection): the proxy closes after it,
# or keeps an HTTP/1.0 client's connection (HTTP/1.1 persists without saying so).
CLOSE_LINE = b"Connection: close\r\n"
KEEP_ALIVE_LINE = b"Connection: keep-alive\r\n"


def without_hop_by_hop(head: bytes) -> bytes:
    """``head`` (a whole request head that passed ``read_request_head``, ending with its empty
    line) without its HOP_BY_HOP lines; every other line as it was."""
    return with_connection(head, b"")


def with_connection(head: bytes, line: bytes) -> bytes:
    """``head`` (a whole message head that passed ``read_request_head`` or
    ``read_response_head``, ending with its empty line) with its HOP_BY_HOP lines replaced by
    ``line`` (b"", CLOSE_LINE or KEEP_ALIVE_LINE), put after the last field; every other line
    as it was, in its order."""
    lines = head[:-4].split(b"\r\n")
    kept = [lines[0], *(field for field in lines[1:]
                        if field[:field.find(b":")].lower() not in HOP_BY_HOP)]
    return b"\r\n".join(kept) + b"\r\n" + line + b"\r\n"


def _bad_bytes(head: bytes) -> bool:
    """Whether ``head`` (ending with its empty line) holds a control character other than HTAB
    or a CR or LF that is not part of a CRLF pair. Every CR is in a pair exactly when there are
    as many CRLFs as CRs, and every LF likewise: three counts in C, about half the time of one
    regular expression with look-arounds, on every request and response head."""
    if _CTL.search(head) is not None:
        return True
    pairs = head.count(b"\r\n")
    return head.count(b"\r") != pairs or head.count(b"\n") != pairs


def _codings(value: bytes) -> list[bytes]:
    """The transfer codings of a Transfer-Encoding value, as sent (parameters included)."""
    return [c.strip(_OWS) for c in value.split(b",")]


def _transfer_encoding(values: list[bytes], refuse: bytes) -> bool:
    """True if the body is chunked; ``FramingError(refuse)`` unless the final coding is exactly
    ``chunked`` (lower case: a backend that compares case-sensitively would otherwise read
    the body as the next request), once, and every coding is known (else 501 for requests)."""
    codings = [c for v in values for c in _codings(v)]
    for c in codings:
        name = c.split(b";", 1)[0].strip(_OWS).lower()
        if name not in KNOWN_CODINGS:
            raise FramingError(R501 if refuse is R400 else refuse,
                               f"unknown transfer coding {c[:40]!r}")
    if not codings or codings[-1] != b"chunked" or codings.count(b"chunked") != 1 or any(
            c.lower().startswith(b"chunked") for c in codings[:-1]):
        raise FramingError(refuse, "the final transfer coding is not exactly 'chunked'")
    return True


def _content_length(values: list[bytes], refuse: bytes) -> int:
    if len(values) != 1:
        raise FramingError(refuse, "several Content-Length fields")
    v = values[0]
    if not v.isdigit() or len(v) > 18:  # bytes.isdigit is ASCII digits only
        raise FramingError(refuse, "Content-Length is not 1*DIGIT")
    return int(v)


def _llhttp_error(e: HttpParserError, head: bytes, refuse: bytes) -> FramingError:
    if isinstance(e, HttpParserInvalidMethodError):
        return FramingError(R501 if refuse is R400 else refuse, "unknown method")
    if refuse is R400 and b"transfer-encoding" in head.lower():
        # llhttp refuses a request's Transfer-Encoding before we see it: tell unknown codings
        # (501) from misplaced or repeated chunked (400)
        values = [line.split(b":", 1)[1] for line in head.split(b"\r\n")[1:]
                  if line.lower().startswith(b"transfer-encoding:")]
        try:
            _transfer_encoding(values, R400)
        except FramingError as fe:
            if fe.response is R501:
                return fe
    return FramingError(refuse, f"llhttp: {e}")


class RequestHead:
    """What the proxy needs of a request head that passed every check."""

    __slots__ = ("body", "headers", "hop_by_hop", "host", "http10", "is_head", "keepalive",
                 "length", "upgrade")

    def __init__(self, reader: _Reader, parser: HttpRequestParser, host: bytes,
                 length: int, body: ChunkedBody | None, upgrade: bool,
                 hop_by_hop: bool = False, http10: bool = False) -> None:
        self.headers = reader.headers
        self.keepalive = reader.keepalive
        self.http10 = http10  # an HTTP/1.0 request: its connection persists only if told so
        self.is_head = parser.get_method() == b"HEAD"
        self.host = host
        self.length = length  # Content-Length body bytes (0 without)
        self.body = body  # the chunked body's framer, or None
        self.upgrade = upgrade
        # whether the proxy drops this head's connection-management lines before forwarding
        # it (without_hop_by_hop): HTTP/1.1, not an upgrade (which needs them), and has some
        self.hop_by_hop = hop_by_hop

    def header(self, name: bytes) -> bytes | None:
        """The first value of field ``name`` (lower case), or None."""
        for n, v in self.headers:
            if n == name:
                return v
        return None


def read_request_head(head: bytes, max_body: int = 0) -> RequestHead:
    """Parse and check a request head (``head`` ends with its empty line); ``max_body`` > 0
    bounds the body (413). Raises ``FramingError`` with the answer to send."""
    line_end = head.find(b"\r\n")
    if line_end > MAX_REQUEST_LINE:
        raise FramingError(R414, "request line too long")
    if len(head) > MAX_HEAD:
        raise FramingError(R431, "request head too large")
    if _bad_bytes(head) or head.count(b" ", 0, line_end) != 2:
        # a control character, a bare CR or LF, or not exactly "method SP target SP version"
        raise FramingError(R400, "malformed request line or control character in the head")
    reader = _Reader()
    parser = HttpRequestParser(reader)
    reader.parser = parser
    upgrade = False
    try:
        parser.feed_data(head)
    except HttpParserUpgrade:
        upgrade = True  # Upgrade or CONNECT: parsing stops after the head, as it should
    except HttpParserError as e:
        raise _llhttp_error(e, head, R400) from None
    finally:
        reader.parser = None  # see _Reader.parser
    if not reader.complete:
        raise FramingError(R400, "incomplete head")
    version = parser.get_http_version()
    if version not in ("1.1", "1.0"):
        raise FramingError(R505 if version[:2] in ("2.", "3.") else R400,
                           f"HTTP version {version}")
    hosts: list[bytes] = []
    te: list[bytes] = []
    cl: list[bytes] = []
    hop_by_hop = False
    for name, value in reader.headers:
        if name == b"host":
            hosts.append(value)
        elif name == b"transfer-encoding":
            te.append(value)
        elif name == b"content-length":
            cl.append(value)
        elif name in HOP_BY_HOP:
            hop_by_hop = True
    if len(hosts) > 1 or (not hosts and version == "1.1"):
        raise FramingError(R400, "HTTP/1.1 needs exactly one Host")
    length = 0
    body: ChunkedBody | None = None
    if te:
        if version == "1.0":
            raise FramingError(R400, "Transfer-Encoding in an HTTP/1.0 request")
        if cl:
            raise FramingError(R400, "Content-Length with Transfer-Encoding")
        _transfer_encoding(te, R400)
        if upgrade:
            raise FramingError(R400, "a chunked body on an upgrade request")
        body = ChunkedBody(parser, reader, max_body, R400)
    elif cl:
        length = _content_length(cl, R400)
        if 0 < max_body < length:
            raise FramingError(R413, "body larger than max_body_size")
    return RequestHead(reader, parser, hosts[0].lower() if hosts else b"", length, body, upgrade,
                       hop_by_hop and not upgrade and version == "1.1", version == "1.0")


class ResponseHead:
    """What the proxy needs of a response head that passed every check."""

    __slots__ = ("body", "hop_by_hop", "keepalive", "length", "status")

    def __init__(self, status: int, keepalive: bool, length: int | None,
                 body: ChunkedBody | None, hop_by_hop: bool = False) -> None:
        self.status = status
        self.keepalive = keepalive  # the backend's connection persists after this response
        self.length = length  # Content-Length, or None (chunked, or delimited by close)
        self.body = body
        self.hop_by_hop = hop_by_hop  # the head has HOP_BY_HOP lines (see with_connection)


def read_response_head(head: bytes) -> ResponseHead:
    """Parse and check a backend's response head; ``FramingError(R502)`` if it is ambiguous."""
    if len(head) > MAX_HEAD or _bad_bytes(head):
        raise FramingError(R502, "response head too large or with a control character")
    reader = _Reader()
    parser = HttpResponseParser(reader)
    reader.parser = parser
    try:
        parser.feed_data(head)
    except HttpParserUpgrade:
        pass  # 101: the tunnel starts after the head
    except HttpParserError as e:
        raise _llhttp_error(e, head, R502) from None
    finally:
        reader.parser = None  # see _Reader.parser
    if not reader.complete:
        raise FramingError(R502, "incomplete response head")
    version = parser.get_http_version()
    status = parser.get_status_code()
    if version not in ("1.1", "1.0") or not 100 <= status <= 599:
        raise FramingError(R502, f"HTTP version {version}, status {status}")
    te: list[bytes] = []
    cl: list[bytes] = []
    hop_by_hop = False
    for name, value in reader.headers:
        if name == b"transfer-encoding":
            te.append(value)
        elif name == b"content-length":
            cl.append(value)
        elif name in HOP_BY_HOP:
            hop_by_hop = True
    if te:
        if version == "1.0" or cl:
            raise FramingError(R502, "Transfer-Encoding in HTTP/1.0 or with Content-Length")
        _transfer_encoding(te, R502)
        return ResponseHead(status, reader.keepalive, None,
                            ChunkedBody(parser, reader, 0, R502), hop_by_hop)
    if cl:
        return ResponseHead(status, reader.keepalive, _content_length(cl, R502), None,
                            hop_by_hop)
    return ResponseHead(status, reader.keepalive, None, None, hop_by_hop)


# ChunkedBody states
_SIZE, _DATA, _CRLF, _TRAILER = range(4)


class ChunkedBody:
    """Finds the end of a chunked body without decoding it; llhttp parses the same bytes.

    Chunk sizes must be 1*HEXDIG (at most 16), each line must end in CRLF, each chunk's data
    in CRLF; llhttp, fed the same bytes, checks extensions and trailer fields and must finish
    the message on exactly the byte where this walk does.
    """

    __slots__ = ("crlf", "done", "limit", "line", "parser", "reader", "refuse", "remaining",
                 "state", "total", "trailer")

    def __init__(self, parser: HttpRequestParser | HttpResponseParser, reader: _Reader,
                 limit: int, refuse: bytes) -> None:
        self.parser = parser
        self.reader = reader
        self.limit = limit  # data bytes allowed (0: no limit)
        self.refuse = refuse
        self.state = _SIZE
        self.remaining = 0
        self.crlf = 0  # bytes of a chunk's closing CRLF seen
        self.line = b""
        self.total = 0
        self.trailer = 0  # trailer bytes so far
        self.done = False

    def feed(self, data: bytes | bytearray, pos: int = 0) -> int:
        """Consume ``data[pos:]`` up to the end of the body; return the index after it.

        Raises ``FramingError`` on a malformed body, one over the limit (413), or if llhttp
        disagrees."""
        start = pos
        pos = self._walk(data, pos)
        view = memoryview(data)
        reader = self.reader
        try:
            if self.done:
                # llhttp must not have ended the message before the last byte, and must on it
                if pos - 1 > start:
                    self.parser.feed_data(view[start : pos - 1])
                if reader.messages == 0:
                    self.parser.feed_data(view[pos - 1 : pos])
                if reader.messages != 1:
                    raise FramingError(self.refuse, "llhttp ends the chunked body elsewhere")
            elif pos > start:
                self.parser.feed_data(view[start:pos])
                if reader.messages:
                    raise FramingError(self.refuse, "llhttp ends the chunked body elsewhere")
        except HttpParserError as e:
            raise FramingError(self.refuse, f"llhttp: {e}") from None
        finally:
            view.release()
        return pos

    def _walk(self, data: bytes | bytearray, pos: int) -> int:
        n = len(data)
        while pos < n and not self.done:
            state = self.state
            if state == _DATA:
                take = min(self.remaining, n - pos)
                pos += take
                self.remaining -= take
                if self.remaining == 0:
                    self.state = _CRLF
                continue
            if state == _CRLF:
                if data[pos] != (13, 10)[self.crlf]:
                    raise FramingError(self.refuse, "chunk data not followed by CRLF")
                pos += 1
                self.crlf += 1
                if self.crlf == 2:
                    self.crlf = 0
                    self.state = _SIZE
                continue
            i = data.find(b"\n", pos)
            if i < 0:
                self.line += bytes(data[pos:])
                if len(self.line) > MAX_CHUNK_LINE:
                    raise FramingError(self.refuse, "chunk line too long")
                return n
            line = self.line + bytes(data[pos:i])
            self.line = b""
            pos = i + 1
            if len(line) > MAX_CHUNK_LINE or not line.endswith(b"\r"):
                raise FramingError(self.refuse, "chunk line too long or without CRLF")
            line = line[:-1]
            if state == _SIZE:
                size, semi, _ = line.partition(b";")
                if _HEX.fullmatch(size) is None or (not semi and len(size) != len(line)):
                    raise FramingError(self.refuse, "chunk size is not 1*HEXDIG")
                n_size = int(size, 16)
                if n_size == 0:
                    self.state = _TRAILER
                else:
                    self.total += n_size
                    if 0 < self.limit < self.total:
                        raise FramingError(R413, "body larger than max_body_size")
                    self.remaining = n_size
                    self.state = _DATA
            else:  # _TRAILER: fields, then an empty line ends the message
                self.trailer += len(line) + 2
                if self.trailer > MAX_HEAD:
                    raise FramingError(R431 if self.refuse is R400 else self.refuse,
                                       "trailer section too large")
                if not line:
                    self.done = True
        return pos
