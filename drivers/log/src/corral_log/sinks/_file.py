"""File sink: appends stored lines to a file, rotated by size and by age, gzip-compressed."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import threading
import time
from pathlib import Path

from corral_log.records import Chunk, parse_iso_ns
from corral_log.sinks._base import SinkUnavailable

ROTATED_SUFFIX_LEN = len("-20240501T120000.123456789Z")


class RotatingFile:
    """An append-only file that rotates to ``<name>-<UTC stamp>[.gz]`` and keeps ``keep`` old.

    Rotation happens before a write that would pass ``max_bytes`` or when the file is older
    than ``max_age_s``; compression and pruning run in a background thread so writers never
    wait for gzip.
    """

    def __init__(
        self,
        path: Path,
        *,
        max_bytes: int | None = 64 << 20,
        max_age_s: float | None = None,
        keep: int = 5,
        compress: bool = True,
        mode: int = 0o640,
    ) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self.keep = keep
        self.compress = compress
        self.mode = mode
        self._lock = threading.Lock()
        self._bg_lock = threading.Lock()
        self._bg: list[threading.Thread] = []
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._open()

    def _open(self) -> None:
        self.fd = os.open(
            self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, self.mode
        )
        self.size = os.fstat(self.fd).st_size
        self.opened_at = self._start_time() if self.size else time.time()

    def _start_time(self) -> float:
        """When the current file began: its first record's time, else its mtime."""
        try:
            with open(self.path, "rb") as f:
                head = f.read(30).decode()
            return parse_iso_ns(head) / 1e9
        except (OSError, ValueError, UnicodeDecodeError):
            return os.stat(self.path).st_mtime

    def due(self, incoming: int = 0, now: float | None = None) -> bool:
        """Whether the next write of ``incoming`` bytes must go to a fresh file."""
        if self.size == 0:
            return False
        if self.max_bytes is not None and self.size + incoming > self.max_bytes:
            return True
        if self.max_age_s is not None:
            return (now if now is not None else time.time()) - self.opened_at >= self.max_age_s
        return False

    def write(self, data: bytes) -> None:
        """Append ``data`` whole (rotating first if due); raise SinkUnavailable on OS errors."""
        if not data:
            return
        with self._lock:
            try:
                if self.due(len(data)):
                    self._rotate()
                view = memoryview(data)
                while view:
                    n = os.write(self.fd, view)
                    view = view[n:]
                self.size += len(data)
            except OSError as exc:
                raise SinkUnavailable(f"cannot write {self.path}: {exc.strerror}") from exc

    def rotate(self) -> None:
        """Rotate now (no-op on an empty file)."""
        with self._lock:
            if self.size:
                self._rotate()

    def _rotate(self) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f".{time.time_ns() % 10**9:09d}Z"
        target = self.path.with_name(f"{self.path.name}-{stamp}")
        os.rename(self.path, target)
        os.close(self.fd)
        self._open()
        t = threading.Thread(
            target=self._finish_rotation,
            args=(target,),
            daemon=True,
            name=f"rotate {self.path.name}",
        )
        self._bg = [b for b in self._bg if b.is_alive()] + [t]
        t.start()

    def _finish_rotation(self, target: Path) -> None:
        # one rotation finishes at a time, so pruning never removes a file being compressed
        with self._bg_lock:
            try:
                if self.compress:
                    tmp = target.with_name(target.name + ".gz.tmp")
                    with open(target, "rb") as src, gzip.open(tmp, "wb", compresslevel=3) as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
                    os.chmod(tmp, self.mode)
                    os.rename(tmp, target.with_name(target.name + ".gz"))
                    os.unlink(target)
            except FileNotFoundError:
                pass  # pruned already (keep=0)
            self.prune()

    def rotated(self) -> list[Path]:
        """Rotated files, oldest first."""
        prefix = self.path.name + "-"
        return sorted(
            p
            for p in self.path.parent.iterdir()
            if p.name.startswith(prefix) and not p.name.endswith(".tmp")
        )

    def prune(self) -> None:
        """Delete rotated files beyond ``keep``."""
        with self._lock:
            old = self.rotated()
            for p in old[: max(0, len(old) - self.keep)]:
                p.unlink(missing_ok=True)

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Wait for background compression and pruning (tests, shutdown)."""
        for t in list(self._bg):
            t.join(timeout)

    def close(self) -> None:
        """Close the file (after background work finishes)."""
        self.wait_idle()
        with self._lock:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1


class FileSink:
    """Sink writing stored text lines (``format='text'``) or JSON objects per line."""

    def __init__(self, name: str, file: RotatingFile, *, format: str = "text") -> None:
        self.name = name
        self.file = file
        self.format = format

    def __call__(self, chunk: Chunk) -> None:
        """Append the chunk to the file."""
        if self.format == "json":
            data = "".join(
                json.dumps(r.to_dict(), ensure_ascii=False) + "\n" for r in chunk.records()
            ).encode()
        else:
            data = chunk.encoded
        self.file.write(data)

    def close(self) -> None:
        """Close the file."""
        self.file.close()
