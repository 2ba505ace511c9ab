"""The cron driver's own state: <home>/cron.sqlite3 (WAL): job cursors, run history, heartbeat.

The UNIQUE(job, slot) constraint on ``runs`` is the "starts at most once" guarantee (R6): a
slot is claimed, in the same transaction that advances the job's cursor, BEFORE its process is
started; a second claim of the same slot (a restarted scheduler, later another host) fails.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job          TEXT PRIMARY KEY,          -- '<app>.<name>'
    app          TEXT NOT NULL,
    fingerprint  TEXT NOT NULL,             -- schedule + zone; a change resets the cursor
    cursor       TEXT NOT NULL,             -- UTC; every slot at or before it is decided
    spec         TEXT NOT NULL,             -- the [cron.NAME] table as JSON
    attached_at  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    id           INTEGER PRIMARY KEY,
    job          TEXT NOT NULL,
    slot         TEXT,                      -- scheduled slot, UTC; NULL for manual runs
    reason       TEXT NOT NULL,             -- scheduled | catch-up | manual | missed
    state        TEXT NOT NULL,             -- queued running succeeded failed timeout
                                            -- replaced skipped interrupted
    note         TEXT,                      -- why it was skipped, what went wrong
    claimed_at   TEXT NOT NULL,
    started_at   TEXT,
    finished_at  TEXT,
    delay_ms     INTEGER,                   -- started_at - (slot + jitter)
    duration_ms  INTEGER,
    exit_code    INTEGER,
    signal       INTEGER,
    pid          INTEGER,
    output_tail  TEXT,
    UNIQUE (job, slot)
);
CREATE INDEX IF NOT EXISTS runs_by_job ON runs (job, id);
CREATE TABLE IF NOT EXISTS apps (
    app          TEXT PRIMARY KEY,
    spec         TEXT NOT NULL              -- the AppSpec last attached, as JSON
);
CREATE TABLE IF NOT EXISTS heartbeat (
    scheduler    TEXT PRIMARY KEY,
    pid          INTEGER NOT NULL,
    beat_at      TEXT NOT NULL,
    next_wake    TEXT
);
"""

FINAL_STATES = ("succeeded", "failed", "timeout", "replaced", "skipped", "interrupted")
_RUN_COLUMNS = ("id", "job", "slot", "reason", "state", "note", "claimed_at", "started_at",
                "finished_at", "delay_ms", "duration_ms", "exit_code", "signal", "pid",
                "output_tail")
_SELECT_RUNS = ("SELECT id, job, slot, reason, state, note, claimed_at, started_at, finished_at, "
                "delay_ms, duration_ms, exit_code, signal, pid, output_tail FROM runs ")
_OPEN = "state IN ('queued', 'claimed', 'running')"


def iso(instant: datetime) -> str:
    """UTC text with milliseconds; sorts as time does."""
    return instant.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + \
        f"{instant.microsecond // 1000:03d}Z"


def parse_iso(text: str) -> datetime:
    """Inverse of ``iso``."""
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


@dataclass(frozen=True)
class Heartbeat:
    """The scheduler's last check-in."""

    pid: int
    beat_at: datetime
    next_wake: datetime | None


