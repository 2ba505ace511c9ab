"""Reading an app's default log files back for ``corral logs`` (``query.log.read``)."""

from __future__ import annotations

import gzip
import os
import re
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from corral.errors import CorralError, ErrorCode
from corral.units import UnitError, parse_since
from corral_log.records import decode_line, iso_ns

DEFAULT_NAME = "app.log"


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


def _lines(path: Path) -> Iterator[bytes]:
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            yield from f
    except (OSError, EOFError):
        return  # a file rotated away or being compressed while we read


def read_logs(
    home: Path,
    app: str,
    *,
    since: str | int | float | None = None,
    grep: str | None = None,
    instance: str | None = None,
    limit: int = 200,
    as_json: bool = True,
) -> dict[str, Any]:
    """The last ``limit`` records matching the filters, oldest first.

    ``grep`` is a regular expression searched in the message; ``instance`` matches an
    instance id or a process type (``web`` matches ``shop.web.1``)."""
    start = since_ns(since)
    start_iso = iso_ns(start).encode() if start is not None else None
    pattern = re.compile(grep) if grep else None
    inst_b = instance.encode() if instance else None
    proc_prefix = f"{app}.{instance}.".encode() if instance else None
    out: deque[bytes] = deque(maxlen=max(1, limit))
    scanned = 0
    for path in _files(app_log_dir(home, app)):
        for raw in _lines(path):
            scanned += 1
            line = raw.rstrip(b"\n")
            if start_iso is not None and line[:30] < start_iso:
                continue
            if inst_b is not None:
                tok = line[31 : line.find(b" ", 31)]
                if tok != inst_b and not (proc_prefix and tok.startswith(proc_prefix)):
                    continue
            if pattern is not None:
                msg = line.split(b" ", 3)[-1].decode("utf-8", "replace")
                if not pattern.search(msg):
                    continue
            out.append(line)
    if as_json:
        records = [r.to_dict() for raw in out if (r := decode_line(app, raw)) is not None]
        return {"app": app, "records": records, "scanned": scanned}
    return {
        "app": app,
        "lines": [raw.decode("utf-8", "replace") for raw in out],
        "scanned": scanned,
    }


def disk_usage(home: Path, app: str) -> int:
    """Bytes the app's default files take."""
    return sum(os.stat(p).st_size for p in _files(app_log_dir(home, app)) if p.exists())
