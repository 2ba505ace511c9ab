"""Per-sink disk spool and the runner that feeds a sink from it, in order, across outages.

Every chunk for a (non-default) sink is appended to its spool, a directory of segment files
under ``<home>/spool/<app>/<sink>/``; a worker thread reads from a persisted cursor, calls the
sink and advances the cursor only after the sink returned. The spool is therefore both the
queue of a healthy sink and the backlog of a failing one, and survives a restart of the
driver (delivery is at-least-once: a chunk delivered just before a kill -9 may be resent).
When the spool holds ``max_bytes``, new chunks are dropped, counted, and announced.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from corral_log.records import Chunk
from corral_log.sinks import Sink, SinkRejected

SEGMENT_BYTES = 4 << 20


class Spool:
    """Append-only segments plus a cursor; whole lines in, whole lines out."""

    def __init__(self, directory: Path, *, max_bytes: int, segment_bytes: int = SEGMENT_BYTES):
        self.dir = directory
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self._lock = threading.Lock()
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.sizes: dict[int, int] = {}
        for p in sorted(directory.glob("*.seg")):
            self.sizes[int(p.stem)] = p.stat().st_size
        if self.sizes:
            self._repair_tail(max(self.sizes))
        else:
            self.sizes[1] = 0
            (directory / self._name(1)).touch(mode=0o600)
        self.head = max(self.sizes)
        self.wfd = os.open(
            self.dir / self._name(self.head),
            os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
            0o600,
        )
        self.cfd = os.open(self.dir / "cursor", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.cursor = self._load_cursor()

    @staticmethod
    def _name(seq: int) -> str:
        return f"{seq:012d}.seg"

    def _repair_tail(self, seq: int) -> None:
        """Cut a torn last line left by a crash during an append."""
        path = self.dir / self._name(seq)
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            os.truncate(path, keep)
            self.sizes[seq] = keep

    def _load_cursor(self) -> tuple[int, int]:
        raw = os.pread(self.cfd, 64, 0).decode(errors="replace").split()
        first = min(self.sizes)
        try:
            seq, off = int(raw[0]), int(raw[1])
        except (IndexError, ValueError):
            return (first, 0)
        if seq not in self.sizes:
            return (first, 0)
        return (seq, min(off, self.sizes[seq]))

    @property
    def pending_bytes(self) -> int:
        """Bytes appended but not yet delivered."""
        with self._lock:
            seq, off = self.cursor
            return sum(n for s, n in self.sizes.items() if s >= seq) - off

    def append(self, data: bytes) -> bool:
        """Append whole lines; False (nothing written) when the spool is full."""
        with self._lock:
            seq, off = self.cursor
            pending = sum(n for s, n in self.sizes.items() if s >= seq) - off
            if pending + len(data) > self.max_bytes:
                return False
            if self.sizes[self.head] + len(data) > self.segment_bytes and self.sizes[self.head]:
                os.close(self.wfd)
                self.head += 1
                self.sizes[self.head] = 0
                self.wfd = os.open(
                    self.dir / self._name(self.head),
                    os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                    0o600,
                )
            view = memoryview(data)
            while view:
                view = view[os.write(self.wfd, view) :]
            self.sizes[self.head] += len(data)
            return True

    def read(self, max_bytes: int) -> tuple[bytes, tuple[int, int]] | None:
        """Whole lines from the cursor (at least one line, at most about ``max_bytes``) and
        the cursor after them; None when everything was delivered."""
        with self._lock:
            seq, off = self.cursor
            while off >= self.sizes[seq] and seq < self.head:
                seq, off = seq + 1, 0
            size = self.sizes[seq]
        if off >= size:
            return None
        with open(self.dir / self._name(seq), "rb") as f:
            f.seek(off)
            data = f.read(min(max_bytes, size - off))
            if not data.endswith(b"\n"):
                nl = data.rfind(b"\n")
                if nl >= 0:
                    data = data[: nl + 1]
                else:  # one line longer than max_bytes: take it whole
                    f.seek(off)
                    data = f.read(size - off)
                    data = data[: data.find(b"\n") + 1]
        return data, (seq, off + len(data))

    def commit(self, cursor: tuple[int, int]) -> None:
        """Mark everything before ``cursor`` delivered; delete segments left behind."""
        with self._lock:
            self.cursor = cursor
            os.pwrite(self.cfd, f"{cursor[0]:012d} {cursor[1]:012d}\n".encode(), 0)
            for s in [s for s in self.sizes if s < cursor[0]]:
                (self.dir / self._name(s)).unlink(missing_ok=True)
                del self.sizes[s]

    def close(self) -> None:
        """Close file descriptors."""
        os.close(self.wfd)
        os.close(self.cfd)


@dataclass
class SinkStats:
    """What ``corral ps`` and /metrics show per sink."""

    app: str
    sink: str
    up: bool = True
    delivered_lines: int = 0
    dropped_lines: int = 0
    rejected_lines: int = 0
    spooled_bytes: int = 0
    failures: int = 0
    down_since: float | None = None
    last_error: str | None = None


Notice = Callable[[str, str], None]
"""``notice(app, text)``: emit a driver record into the app's log (called from any thread)."""


