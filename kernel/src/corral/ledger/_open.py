"""Choose a ledger backend from a URL: ``sqlite:``, ``sqlite:///abs/path``,
``etcd://h1:2379,h2:2379,h3:2379`` (``etcds://`` for TLS)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from corral.errors import CorralError, ErrorCode
from corral.ledger._base import Ledger
from corral.ledger._sqlite import SqliteLedger, Synchronous

DEFAULT_FILE = "ledger.sqlite3"
"""The ledger's file name under the corral home when the URL is plain ``sqlite:``."""


def open_ledger(url: str, home: Path) -> Ledger:
    """Open the ledger that ``url`` names; ``sqlite:`` means ``<home>/ledger.sqlite3``.

    ``sqlite:///abs/path`` names a file; ``?synchronous=full`` trades throughput for commits
    that survive power loss (see ``corral.ledger._sqlite``). ``etcd://`` names the members of an
    etcd cluster (see ``corral.ledger._etcd``).
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "sqlite":
        return _open_sqlite(url, parts.netloc, parts.path, parts.query, home)
    if scheme in {"etcd", "etcds"}:
        return _open_etcd(url, parts.netloc, parts.path, parts.query, tls=scheme == "etcds")
    raise _bad(url, "unknown scheme; expected 'sqlite:' or 'sqlite:///absolute/path'")


def _open_sqlite(url: str, netloc: str, path: str, query: str, home: Path) -> SqliteLedger:
    if netloc:
        raise _bad(url, "a host is not allowed; write 'sqlite:///absolute/path' (three slashes)")
    if not path:
        file = Path(home) / DEFAULT_FILE
    elif path.startswith("/"):
        file = Path(path)
    else:
        raise _bad(url, "the path must be absolute: 'sqlite:///absolute/path'")
    options = parse_qs(query, keep_blank_values=True, strict_parsing=False)
    unknown = sorted(set(options) - {"synchronous"})
    if unknown:
        raise _bad(url, f"unknown option(s) {', '.join(unknown)}; known: synchronous")
    synchronous: Synchronous = "NORMAL"
    if "synchronous" in options:
        value = options["synchronous"][-1].upper()
        if value == "FULL":
            synchronous = "FULL"
        elif value != "NORMAL":
            raise _bad(url, f"synchronous must be 'normal' or 'full', got {value.lower()!r}")
    return SqliteLedger(file, synchronous=synchronous)


def _open_etcd(url: str, netloc: str, path: str, query: str, *, tls: bool) -> Ledger:
    from corral.ledger._etcd import EtcdLedger

    if path not in ("", "/") or query:
        raise _bad(url, "write etcd://HOST:PORT[,HOST:PORT...] (no path, no options)")
    endpoints: list[tuple[str, int]] = []
    for item in netloc.split(","):
        host, sep, port = item.rpartition(":")
        if not sep:
            host, port = item, "2379"
        host = host.strip("[]")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise _bad(url, f"{item!r} is not HOST:PORT")
        endpoints.append((host, int(port)))
    return EtcdLedger(endpoints, tls=tls)


def _bad(url: str, why: str) -> CorralError:
    return CorralError(f"ledger URL {url!r}: {why}", code=ErrorCode.INVALID, retry=False)
