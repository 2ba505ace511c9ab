"""Reading an app's default log files back for ``corral logs`` (``query.log.read``).

History of any size is read in pages, each under one CDP/1 body: a paged read (``cursor``
given, ``""`` for the first page) answers the oldest part of the selection that fits and a
``next`` cursor to ask for the rest, so neither the driver nor the client ever holds more
than one page (``journalctl`` streams the same way). A read without ``cursor`` answers one
reply: the newest part that fits, ``truncated`` saying how many older records were left out.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import json
import os
import re
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, cast

from corral.errors import CorralError, ErrorCode
from corral.protocol import MAX_BODY
from corral.units import UnitError, parse_since
from corral_log.records import decode_line, iso_ns

DEFAULT_NAME = "app.log"
REPLY_BUDGET = MAX_BODY - (64 << 10)  # room for the envelope around the records
HEAD_BYTES = 96  # a file is known by the start of its first line (a rotation keeps it)


def app_log_dir(home: Path, app: str) -> Path:
    """Where the default sink writes an app's files."""
    return home / "logs" / app


def since_ns(since: str | int | float | None, now_ns: int | None = None) -> int | None:
    """``since`` as epoch ns (``corral.units.parse_since``: an ISO time, a duration back from
    now such as "1h30m", or epoch seconds); None when unset; INVALID when unreadable."""
    if since is None or since == "":
        return None
    try:
        return parse_since(since, now_ns)
    except UnitError as exc:
        raise CorralError(f"since: {exc}", code=ErrorCode.INVALID, retry=False) from None


def _files(directory: Path) -> list[Path]:
    """Rotated files oldest first, then the current file."""
    if not directory.is_dir():
        return []
    rotated = sorted(
        p
        for p in directory.iterdir()
        if p.name.startswith(DEFAULT_NAME + "-") and not p.name.endswith(".tmp")
    )
    current = directory / DEFAULT_NAME
    return [*rotated, *([current] if current.exists() else [])]


def _open(path: Path) -> BinaryIO | None:
    try:
        if path.name.endswith(".gz"):
            return cast(BinaryIO, gzip.open(path, "rb"))
        return open(path, "rb")
    except OSError:
        return None  # rotated away or pruned meanwhile


def _head(path: Path) -> bytes:
    """The start of the file's first line ('' when empty or unreadable)."""
    f = _open(path)
    if f is None:
        return b""
    try:
        with f:
            return f.readline(HEAD_BYTES).rstrip(b"\n")
    except (OSError, EOFError):
        return b""


@dataclass(frozen=True)
class _Source:
    """One file of the app's history and the head that identifies it across a rotation (the
    current file renamed to ``app.log-<stamp>`` then compressed keeps its first line and its
    uncompressed offsets)."""

    path: Path
    head: bytes


def _sources(home: Path, app: str) -> list[_Source]:
    out: list[_Source] = []
    for path in _files(app_log_dir(home, app)):
        head = _head(path)
        if not head:
            continue
        if out and out[-1].head == head:
            continue  # a rotation caught between compressing and removing the plain copy
        out.append(_Source(path, head))
    return out


def _lines(source: _Source, offset: int = 0) -> Iterator[tuple[int, bytes]]:
    """(offset, line without its newline) from ``offset`` on."""
    f = _open(source.path)
    if f is None:
        return
    try:
        with f:
            if offset:
                f.seek(offset)
            pos = offset
            for raw in f:
                yield pos, raw.rstrip(b"\n")
                pos += len(raw)
    except (OSError, EOFError):
        return  # a file rotated away or being compressed while we read


@dataclass(frozen=True)
class _Filter:
    """The selection: since, instance (id or process type), grep (regex on the message)."""

    start_iso: bytes | None
    pattern: re.Pattern[str] | None
    instance: bytes | None
    proc_prefix: bytes | None

    @classmethod
    def of(cls, app: str, start: int | None, grep: str | None, instance: str | None
           ) -> _Filter:
        try:
            pattern = re.compile(grep) if grep else None
        except re.error as exc:
            raise CorralError(f"grep: not a regular expression: {exc}", code=ErrorCode.INVALID,
                              retry=False) from None
        return cls(
            iso_ns(start).encode() if start is not None else None,
            pattern,
            instance.encode() if instance else None,
            f"{app}.{instance}.".encode() if instance else None,
        )

    def __call__(self, line: bytes) -> bool:
        if self.start_iso is not None and line[:30] < self.start_iso:
            return False
        if self.instance is not None:
            tok = line[31 : line.find(b" ", 31)]
            if tok != self.instance and not (
                self.proc_prefix and tok.startswith(self.proc_prefix)
            ):
                return False
        if self.pattern is not None:
            msg = line.split(b" ", 3)[-1].decode("utf-8", "replace")
            if not self.pattern.search(msg):
                return False
        return True