class SinkRunner:
    """Feeds one sink from its spool on a worker thread; retries with backoff while it fails."""

    def __init__(
        self,
        app: str,
        sink: Sink,
        spool: Spool,
        *,
        notice: Notice,
        batch_bytes: int = 1 << 20,
        linger_s: float = 0.0,
        retry_s: tuple[float, float] = (0.2, 5.0),
    ) -> None:
        self.app = app
        self.sink = sink
        self.spool = spool
        self.notice = notice
        self.batch_bytes = batch_bytes
        self.linger_s = linger_s
        self.retry_s = retry_s
        self.stats = SinkStats(app=app, sink=sink.name)
        self._stats_file = spool.dir / "stats.json"
        self._load_counters()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._idle = threading.Event()
        self._thread = threading.Thread(
            target=self._run, daemon=True, name=f"sink {app}/{sink.name}"
        )

    def _load_counters(self) -> None:
        try:
            saved = json.loads(self._stats_file.read_text())
            self.stats.dropped_lines = int(saved.get("dropped_lines", 0))
            self.stats.rejected_lines = int(saved.get("rejected_lines", 0))
        except (OSError, ValueError):
            pass

    def _save_counters(self) -> None:
        tmp = self._stats_file.with_suffix(".tmp")
        tmp.write_text(
            json.dumps(
                {
                    "dropped_lines": self.stats.dropped_lines,
                    "rejected_lines": self.stats.rejected_lines,
                }
            )
        )
        os.replace(tmp, self._stats_file)

    def start(self) -> None:
        """Start delivering (including whatever a previous run left in the spool)."""
        self._thread.start()
        self._wake.set()

    def submit(self, encoded: bytes, *, quiet: bool = False) -> None:
        """Queue stored lines for the sink; if the spool is full they are dropped and said so
        (``quiet``: counted only; used for the driver's own notices, to avoid a loop)."""
        if not self.spool.append(encoded):
            n = encoded.count(b"\n")
            self.stats.dropped_lines += n
            self._save_counters()
            if not quiet:
                self.notice(
                    self.app,
                    f"sink {self.sink.name!r}: spool full ({self.spool.max_bytes} bytes), "
                    f"dropped {n} lines (total dropped {self.stats.dropped_lines})",
                )
        self._wake.set()

    def _run(self) -> None:
        delay = self.retry_s[0]
        while not self._stop.is_set():
            got = self.spool.read(self.batch_bytes)
            if got is None:
                self._idle.set()
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            self._idle.clear()
            data, cursor = got
            if self.linger_s and len(data) < self.batch_bytes // 2 and self.stats.up:
                # let a trickle accumulate into one request (Loki pushes are per request)
                if self._stop.wait(self.linger_s):
                    break
                got = self.spool.read(self.batch_bytes)
                if got is not None:
                    data, cursor = got
            n = data.count(b"\n")
            try:
                self.sink(Chunk(self.app, data))
            except SinkRejected as exc:
                self.spool.commit(cursor)
                self.stats.rejected_lines += n
                self._save_counters()
                self.notice(self.app, f"sink {self.sink.name!r} rejected {n} lines: {exc}")
                continue
            except Exception as exc:
                self.stats.failures += 1
                self.stats.last_error = str(exc)
                if self.stats.up:
                    self.stats.up = False
                    self.stats.down_since = time.time()
                    self.notice(self.app, f"sink {self.sink.name!r} down, spooling: {exc}")
                if self._stop.wait(delay):
                    break
                delay = min(delay * 2, self.retry_s[1])
                continue
            delay = self.retry_s[0]
            self.spool.commit(cursor)
            self.stats.delivered_lines += n
            if not self.stats.up:
                down = time.time() - (self.stats.down_since or time.time())
                self.stats.up = True
                self.stats.down_since = None
                self.notice(
                    self.app,
                    f"sink {self.sink.name!r} back after {down:.1f}s, "
                    f"draining {self.spool.pending_bytes} spooled bytes",
                )

    def wait_drained(self, timeout: float) -> bool:
        """Wait until the spool is empty (tests, orderly shutdown)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.spool.pending_bytes == 0:
                return True
            time.sleep(0.02)
        return self.spool.pending_bytes == 0

    def snapshot(self) -> dict[str, Any]:
        """Stats as JSON-ready data."""
        self.stats.spooled_bytes = self.spool.pending_bytes
        return asdict(self.stats)

    def stop(self, drain_s: float = 0.0) -> None:
        """Stop the worker (after trying to drain for ``drain_s``) and close the sink."""
        if drain_s > 0 and self.stats.up:
            self.wait_drained(drain_s)
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(10)
        self.sink.close()
        self.spool.close()
