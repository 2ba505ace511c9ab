"""One net driver per set of names on a host: a claim file held with ``flock``.

Several kernels may run on one host (side-by-side installs, test suites). Each net driver
rebuilds its nft tables wholesale and garbage-collects the namespaces and links matching its
prefixes, so two drivers sharing a table, overlapping prefixes or overlapping address pools
would silently destroy each other's state. Before touching the host a driver claims its
names in ``/run/corral-net/<table>.claim`` (an exclusive ``flock``, released by the kernel
when the process dies, so a crash leaves nothing stale) and refuses, naming the other
driver, when a live claim overlaps.

On a ledger several hosts share, the driver hands out addresses from its host's slice of the
pools only (``corral_net.subnets``), but it claims the whole configured pools here: it also
keeps the routes to the other hosts' slices (``corral_net.routes``), which a second driver on
the same pools would fight over.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
from pathlib import Path
from typing import Any

from corral.errors import CorralError, ErrorCode
from corral_net.config import NetConfig

CLAIMS_DIR = Path("/run/corral-net")


def _overlap(a: str, b: str) -> bool:
    return a.startswith(b) or b.startswith(a)


def conflicts(mine: NetConfig, other: dict[str, Any]) -> list[str]:
    """What ``mine`` shares with another driver's claim (empty: they can coexist)."""
    found = []
    if other.get("table") == mine.table:
        found.append(f"nft table {mine.table!r}")
    if _overlap(str(other.get("netns_prefix", "")), mine.netns_prefix):
        found.append(f"netns_prefix {mine.netns_prefix!r} ~ {other.get('netns_prefix')!r}")
    if _overlap(str(other.get("link_prefix", "")), mine.link_prefix):
        found.append(f"link_prefix {mine.link_prefix!r} ~ {other.get('link_prefix')!r}")
    with contextlib.suppress(ValueError, TypeError):
        if ipaddress.IPv4Network(other["pool4"]).overlaps(mine.pool4):
            found.append(f"pool4 {mine.pool4} ~ {other['pool4']}")
    with contextlib.suppress(ValueError, TypeError, KeyError):
        if mine.pool6 is not None and other.get("pool6") and ipaddress.IPv6Network(
                other["pool6"]).overlaps(mine.pool6):
            found.append(f"pool6 {mine.pool6} ~ {other['pool6']}")
    return found


class HostClaim:
    """This driver's claim on its table, prefixes and pools; held until ``release``."""

    def __init__(self, config: NetConfig, directory: Path = CLAIMS_DIR) -> None:
        self.config = config
        self.directory = directory
        self.path = directory / f"{config.table}.claim"
        self._fd: int | None = None

    def acquire(self) -> None:
        """Claim, or raise ``CorralError`` (conflict) naming the live driver in the way."""
        if self._fd is not None:
            return
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = self._lock()
        try:
            for other in sorted(self.directory.glob("*.claim")):
                if other == self.path or not _held(other):
                    continue
                data = _read(other)
                clash = conflicts(self.config, data)
                if clash:
                    raise CorralError(
                        f"[drivers.net] overlaps the live net driver of pid {data.get('pid')} "
                        f"({other}): {'; '.join(clash)}; give each kernel on a host its own "
                        "table, netns_prefix, link_prefix and pools", code=ErrorCode.CONFLICT)
            c = self.config
            body = json.dumps({"pid": os.getpid(), "table": c.table,
                               "netns_prefix": c.netns_prefix, "link_prefix": c.link_prefix,
                               "pool4": str(c.pool4),
                               "pool6": str(c.pool6) if c.pool6 is not None else None})
            os.ftruncate(fd, 0)
            os.pwrite(fd, body.encode(), 0)
        except BaseException:
            _drop(self.path, fd)
            raise
        self._fd = fd

    def _lock(self) -> int:
        """Open and lock our claim file; the file must still be the one at the path after
        locking (a releasing driver unlinks it while it holds the lock)."""
        for _attempt in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                holder = _read(self.path).get("pid", "?")
                raise CorralError(
                    f"[drivers.net] nft table {self.config.table!r} is used by another net "
                    f"driver (pid {holder}, claim {self.path}); give each kernel on a host its "
                    "own table, netns_prefix, link_prefix and pools", code=ErrorCode.CONFLICT,
                ) from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)
        raise CorralError(f"[drivers.net] cannot claim {self.path}: it keeps changing",
                          code=ErrorCode.CONFLICT, retry=True)

    def release(self) -> None:
        """Drop the claim and remove its file."""
        if self._fd is not None:
            _drop(self.path, self._fd)
            self._fd = None


def _drop(path: Path, fd: int) -> None:
    """Unlink a claim file whose lock ``fd`` holds, then close it (which unlocks)."""
    with contextlib.suppress(OSError):
        if os.stat(path).st_ino == os.fstat(fd).st_ino:
            os.unlink(path)
    os.close(fd)


def _held(path: Path) -> bool:
    """Whether a live process holds the claim at ``path`` (a stale one is removed)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return True
    _drop(path, fd)  # its driver died without releasing it
    return False


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