@dataclass(frozen=True)
class Cursor:
    """Where a paged read goes on: the file (by head), the offset of the next line in it, how
    many records are still wanted, and the resolved ``since`` (so "1h" does not move)."""

    head: bytes
    offset: int
    left: int
    start: int | None

    def encode(self) -> str:
        """An opaque, URL-safe token."""
        doc = {"h": base64.b64encode(self.head).decode(), "o": self.offset, "l": self.left,
               "s": self.start}
        return base64.urlsafe_b64encode(json.dumps(doc, separators=(",", ":")).encode()).decode()

    @classmethod
    def decode(cls, token: str) -> Cursor:
        """The cursor a token stands for; INVALID when it is not one of ours."""
        try:
            doc = json.loads(base64.urlsafe_b64decode(token.encode()))
            head = base64.b64decode(doc["h"])
            offset, left, start = int(doc["o"]), int(doc["l"]), doc["s"]
            if offset < 0 or left < 1 or not (start is None or isinstance(start, int)):
                raise ValueError
        except (ValueError, KeyError, TypeError, binascii.Error):
            raise CorralError("cursor: not a cursor of query.log.read", code=ErrorCode.INVALID,
                              retry=False) from None
        return cls(head, offset, left, start)


def _item(app: str, line: bytes, as_json: bool) -> tuple[Any, int] | None:
    """A record (or raw line) ready for the reply, and its size in the reply's JSON."""
    if as_json:
        rec = decode_line(app, line)
        if rec is None:
            return None
        item: Any = rec.to_dict()
    else:
        item = line.decode("utf-8", "replace")
    return item, len(json.dumps(item)) + 2  # the codec's output is never larger


def read_logs(
    home: Path,
    app: str,
    *,
    since: str | int | float | None = None,
    grep: str | None = None,
    instance: str | None = None,
    limit: int = 200,
    as_json: bool = True,
    cursor: str | None = None,
    budget: int = REPLY_BUDGET,
) -> dict[str, Any]:
    """The last ``limit`` records matching the filters, oldest first, in replies of at most
    ``budget`` bytes.

    ``grep`` is a regular expression searched in the message; ``instance`` matches an
    instance id or a process type (``web`` matches ``shop.web.1``). Without ``cursor``: one
    reply, the newest that fit, ``truncated`` = how many older ones were left out. With
    ``cursor`` (``""`` for the first page): the oldest that fit and, while more follow,
    ``next`` (send it back as ``cursor`` with the same filters)."""
    if limit < 1:
        raise CorralError("limit: expected a number of records >= 1", code=ErrorCode.INVALID,
                          retry=False)
    sources = _sources(home, app)
    key = "records" if as_json else "lines"
    if cursor:
        cur = Cursor.decode(cursor)
        flt = _Filter.of(app, cur.start, grep, instance)
        return _page(app, sources, flt, cur.head, cur.offset, cur.left, cur.start, as_json,
                     budget, key)
    start = since_ns(since)
    flt = _Filter.of(app, start, grep, instance)
    # first pass: how many match in each file, so the second starts at the last `limit`
    counts = [sum(1 for _, line in _lines(s) if flt(line)) for s in sources]
    skip = max(0, sum(counts) - limit)
    first = 0
    while first < len(sources) and skip >= counts[first]:  # whole files before the start
        skip -= counts[first]
        first += 1
    wanted = min(limit, sum(counts))
    if cursor is not None:  # "": the first page of a paged read
        if first >= len(sources) or wanted == 0:
            return {"app": app, key: []}
        src = sources[first]
        offset = 0
        for pos, line in _lines(src):
            if flt(line):
                if skip == 0:
                    offset = pos
                    break
                skip -= 1
        return _page(app, sources, flt, src.head, offset, wanted, start, as_json, budget, key)
    # one reply: keep the newest that fit, a bounded window
    out: deque[tuple[Any, int]] = deque()
    size = truncated = sent = 0
    for src in sources[first:]:
        for _, line in _lines(src):
            if sent >= wanted:
                break
            if not flt(line):
                continue
            if skip:
                skip -= 1
                continue
            sent += 1
            item = _item(app, line, as_json)
            if item is None:
                continue
            out.append(item)
            size += item[1]
            while size > budget:
                size -= out.popleft()[1]
                truncated += 1
    res: dict[str, Any] = {"app": app, key: [i for i, _ in out]}
    if truncated:
        res["truncated"] = truncated
    return res


def _page(
    app: str,
    sources: list[_Source],
    flt: _Filter,
    head: bytes,
    offset: int,
    left: int,
    start: int | None,
    as_json: bool,
    budget: int,
    key: str,
) -> dict[str, Any]:
    """Up to ``left`` matching records from (file ``head``, ``offset``) on, within budget."""
    at = next((i for i, s in enumerate(sources) if s.head == head), None)
    if at is None:
        # the file was pruned (``default_keep``) while the client paged: go on from the
        # oldest file left, say so
        at, offset = 0, 0
        gap = True
    else:
        gap = False
    items: list[Any] = []
    size = 0
    for i in range(at, len(sources)):
        for pos, line in _lines(sources[i], offset if i == at else 0):
            if not flt(line):
                continue
            item = _item(app, line, as_json)
            if item is None:
                continue
            if size + item[1] > budget and items:
                res: dict[str, Any] = {"app": app, key: items, "next": Cursor(
                    sources[i].head, pos, left, start).encode()}
                return {**res, "gap": True} if gap else res
            items.append(item[0])
            size += item[1]
            left -= 1
            if left == 0:
                return {"app": app, key: items, **({"gap": True} if gap else {})}
    return {"app": app, key: items, **({"gap": True} if gap else {})}


def disk_usage(home: Path, app: str) -> int:
    """Bytes the app's default files take."""
    return sum(os.stat(p).st_size for p in _files(app_log_dir(home, app)) if p.exists())
