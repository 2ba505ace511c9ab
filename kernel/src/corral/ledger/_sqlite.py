"""The embedded ledger: one SQLite file in WAL mode under the corral home.

Durability. Every write is one ``BEGIN IMMEDIATE`` ... ``COMMIT`` transaction in WAL mode, so a
kill -9 of any process at any instant leaves the file before or after a transaction, never
between: a transaction is visible only once its commit frame is in the WAL, and SQLite ignores
(and later overwrites) WAL frames that follow the last valid commit frame. This holds for
``synchronous=NORMAL`` as for ``FULL``: a killed process's writes are already in the kernel's
page cache, which survives the process. What differs is power loss or an OS crash: with NORMAL
the WAL is fsynced only at checkpoints, so the last transactions before the crash may be lost
(the file stays consistent, it just rolls back to an earlier commit); with FULL every commit
is fsynced and survives.

Measured on the development machine (2 cores shared with other jobs, virtio disk, ext4),
claiming one key then releasing it, two commits, through this class: WAL + NORMAL about
75 µs per claim+release pair (~13,000 pairs/s; 80-130 µs while the machine is busy); WAL +
FULL about 350-480 µs per pair (~2,300 pairs/s: an fsync per commit). The kernel needs 5,000
round trips/s through the bus with the ledger's share well under 100 µs, which only NORMAL
meets one commit at a time, so NORMAL is the default. What NORMAL risks on power loss is the
transactions committed since the WAL was last fsynced (at the last checkpoint, about every
1,000 pages written, a few hundred commits); the file itself stays consistent.
``commit_many`` shares one commit among a batch: 16 transactions per batch bring a pair to
~30 µs with NORMAL and ~60 µs with FULL, so a kernel that batches the requests waiting on its
socket can afford FULL (``sqlite:///path?synchronous=full``).

Thread safety: one connection per ``SqliteLedger``, opened with ``check_same_thread=False`` and
guarded by a lock, so any thread may call any method; calls are serialised. Several processes
may open the same file (a reader beside the kernel, a test): WAL lets readers run beside the
writer, and writers wait up to ``busy_timeout_ms`` (default 5 s) for each other.
"""

from __future__ import annotations

import builtins
import json
import os
import secrets
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from corral.errors import ConflictError, CorralError, ErrorCode, NotFoundError, UnavailableError
from corral.ledger._base import (
    Change,
    ClaimOp,
    CompactedError,
    Compare,
    Lease,
    Ledger,
    Record,
    ReleaseAllOp,
    ReleaseOp,
    Txn,
    conflict,
    describe_key,
    describe_owner,
    encode_value,
)

Synchronous = Literal["NORMAL", "FULL"]

BUSY_TIMEOUT_MS = 5000
"""How long a writer waits for another process's write transaction before giving up."""

HISTORY = 10_000
"""Revisions of change history kept for ``changes()``; older ones are compacted."""

PAGE_SIZE = 1024
"""SQLite page size of a new ledger file (see ``_configure``)."""

_COMPACT_EVERY = 256  # compaction runs when the revision crosses a multiple of this