class CronStore:
    """One connection to cron.sqlite3, used from the scheduler's event loop thread only."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a committed claim survives any crash of this process (which is
        # what a restart is); only a power loss can drop the newest commits, and with them
        # the runs they started. FULL would fsync every claim and heartbeat.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(SCHEMA)
        os.chmod(path, 0o600)

    def close(self) -> None:
        """Close the connection."""
        self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # -- jobs --------------------------------------------------------------------------------
    def attach(self, job: str, app: str, fingerprint: str, spec: dict[str, Any],
               now: datetime) -> datetime:
        """Register a job; return its cursor (``now`` for a new job or a changed schedule)."""
        with self._tx() as db:
            row = db.execute("SELECT fingerprint, cursor FROM jobs WHERE job=?", (job,)).fetchone()
            if row is not None and row[0] == fingerprint:
                db.execute("UPDATE jobs SET spec=? WHERE job=?", (json.dumps(spec), job))
                return parse_iso(row[1])
            db.execute(
                "INSERT INTO jobs (job, app, fingerprint, cursor, spec, attached_at) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (job) DO UPDATE SET "
                "fingerprint=excluded.fingerprint, cursor=excluded.cursor, spec=excluded.spec",
                (job, app, fingerprint, iso(now), json.dumps(spec), iso(now)),
            )
            return now

    def jobs(self, app: str | None = None) -> list[str]:
        """Keys of the registered jobs (of one app)."""
        query, args = "SELECT job FROM jobs", ()
        if app is not None:
            query, args = query + " WHERE app=?", (app,)  # type: ignore[assignment]
        return [r[0] for r in self._db.execute(query + " ORDER BY job", args)]

    def forget_app(self, app: str) -> list[str]:
        """Remove an app's jobs and their history (``corral down``); return the job keys."""
        with self._tx() as db:
            keys = [r[0] for r in db.execute("SELECT job FROM jobs WHERE app=?", (app,))]
            for key in keys:
                db.execute("DELETE FROM runs WHERE job=?", (key,))
            db.execute("DELETE FROM jobs WHERE app=?", (app,))
            db.execute("DELETE FROM apps WHERE app=?", (app,))
        return keys

    # -- apps ----------------------------------------------------------------------------------
    def save_app(self, app: str, spec: dict[str, Any]) -> None:
        """Remember the app as last attached, to schedule its jobs again after a restart."""
        with self._tx() as db:
            db.execute("INSERT INTO apps (app, spec) VALUES (?, ?) ON CONFLICT (app) DO UPDATE"
                       " SET spec=excluded.spec", (app, json.dumps(spec)))

    def saved_apps(self) -> list[dict[str, Any]]:
        """Every app remembered by ``save_app`` and not forgotten since."""
        rows = self._db.execute("SELECT spec FROM apps ORDER BY app").fetchall()
        return [json.loads(r[0]) for r in rows]

    def forget_job(self, job: str) -> None:
        """Remove one job (dropped from the manifest) and its history."""
        with self._tx() as db:
            db.execute("DELETE FROM runs WHERE job=?", (job,))
            db.execute("DELETE FROM jobs WHERE job=?", (job,))

    def cursor(self, job: str) -> datetime | None:
        """The job's cursor, or None if it is not registered."""
        row = self._db.execute("SELECT cursor FROM jobs WHERE job=?", (job,)).fetchone()
        return parse_iso(row[0]) if row else None

    def set_cursor(self, job: str, cursor: datetime) -> None:
        """Move the cursor (never backwards)."""
        self._db.execute("UPDATE jobs SET cursor=max(cursor, ?) WHERE job=?", (iso(cursor), job))

    # -- slots and runs ----------------------------------------------------------------------
    def claim(self, job: str, slot: datetime | None, reason: str, state: str,
              now: datetime, note: str | None = None) -> int | None:
        """Record a decision on a slot and advance the cursor; None if already decided."""
        try:
            with self._tx() as db:
                cur = db.execute(
                    "INSERT INTO runs (job, slot, reason, state, note, claimed_at) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (job, iso(slot) if slot else None, reason, state, note, iso(now)),
                )
                if slot is not None:
                    db.execute("UPDATE jobs SET cursor=max(cursor, ?) WHERE job=?",
                               (iso(slot), job))
                return cur.lastrowid
        except sqlite3.IntegrityError:
            if slot is not None:
                self.set_cursor(job, slot)
            return None

    def skip_many(self, job: str, slots: Iterable[tuple[datetime | None, str, str]],
                  now: datetime) -> int:
        """Record skipped slots (slot, reason, note) in one transaction; return how many."""
        count = 0
        with self._tx() as db:
            for slot, reason, note in slots:
                cur = db.execute(
                    "INSERT OR IGNORE INTO runs (job, slot, reason, state, note, claimed_at, "
                    "finished_at) VALUES (?, ?, ?, 'skipped', ?, ?, ?)",
                    (job, iso(slot) if slot else None, reason, note, iso(now), iso(now)),
                )
                count += cur.rowcount
                if slot is not None:
                    db.execute("UPDATE jobs SET cursor=max(cursor, ?) WHERE job=?",
                               (iso(slot), job))
        return count

    def started(self, run_id: int, at: datetime, delay_ms: int | None, pid: int) -> None:
        """Mark a claimed run as running."""
        self._db.execute(
            "UPDATE runs SET state='running', started_at=?, delay_ms=?, pid=? WHERE id=?",
            (iso(at), delay_ms, pid, run_id),
        )

    def finished(self, run_id: int, state: str, at: datetime, *, duration_ms: int | None = None,
                 exit_code: int | None = None, signal: int | None = None,
                 output_tail: str | None = None, note: str | None = None) -> None:
        """Record how a run ended."""
        self._db.execute(
            "UPDATE runs SET state=?, finished_at=?, duration_ms=?, exit_code=?, signal=?, "
            "output_tail=?, note=coalesce(?, note) WHERE id=?",
            (state, iso(at), duration_ms, exit_code, signal, output_tail, note, run_id),
        )

    def recover(self, now: datetime) -> list[dict[str, Any]]:
        """Close runs a previous scheduler left open (queued, claimed, running)."""
        with self._tx() as db:
            rows = [dict(zip(_RUN_COLUMNS, r, strict=True))
                    for r in db.execute(_SELECT_RUNS + "WHERE " + _OPEN)]
            db.execute(
                "UPDATE runs SET state='interrupted', finished_at=?, note=? "
                "WHERE state IN ('queued', 'claimed', 'running')",
                (iso(now), "the scheduler stopped before this run ended; outcome unknown"),
            )
        return rows

    def runs(self, job: str, limit: int = 50) -> list[dict[str, Any]]:
        """The job's newest run records, newest first."""
        return [dict(zip(_RUN_COLUMNS, r, strict=True)) for r in self._db.execute(
            _SELECT_RUNS + "WHERE job=? ORDER BY id DESC LIMIT ?",
            (job, limit))]

    def run(self, run_id: int) -> dict[str, Any] | None:
        """One run record."""
        row = self._db.execute(
            _SELECT_RUNS + "WHERE id=?", (run_id,)).fetchone()
        return dict(zip(_RUN_COLUMNS, row, strict=True)) if row else None

    def last_success(self, job: str) -> datetime | None:
        """When the job's newest successful run finished."""
        row = self._db.execute(
            "SELECT max(finished_at) FROM runs WHERE job=? AND state='succeeded'", (job,)
        ).fetchone()
        return parse_iso(row[0]) if row and row[0] else None

    def attached_at(self, job: str) -> datetime | None:
        """When the job was first registered (with its current schedule)."""
        row = self._db.execute("SELECT attached_at FROM jobs WHERE job=?", (job,)).fetchone()
        return parse_iso(row[0]) if row else None

    # -- heartbeat ---------------------------------------------------------------------------
    def beat(self, now: datetime, next_wake: datetime | None, scheduler: str = "cron") -> None:
        """The scheduler checks in (R10: the kernel/CLI alert when this grows old)."""
        self._db.execute(
            "INSERT INTO heartbeat (scheduler, pid, beat_at, next_wake) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (scheduler) DO UPDATE SET pid=excluded.pid, beat_at=excluded.beat_at, "
            "next_wake=excluded.next_wake",
            (scheduler, os.getpid(), iso(now), iso(next_wake) if next_wake else None),
        )

    def heartbeat(self, scheduler: str = "cron") -> Heartbeat | None:
        """The last check-in, or None if the scheduler never ran."""
        row = self._db.execute(
            "SELECT pid, beat_at, next_wake FROM heartbeat WHERE scheduler=?", (scheduler,)
        ).fetchone()
        if row is None:
            return None
        return Heartbeat(row[0], parse_iso(row[1]), parse_iso(row[2]) if row[2] else None)
