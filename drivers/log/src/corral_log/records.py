"""Log records and the one text encoding they are stored in (default files, spools, file sinks).

A stored line is ``<time> <instance> <stream> <message>\\n``: ``time`` is UTC ISO 8601 with
nanoseconds (30 characters, so it sorts and compares as text), ``stream`` is ``out``, ``err``
or ``sys`` (records the driver itself emits), followed by ``+`` when the record is a fragment
that the next record of the same stream continues (a line cut at the length cap, or flushed
unterminated). The message is the app's bytes, unchanged (no newline by construction).
"""

from __future__ import annotations

import calendar
import json
import time
from dataclasses import dataclass, field
from typing import Any

STREAM_TOKENS = {"stdout": b"out", "stderr": b"err", "corral": b"sys"}
TOKEN_STREAMS = {v.decode(): k for k, v in STREAM_TOKENS.items()}
DRIVER_INSTANCE = "corral-log"
"""Instance token of records the driver emits itself (drops, outages, skipped sinks)."""


def iso_ns(time_ns: int) -> str:
    """UTC ISO 8601 with nanoseconds, e.g. ``2024-05-01T12:00:00.123456789Z`` (30 chars)."""
    sec, ns = divmod(time_ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)) + f".{ns:09d}Z"


def parse_iso_ns(text: str) -> int:
    """Inverse of :func:`iso_ns`; also accepts a shorter fraction or none (``...:00Z``)."""
    base, _, frac = text.rstrip("Z").partition(".")
    sec = calendar.timegm(time.strptime(base, "%Y-%m-%dT%H:%M:%S"))
    return sec * 1_000_000_000 + int((frac + "000000000")[:9] or 0)


def process_of(app: str, instance: str) -> str:
    """The process type in an instance id ``<app>.<process>.<index>`` (``corral`` for ours)."""
    if instance == DRIVER_INSTANCE:
        return "corral"
    rest = instance[len(app) + 1 :] if instance.startswith(app + ".") else instance
    return rest.split(".", 1)[0]


@dataclass(slots=True)
class Record:
    """One log record: who wrote it, when it was read, and the line itself."""

    app: str
    instance: str
    stream: str
    time_ns: int
    message: str
    partial: bool = False
    process: str = ""
    _fields: dict[str, Any] | None = field(default=None, repr=False)
    _parsed: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        if not self.process:
            self.process = process_of(self.app, self.instance)

    @property
    def fields(self) -> dict[str, Any] | None:
        """The parsed object when the message is a JSON object line, else None."""
        if not self._parsed:
            self._parsed = True
            m = self.message
            if m.startswith("{") and m.rstrip().endswith("}"):
                try:
                    value = json.loads(m)
                except ValueError:
                    value = None
                self._fields = value if isinstance(value, dict) else None
        return self._fields

    def to_dict(self) -> dict[str, Any]:
        """The record as JSON-ready data (the shape of query results and tail events)."""
        out: dict[str, Any] = {
            "app": self.app,
            "process": self.process,
            "instance": self.instance,
            "stream": self.stream,
            "time_ns": self.time_ns,
            "time": iso_ns(self.time_ns),
            "message": self.message,
        }
        if self.partial:
            out["partial"] = True
        if self.fields is not None:
            out["fields"] = self.fields
        return out

    def encode(self) -> bytes:
        """This record as one stored text line."""
        tok = STREAM_TOKENS[self.stream] + (b"+" if self.partial else b"")
        return b"%s %s %s %s\n" % (
            iso_ns(self.time_ns).encode(),
            self.instance.encode(),
            tok,
            self.message.encode("utf-8", "replace"),
        )


def encode_lines(
    instance: str, stream: str, time_ns: int, lines: list[bytes], partial: frozenset[int]
) -> bytes:
    """Encode lines of one stream read at one instant; the hot path (joins, no per-line work)."""
    if not lines:
        return b""
    tok = STREAM_TOKENS[stream]
    prefix = b"%s %s %s " % (iso_ns(time_ns).encode(), instance.encode(), tok)
    if not partial:
        return prefix + (b"\n" + prefix).join(lines) + b"\n"
    cont = b"%s %s %s+ " % (iso_ns(time_ns).encode(), instance.encode(), tok)
    return b"".join(
        (cont if i in partial else prefix) + line + b"\n" for i, line in enumerate(lines)
    )


def encode_block(instance: str, stream: str, time_ns: int, block: bytes) -> bytes:
    """Encode newline-separated complete lines (no final newline) in one pass."""
    prefix = b"%s %s %s " % (iso_ns(time_ns).encode(), instance.encode(), STREAM_TOKENS[stream])
    return b"".join((prefix, block.replace(b"\n", b"\n" + prefix), b"\n"))  # one copy


def decode_line(app: str, line: bytes, _cache: dict[bytes, int] = {}) -> Record | None:  # noqa: B006
    """Parse one stored line (without its newline); None if it is not in the stored format."""
    parts = line.split(b" ", 3)
    if len(parts) < 3:
        return None
    ts, inst, tok = parts[0], parts[1], parts[2]
    msg = parts[3] if len(parts) == 4 else b""
    t = _cache.get(ts)
    if t is None:
        try:
            t = parse_iso_ns(ts.decode())
        except ValueError:
            return None
        if len(_cache) > 4096:
            _cache.clear()
        _cache[ts] = t
    token = tok.decode(errors="replace")
    partial = token.endswith("+")
    stream = TOKEN_STREAMS.get(token.rstrip("+"))
    if stream is None:
        return None
    return Record(
        app=app,
        instance=inst.decode(errors="replace"),
        stream=stream,
        time_ns=t,
        message=msg.decode("utf-8", "replace"),
        partial=partial,
    )


@dataclass(slots=True)
class Chunk:
    """Stored text lines of one app handed to a sink: the bytes, and records parsed on demand."""

    app: str
    encoded: bytes
    _records: list[Record] | None = None

    def records(self) -> list[Record]:
        """The records in this chunk, in order (parsed once, lazily)."""
        if self._records is None:
            out = []
            for line in self.encoded.split(b"\n"):
                if line:
                    rec = decode_line(self.app, line)
                    if rec is not None:
                        out.append(rec)
            self._records = out
        return self._records

    @classmethod
    def of(cls, records: list[Record]) -> Chunk:
        """A chunk made of records (driver notices, tests)."""
        app = records[0].app if records else ""
        return cls(app, b"".join(r.encode() for r in records), records)
