"""Error groups: one row per (app, fingerprint) in ``<home>/log.sqlite3``."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any

from corral_log.records import iso_ns
from corral_log.tracebacks import Trace

_SCHEMA = """
CREATE TABLE IF NOT EXISTS error_groups (
    app TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    language TEXT NOT NULL,
    type TEXT NOT NULL,
    message TEXT NOT NULL,
    count INTEGER NOT NULL,
    first_seen_ns INTEGER NOT NULL,
    last_seen_ns INTEGER NOT NULL,
    last_instance TEXT NOT NULL,
    sample TEXT NOT NULL,
    PRIMARY KEY (app, fingerprint)
);
"""


class ErrorStore:
    """Counts traces per group; keeps the first sample and the latest message."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(_SCHEMA)

    def record(self, app: str, instance: str, trace: Trace, time_ns: int) -> bool:
        """Count ``trace`` in its group; True if the group is new."""
        with self._lock:
            cur = self.db.execute(
                "UPDATE error_groups SET count = count + 1, last_seen_ns = ?, message = ?, "
                "last_instance = ? WHERE app = ? AND fingerprint = ?",
                (time_ns, trace.message, instance, app, trace.fingerprint),
            )
            if cur.rowcount:
                return False
            self.db.execute(
                "INSERT INTO error_groups VALUES (?, ?, ?, ?, ?, 1, ?, ?, ?, ?)",
                (
                    app,
                    trace.fingerprint,
                    trace.language,
                    trace.type,
                    trace.message,
                    time_ns,
                    time_ns,
                    instance,
                    trace.text[:65536],
                ),
            )
            return True

    def groups(self, app: str, limit: int = 100) -> list[dict[str, Any]]:
        """The app's error groups, most recently seen first."""
        with self._lock:
            cur = self.db.execute(
                "SELECT fingerprint, language, type, message, count, first_seen_ns, "
                "last_seen_ns, last_instance, sample FROM error_groups WHERE app = ? "
                "ORDER BY last_seen_ns DESC LIMIT ?",
                (app, limit),
            )
            cols = [d[0] for d in cur.description]
            rows = [dict(zip(cols, row, strict=True)) for row in cur.fetchall()]
        for row in rows:  # what `corral errors` prints next to the ns figures
            row["first_seen"] = iso_ns(row["first_seen_ns"])
            row["last_seen"] = iso_ns(row["last_seen_ns"])
        return rows

    def forget(self, app: str) -> None:
        """Delete an app's groups (the app was detached)."""
        with self._lock:
            self.db.execute("DELETE FROM error_groups WHERE app = ?", (app,))

    def close(self) -> None:
        """Close the database."""
        self.db.close()