# Each entry upgrades the schema by one version, in one transaction with the version bump.
# Never edit a released entry: append a new one.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE meta (
            name TEXT PRIMARY KEY,
            value NOT NULL
        ) WITHOUT ROWID""",
        "INSERT INTO meta (name, value) VALUES ('compacted', 0)",
        """CREATE TABLE leases (
            id TEXT PRIMARY KEY,
            owner TEXT NOT NULL,
            ttl_s REAL NOT NULL CHECK (ttl_s > 0),
            expires_at REAL NOT NULL,
            granted TEXT NOT NULL
        ) WITHOUT ROWID""",
        "CREATE INDEX leases_expiry ON leases (expires_at)",
        """CREATE TABLE records (
            kind TEXT NOT NULL,
            key TEXT NOT NULL,
            owner TEXT NOT NULL,
            value TEXT NOT NULL,
            since TEXT NOT NULL,
            revision INTEGER NOT NULL,
            lease TEXT REFERENCES leases (id),
            PRIMARY KEY (kind, key)
        ) WITHOUT ROWID""",
        "CREATE INDEX records_owner ON records (owner, kind, key)",
        # Partial: the many records without a lease cost no index write.
        "CREATE INDEX records_lease ON records (lease) WHERE lease IS NOT NULL",
        """CREATE TABLE changes (
            revision INTEGER NOT NULL,
            seq INTEGER NOT NULL,
            type TEXT NOT NULL CHECK (type IN ('put', 'delete')),
            kind TEXT NOT NULL,
            key TEXT NOT NULL,
            owner TEXT NOT NULL,
            value TEXT NOT NULL,
            lease TEXT,
            PRIMARY KEY (revision, seq)
        ) WITHOUT ROWID""",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)

# A record whose lease has expired is dead even before expire() collects it. Queries append
# "AND <condition>" with bound parameters only; the first parameter is the current time.
_SELECT_LIVE = (
    "SELECT r.kind, r.key, r.owner, r.value, r.since, r.revision, r.lease FROM records r "
    "WHERE (r.lease IS NULL OR r.lease IN (SELECT id FROM leases WHERE expires_at > ?))"
)


def iso_utc(unix: float) -> str:
    """Format a Unix time as UTC ISO 8601 to the second: ``2026-11-25T10:00:00Z``."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(unix))


