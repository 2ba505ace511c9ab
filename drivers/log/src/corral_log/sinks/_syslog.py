"""Syslog sink: RFC 5424 (or BSD, RFC 3164) messages over UDP (RFC 5426), TCP with octet
counting (RFC 6587) or a unix socket (datagram like /dev/log, or stream with octet counting)."""

from __future__ import annotations

import errno
import select
import socket
import time
from urllib.parse import urlsplit

from corral_log.records import Chunk, Record
from corral_log.sinks._base import SinkUnavailable

FACILITIES = {
    "kern": 0,
    "user": 1,
    "mail": 2,
    "daemon": 3,
    "auth": 4,
    "syslog": 5,
    "lpr": 6,
    "news": 7,
    "uucp": 8,
    "cron": 9,
    "authpriv": 10,
    "ftp": 11,
    **{f"local{i}": 16 + i for i in range(8)},
}
SEVERITY = {"stdout": 6, "stderr": 3, "corral": 4}  # info, err, warning
SD_ID = "corral@32473"  # 32473: the private enterprise number reserved for examples (RFC 5612)


def _header_field(value: str, limit: int) -> str:
    """A header field: printable US-ASCII without spaces, at most ``limit`` chars, or '-'."""
    clean = "".join(c if 33 <= ord(c) <= 126 else "_" for c in value)[:limit]
    return clean or "-"


def _sd_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def format_5424(record: Record, *, facility: int, hostname: str) -> bytes:
    """One RFC 5424 message (no framing). Time is cut to microseconds, the RFC's maximum."""
    pri = facility * 8 + SEVERITY.get(record.stream, 5)
    sec, ns = divmod(record.time_ns, 1_000_000_000)
    ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)) + f".{ns // 1000:06d}Z"
    partial = ' partial="1"' if record.partial else ""
    sd = (
        f'[{SD_ID} instance="{_sd_value(record.instance)}" '
        f'process="{_sd_value(record.process)}"{partial}]'
    )
    head = (
        f"<{pri}>1 {ts} {_header_field(hostname, 255)} {_header_field(record.app, 48)} "
        f"{_header_field(record.instance, 128)} {_header_field(record.stream, 32)} {sd} "
    )
    return head.encode() + record.message.encode("utf-8", "replace")


def format_3164(record: Record, *, facility: int, hostname: str) -> bytes:
    """One BSD syslog message (RFC 3164): local-less UTC time, ``tag[procid]: msg``."""
    pri = facility * 8 + SEVERITY.get(record.stream, 5)
    ts = time.strftime("%b %d %H:%M:%S", time.gmtime(record.time_ns // 1_000_000_000))
    ts = ts[:4] + (ts[4:6].replace("0", " ", 1) if ts[4] == "0" else ts[4:6]) + ts[6:]
    tag = _header_field(record.app, 32)
    head = f"<{pri}>{ts} {_header_field(hostname, 255)} {tag}[{record.instance}]: "
    return head.encode() + record.message.encode("utf-8", "replace")


class SyslogSink:
    """Sends each record as one RFC 5424 message (``format="rfc3164"``: a BSD syslog message,
    for receivers that only read the old format) to ``address``.

    TCP and unix-stream frame messages with octet counting; before each chunk the connection
    is checked for an orderly close by the receiver, so a stopped receiver is noticed before
    data is written into a dead connection. Neither UDP nor TCP syslog acknowledges messages:
    a receiver that dies with unread data in its socket loses it. HTTP (Loki) does not have
    this gap.
    """

    def __init__(
        self,
        name: str,
        address: str,
        *,
        facility: str = "user",
        hostname: str | None = None,
        max_datagram: int = 8192,
        timeout_s: float = 5.0,
        format: str = "rfc5424",
    ) -> None:
        if facility not in FACILITIES:
            raise ValueError(f"unknown syslog facility {facility!r}; known: {sorted(FACILITIES)}")
        self.name = name
        self.address = address
        self.format = format_3164 if format == "rfc3164" else format_5424
        self.facility = FACILITIES[facility]
        self.hostname = hostname or socket.gethostname()
        self.max_datagram = max_datagram
        self.timeout_s = timeout_s
        url = urlsplit(address)
        self.scheme = url.scheme
        if url.scheme in ("udp", "tcp"):
            if url.hostname is None or url.port is None:
                raise ValueError(f"syslog address {address!r} needs host and port")
            self.target: tuple[str, int] | str = (url.hostname, url.port)
        elif url.scheme == "unix":
            self.target = url.path
        else:
            raise ValueError(f"syslog address {address!r}: scheme must be udp, tcp or unix")
        self.sock: socket.socket | None = None
        self.stream = url.scheme == "tcp"

    def _connect(self) -> socket.socket:
        try:
            if self.scheme == "udp":
                assert isinstance(self.target, tuple)
                info = socket.getaddrinfo(*self.target, type=socket.SOCK_DGRAM)[0]
                s = socket.socket(info[0], socket.SOCK_DGRAM)
                s.connect(info[4])
            elif self.scheme == "tcp":
                assert isinstance(self.target, tuple)
                s = socket.create_connection(self.target, timeout=self.timeout_s)
            else:
                assert isinstance(self.target, str)
                s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                try:
                    s.connect(self.target)
                    self.stream = False
                except OSError as exc:
                    s.close()
                    if exc.errno != errno.EPROTOTYPE:
                        raise
                    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    s.connect(self.target)
                    self.stream = True
            s.settimeout(self.timeout_s)
            return s
        except OSError as exc:
            raise SinkUnavailable(f"syslog {self.address}: {exc}") from exc

    def _peer_closed(self, s: socket.socket) -> bool:
        """True if a stream receiver has closed its end (readable with EOF or an error)."""
        if not self.stream:
            return False
        r, _, _ = select.select([s], [], [], 0)
        if not r:
            return False
        try:
            return s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except OSError:
            return True

    def __call__(self, chunk: Chunk) -> None:
        """Send every record; on any socket error drop the connection and raise."""
        s = self.sock
        if s is not None and self._peer_closed(s):
            s.close()
            s = self.sock = None
        if s is None:
            s = self.sock = self._connect()
        msgs = [
            self.format(r, facility=self.facility, hostname=self.hostname) for r in chunk.records()
        ]
        try:
            if self.stream:
                s.sendall(b"".join(b"%d %s" % (len(m), m) for m in msgs))
            else:
                for m in msgs:
                    s.send(m[: self.max_datagram])
        except OSError as exc:
            s.close()
            self.sock = None
            raise SinkUnavailable(f"syslog {self.address}: {exc}") from exc

    def close(self) -> None:
        """Close the socket."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