class SqliteLedger(Ledger):
    """The ledger in one SQLite file (see the module docstring for durability and threads)."""

    def __init__(
        self,
        path: Path,
        *,
        synchronous: Synchronous = "NORMAL",
        clock: Callable[[], float] = time.time,
        history: int = HISTORY,
        busy_timeout_ms: int = BUSY_TIMEOUT_MS,
    ) -> None:
        if synchronous not in ("NORMAL", "FULL"):
            raise CorralError(
                f"ledger synchronous must be NORMAL or FULL, got {synchronous!r}",
                code=ErrorCode.INVALID,
                retry=False,
            )
        if history < 1:
            raise CorralError(
                f"ledger history must be >= 1, got {history}", code=ErrorCode.INVALID, retry=False
            )
        self.path = Path(path)
        self.synchronous: Synchronous = synchronous
        self._clock = clock
        self._history = history
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        _prepare_file(self.path)
        try:
            conn = sqlite3.connect(
                self.path,
                isolation_level=None,  # we issue BEGIN/COMMIT ourselves
                check_same_thread=False,  # guarded by self._lock
                timeout=busy_timeout_ms / 1000,
            )
        except sqlite3.Error as exc:
            raise CorralError(f"cannot open ledger {self.path}: {exc}", retry=False) from exc
        try:
            _configure(conn, self.path, synchronous, busy_timeout_ms)
            _migrate(conn, self.path)
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def __repr__(self) -> str:
        return f"SqliteLedger({str(self.path)!r}, synchronous={self.synchronous!r})"

    # -- writes -------------------------------------------------------------------------------

    def commit(self, txn: Txn) -> int:
        """See ``Ledger.commit``."""
        with self._lock, self._write() as write:
            _apply(write, txn)
        txn.revision = write.revision
        return write.revision

    def commit_many(self, txns: Sequence[Txn]) -> builtins.list[int | CorralError]:
        """See ``Ledger.commit_many``: one SQLite transaction, a savepoint per ``Txn``."""
        results: list[int | CorralError] = []
        with self._lock, self._write() as write:
            for txn in txns:
                write.conn.execute("SAVEPOINT txn")
                try:
                    _apply(write, txn)
                except CorralError as exc:
                    write.conn.execute("ROLLBACK TO txn")
                    write.conn.execute("RELEASE txn")
                    write.seq = 0  # its changes are gone; the next one reuses the revision
                    results.append(exc)
                    continue
                write.conn.execute("RELEASE txn")
                results.append(write.revision)
                write.next_txn()
        for txn, result in zip(txns, results, strict=True):
            if isinstance(result, int):
                txn.revision = result
        return results

    def grant_lease(self, ttl_s: float, owner: str) -> str:
        """See ``Ledger.grant_lease``."""
        if not isinstance(ttl_s, int | float) or not ttl_s > 0:
            raise CorralError(
                f"lease TTL must be > 0 seconds, got {ttl_s!r}", code=ErrorCode.INVALID, retry=False
            )
        if not isinstance(owner, str) or not owner:
            raise CorralError(
                f"lease owner must be a non-empty string, got {owner!r}",
                code=ErrorCode.INVALID,
                retry=False,
            )
        lease_id = secrets.token_hex(8)
        with self._lock, self._write() as write:
            write.conn.execute(
                "INSERT INTO leases (id, owner, ttl_s, expires_at, granted) VALUES (?, ?, ?, ?, ?)",
                (lease_id, owner, float(ttl_s), write.now + ttl_s, iso_utc(write.now)),
            )
        return lease_id

    def keepalive(self, lease_id: str) -> Lease:
        """See ``Ledger.keepalive``."""
        with self._lock, self._write() as write:
            row = write.conn.execute(
                "SELECT owner, ttl_s, expires_at, granted FROM leases WHERE id = ?", (lease_id,)
            ).fetchone()
            if row is None or row[2] <= write.now:
                raise NotFoundError(f"lease {lease_id} does not exist or has expired")
            owner, ttl_s, _, granted = row
            expires_at = write.now + ttl_s
            write.conn.execute(
                "UPDATE leases SET expires_at = ? WHERE id = ?", (expires_at, lease_id)
            )
        return Lease(lease_id, owner, ttl_s, expires_at, granted)

    def revoke(self, lease_id: str) -> int:
        """See ``Ledger.revoke``."""
        with self._lock, self._write() as write:
            write.drop_lease(lease_id)
        return write.revision

    def expire(self, now: float | None = None) -> int:
        """See ``Ledger.expire``."""
        count = 0
        with self._lock, self._write() as write:
            at = write.now if now is None else now
            expired = write.conn.execute(
                "SELECT id FROM leases WHERE expires_at <= ? ORDER BY id", (at,)
            ).fetchall()
            for (lease_id,) in expired:
                count += write.drop_lease(lease_id)
        return count

    # -- reads --------------------------------------------------------------------------------

    def get(self, kind: str, key: str) -> Record | None:
        """See ``Ledger.get``."""
        with self._lock:
            row = (
                self._db()
                .execute(
                    f"{_SELECT_LIVE} AND r.kind = ? AND r.key = ?",
                    (self._clock(), kind, key),
                )
                .fetchone()
            )
        return None if row is None else _record(row)

    def list(
        self, *, owner: str | None = None, kind: str | None = None, prefix: str | None = None
    ) -> builtins.list[Record]:
        """See ``Ledger.list``."""
        where: list[str] = []
        params: list[Any] = [self._clock()]
        if owner is not None:
            where.append("r.owner = ?")
            params.append(owner)
        if kind is not None:
            where.append("r.kind = ?")
            params.append(kind)
        if prefix:
            # A range instead of LIKE: no escaping of % and _, and it uses the key index.
            # TEXT compares as UTF-8 bytes, which sorts like code points.
            where.append("r.key >= ?")
            params.append(prefix)
            upper = _prefix_end(prefix)
            if upper is not None:
                where.append("r.key < ?")
                params.append(upper)
        sql = _SELECT_LIVE + "".join(f" AND {c}" for c in where) + " ORDER BY r.kind, r.key"
        with self._lock:
            rows = self._db().execute(sql, params).fetchall()
        return [_record(row) for row in rows]

    def lease(self, lease_id: str) -> Lease | None:
        """See ``Ledger.lease``."""
        with self._lock:
            row = (
                self._db()
                .execute(
                    "SELECT id, owner, ttl_s, expires_at, granted FROM leases "
                    "WHERE id = ? AND expires_at > ?",
                    (lease_id, self._clock()),
                )
                .fetchone()
            )
        return None if row is None else Lease(*row)

    def revision(self) -> int:
        """See ``Ledger.revision``."""
        with self._lock:
            return _current_revision(self._db())

    def changes(self, since_revision: int) -> builtins.list[Change]:
        """See ``Ledger.changes``."""
        with self._lock:
            conn = self._db()
            conn.execute("BEGIN")  # one snapshot for the compaction mark and the rows
            try:
                compacted = _meta(conn, "compacted")
                rows = conn.execute(
                    "SELECT revision, type, kind, key, owner, value, lease FROM changes "
                    "WHERE revision > ? ORDER BY revision, seq",
                    (since_revision,),
                ).fetchall()
            finally:
                conn.execute("COMMIT")
        if since_revision < compacted:
            raise CompactedError(since_revision, compacted)
        return [
            Change(rev, kind_, kind, key, owner, json.loads(value), lease)
            for rev, kind_, kind, key, owner, value, lease in rows
        ]

    def close(self) -> None:
        """See ``Ledger.close``."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # -- internals ----------------------------------------------------------------------------

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise CorralError(f"ledger {self.path} is closed", retry=False)
        return self._conn

    def _write(self) -> _Write:
        return _Write(self._db(), self.path, self._clock(), self._history)


class _Write:
    """One write transaction: ``BEGIN IMMEDIATE`` on entry, ``COMMIT`` on a clean exit.

    Any exception rolls everything back. Every change logged in it gets the revision after the
    current one; a transaction that logs nothing creates no revision.
    """

    def __init__(self, conn: sqlite3.Connection, path: Path, now: float, history: int) -> None:
        self.conn = conn
        self.path = path
        self.now = now
        self.history = history
        self.start = 0  # the revision when the transaction began
        self.base = 0  # the revision before the Txn being applied
        self.seq = 0  # position of the next change within revision base + 1

    @property
    def revision(self) -> int:
        """The revision this transaction leaves the ledger at."""
        return self.base + 1 if self.seq else self.base

    def next_txn(self) -> None:
        """Start the next ``Txn`` of a batch: it gets the revision after this one's."""
        if self.seq:
            self.base += 1
            self.seq = 0

    def __enter__(self) -> _Write:
        try:
            self.conn.execute("BEGIN IMMEDIATE")  # take the write lock now: no upgrade deadlock
        except sqlite3.Error as exc:
            raise _storage_error(self.path, exc) from exc
        try:
            self.start = self.base = _current_revision(self.conn)
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        failure = exc
        if exc_type is None:
            try:
                if self.revision // _COMPACT_EVERY != self.start // _COMPACT_EVERY:
                    self._compact()
                self.conn.execute("COMMIT")
            except BaseException as commit_failure:
                failure = commit_failure
        if self.conn.in_transaction:  # the body or the commit failed: undo everything
            self.conn.execute("ROLLBACK")
        if isinstance(failure, sqlite3.Error):
            raise _storage_error(self.path, failure) from failure
        if failure is not None and exc_type is None:
            raise failure

    def log(
        self, type_: str, kind: str, key: str, owner: str, value: str, lease: str | None
    ) -> None:
        """Append one change at this transaction's revision."""
        self.conn.execute(
            "INSERT INTO changes (revision, seq, type, kind, key, owner, value, lease) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (self.base + 1, self.seq, type_, kind, key, owner, value, lease),
        )
        self.seq += 1

    def live(self, kind: str, key: str) -> tuple[str, str, str, int, str | None] | None:
        """Return (owner, value, since, revision, lease) of the live record, or None.

        A record under an expired lease is collected here, with its whole lease, so that it
        never blocks anything even if ``expire()`` has not run yet.
        """
        row = self.conn.execute(
            "SELECT r.owner, r.value, r.since, r.revision, r.lease, l.expires_at "
            "FROM records r LEFT JOIN leases l ON l.id = r.lease "
            "WHERE r.kind = ? AND r.key = ?",
            (kind, key),
        ).fetchone()
        if row is None:
            return None
        owner, value, since, revision, lease, expires_at = row
        if lease is not None and (expires_at is None or expires_at <= self.now):
            self.drop_lease(lease)
            return None
        return owner, value, since, revision, lease

    def drop_lease(self, lease_id: str) -> int:
        """Delete a lease and its records, logging each delete; return how many records."""
        rows = self.conn.execute(
            "SELECT kind, key, owner, value FROM records WHERE lease = ? ORDER BY kind, key",
            (lease_id,),
        ).fetchall()
        for kind, key, owner, value in rows:
            self.log("delete", kind, key, owner, value, lease_id)
        self.conn.execute("DELETE FROM records WHERE lease = ?", (lease_id,))
        self.conn.execute("DELETE FROM leases WHERE id = ?", (lease_id,))
        return len(rows)

    def _compact(self) -> None:
        cutoff = self.revision - self.history
        if cutoff > _meta(self.conn, "compacted"):
            self.conn.execute("DELETE FROM changes WHERE revision <= ?", (cutoff,))
            self.conn.execute("UPDATE meta SET value = ? WHERE name = 'compacted'", (cutoff,))


def _storage_error(path: Path, exc: sqlite3.Error) -> CorralError:
    """Name the ledger file in an SQLite failure; a busy database is worth a retry."""
    if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc).lower():
        return UnavailableError(f"ledger {path} is busy: {exc}")
    return CorralError(f"ledger {path}: {exc}", retry=False)


def _apply(write: _Write, txn: Txn) -> None:
    for compare in txn.compares:
        _check(write, compare)
    for op in txn.ops:
        if isinstance(op, ClaimOp):
            _claim(write, op)
        elif isinstance(op, ReleaseOp):
            _release(write, op)
        else:
            _release_all(write, op)


def _check(write: _Write, compare: Compare) -> None:
    row = write.live(compare.kind, compare.key)
    what = describe_key(compare.kind, compare.key)
    expected = "free" if compare.holder is None else f"held by {describe_owner(compare.holder)}"
    if row is None:
        if compare.holder is None:
            return
        problem = "it is free"
        holder, since = "", None
    else:
        holder, _, since, revision, _ = row
        if compare.holder == holder and compare.revision in (None, revision):
            return
        if compare.holder == holder:
            problem = f"it changed at revision {revision} (expected {compare.revision})"
        else:
            problem = f"it is held by {describe_owner(holder)} since {since}"
    raise ConflictError(
        f"expected {what} to be {expected}, but {problem}",
        kind=compare.kind,
        key=compare.key,
        holder=holder,
        since=since,
    )


def _claim(write: _Write, op: ClaimOp) -> None:
    kind, key = op.claim.kind, op.claim.key
    text = encode_value(kind, key, op.claim.value)
    if op.lease is not None:
        _check_lease(write, op, op.lease)
    row = write.live(kind, key)
    if row is None:
        write.conn.execute(
            "INSERT INTO records (kind, key, owner, value, since, revision, lease) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (kind, key, op.owner, text, iso_utc(write.now), write.base + 1, op.lease),
        )
    else:
        holder, old_text, since, _, old_lease = row
        if holder != op.owner:
            raise conflict(kind, key, holder, since, who=op.owner, action="claim")
        if old_text == text and old_lease == op.lease:
            return  # a rerun of the same claim: no revision, no event
        write.conn.execute(
            "UPDATE records SET value = ?, lease = ?, revision = ? WHERE kind = ? AND key = ?",
            (text, op.lease, write.base + 1, kind, key),
        )
    write.log("put", kind, key, op.owner, text, op.lease)


def _check_lease(write: _Write, op: ClaimOp, lease: str) -> None:
    row = write.conn.execute(
        "SELECT owner, expires_at FROM leases WHERE id = ?", (lease,)
    ).fetchone()
    if row is None or row[1] <= write.now:
        raise NotFoundError(
            f"lease {lease} does not exist or has expired "
            f"(claiming {describe_key(op.claim.kind, op.claim.key)})"
        )
    owner = row[0]
    if owner != op.owner:
        raise ConflictError(
            f"lease {lease} belongs to {describe_owner(owner)}; "
            f"{describe_owner(op.owner)} cannot claim under it",
            kind="lease",
            key=lease,
            holder=owner,
        )


def _release(write: _Write, op: ReleaseOp) -> None:
    row = write.live(op.kind, op.key)
    if row is None:
        return  # releasing a free key is a no-op, so undo paths can rerun
    holder, value, since, _, lease = row
    if holder != op.owner:
        raise conflict(op.kind, op.key, holder, since, who=op.owner, action="release")
    write.conn.execute("DELETE FROM records WHERE kind = ? AND key = ?", (op.kind, op.key))
    write.log("delete", op.kind, op.key, holder, value, lease)


def _release_all(write: _Write, op: ReleaseAllOp) -> None:
    where, params = "owner = ?", [op.owner]
    if op.kind is not None:
        where += " AND kind = ?"
        params.append(op.kind)
    rows = write.conn.execute(
        f"SELECT kind, key, value, lease FROM records WHERE {where} ORDER BY kind, key",  # noqa: S608
        params,
    ).fetchall()
    for kind, key, value, lease in rows:
        write.log("delete", kind, key, op.owner, value, lease)
    if rows:
        write.conn.execute(f"DELETE FROM records WHERE {where}", params)  # noqa: S608


def _current_revision(conn: sqlite3.Connection) -> int:
    # The newest change always survives compaction, so it is the revision; keeping no separate
    # counter saves a page write per commit.
    row = conn.execute("SELECT max(revision) FROM changes").fetchone()
    return int(row[0]) if row[0] is not None else 0


def _meta(conn: sqlite3.Connection, name: str) -> int:
    row = conn.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
    return int(row[0]) if row is not None else 0


def _record(row: tuple[Any, ...]) -> Record:
    kind, key, owner, value, since, revision, lease = row
    return Record(kind, key, owner, json.loads(value), since, revision, lease)


def _prefix_end(prefix: str) -> str | None:
    """Return the smallest string greater than every string starting with ``prefix``."""
    while prefix:
        last = ord(prefix[-1])
        if last < 0x10FFFF:
            bumped = last + 1
            if 0xD800 <= bumped <= 0xDFFF:  # surrogates cannot be encoded; skip past them
                bumped = 0xE000
            return prefix[:-1] + chr(bumped)
        prefix = prefix[:-1]
    return None


def _prepare_file(path: Path) -> None:
    """Create the ledger file 0600 (and a missing parent 0700) before SQLite opens it.

    SQLite gives the -wal and -shm files the database file's mode, so they are 0600 too.
    An existing parent directory is left alone: it may be a shared one the user chose.
    """
    try:
        if not path.parent.exists():
            path.parent.mkdir(mode=0o700, parents=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise CorralError(f"ledger {path} is not a regular file", retry=False)
            if st.st_mode & 0o077:
                os.fchmod(fd, 0o600)
        finally:
            os.close(fd)
    except OSError as exc:
        raise CorralError(f"cannot create ledger {path}: {exc}", retry=False) from exc


def _configure(
    conn: sqlite3.Connection, path: Path, synchronous: Synchronous, busy_timeout_ms: int
) -> None:
    try:
        # Small pages: a commit writes one WAL frame per dirty page (records, owner index,
        # change log), and rows here are ~100 bytes; 1 KiB pages made a claim+release ~25%
        # faster than 4 KiB. Only takes effect when the file is created.
        conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        conn.execute(f"PRAGMA synchronous = {synchronous}")  # literal from a closed set
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        conn.execute("PRAGMA trusted_schema = OFF")
    except sqlite3.DatabaseError as exc:
        raise CorralError(f"cannot open ledger {path}: {exc}", retry=False) from exc
    if str(mode).lower() != "wal":
        raise CorralError(
            f"ledger {path} cannot use WAL mode (got journal_mode={mode}); "
            "is it on a filesystem without shared memory support?",
            retry=False,
        )


def _migrate(conn: sqlite3.Connection, path: Path) -> None:
    """Bring the schema to ``SCHEMA_VERSION`` in one transaction; refuse a newer file."""
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as exc:
        raise UnavailableError(f"ledger {path} is busy: {exc}") from exc
    try:
        has_meta = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
        ).fetchone()
        version = _meta(conn, "schema_version") if has_meta else 0
        if version > SCHEMA_VERSION:
            raise CorralError(
                f"ledger {path} has schema version {version}, newer than this corral "
                f"understands ({SCHEMA_VERSION}); upgrade corral",
                retry=False,
            )
        for statements in MIGRATIONS[version:]:
            for statement in statements:
                conn.execute(statement)
        if version < SCHEMA_VERSION:
            conn.execute(
                "INSERT INTO meta (name, value) VALUES ('schema_version', ?) "
                "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                (SCHEMA_VERSION,),
            )
        conn.execute("COMMIT")
    except sqlite3.DatabaseError as exc:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise CorralError(f"cannot open ledger {path}: {exc}", retry=False) from exc
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
