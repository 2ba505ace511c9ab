"""Claims, releases, transactions, leases and the change log of the SQLite ledger."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.errors import ConflictError, CorralError, ErrorCode, NotFoundError
from corral.ledger import Claim, CompactedError, SqliteLedger, Txn

T0 = 1795600800.0  # 2026-11-25T10:00:00Z


class Clock:
    """A settable Unix clock, so lease expiry is tested without sleeping."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def ledger(tmp_path: Path, clock: Clock) -> Iterator[SqliteLedger]:
    led = SqliteLedger(tmp_path / "home" / "ledger.sqlite3", clock=clock)
    yield led
    led.close()


SINCE = "2026-11-25T10:00:00Z"


def keys(ledger: SqliteLedger, owner: str | None = None) -> list[tuple[str, str, str]]:
    return [(r.kind, r.key, r.owner) for r in ledger.list(owner=owner)]


def test_conflict_in_the_middle_of_a_claim_writes_nothing(
    ledger: SqliteLedger, clock: Clock
) -> None:
    """A multi-claim that meets another owner's key in the middle writes none of its keys."""
    ledger.claim("blog", [Claim("port", "8000", {"app": "blog"})])
    clock.advance(3600)
    before = ledger.revision()

    with pytest.raises(ConflictError) as info:
        ledger.claim(
            "shop",
            [
                Claim("app", "shop"),
                Claim("port", "9000"),
                Claim("port", "8000"),
                Claim("lbname", "shop"),
            ],
        )

    err = info.value
    assert str(err) == (
        f"port 8000 is held by app 'blog' since {SINCE} (app 'shop' cannot claim it)"
    )
    assert (err.kind, err.key, err.holder, err.since) == ("port", "8000", "blog", SINCE)
    assert err.code == ErrorCode.CONFLICT and err.retry is False
    assert err.details == {"kind": "port", "key": "8000", "holder": "blog", "since": SINCE}
    assert keys(ledger) == [("port", "8000", "blog")]
    assert ledger.get("port", "9000") is None
    assert ledger.revision() == before
    assert ledger.changes(before) == []


def test_driver_owner_is_named_as_a_driver(ledger: SqliteLedger) -> None:
    """Owners of the form role:name read as "<role> '<name>'" in conflicts."""
    ledger.put("driver:net", "address", "10.77.0.2", {"app": "blog"})
    with pytest.raises(ConflictError, match=r"^address '10.77.0.2' is held by driver 'net' since"):
        ledger.put("blog", "address", "10.77.0.2")


def test_reclaim_by_the_same_owner_is_idempotent_and_updates_values(
    ledger: SqliteLedger, clock: Clock
) -> None:
    """Re-claiming identical values changes nothing; a new value replaces the old, since stays."""
    claims = [Claim("app", "blog", {"dir": "/srv/blog"}), Claim("port", "8000")]
    first = ledger.claim("blog", claims)
    clock.advance(60)

    assert ledger.claim("blog", claims) == first
    assert ledger.changes(first) == []

    second = ledger.claim("blog", [Claim("app", "blog", {"dir": "/srv/blog2"})])
    assert second == first + 1
    record = ledger.get("app", "blog")
    assert record is not None
    assert record.value == {"dir": "/srv/blog2"}
    assert record.since == SINCE
    assert record.revision == second
    assert ledger.get("port", "8000") is not None  # untouched by the partial re-claim


def test_release_all_of_an_owner_keeps_the_others(ledger: SqliteLedger) -> None:
    """release(owner) drops every record of that owner and nothing else."""
    ledger.claim("blog", [Claim("app", "blog"), Claim("port", "8000"), Claim("path", "/srv/b")])
    ledger.claim("shop", [Claim("app", "shop"), Claim("port", "9000")])

    rev = ledger.release("blog")

    assert keys(ledger) == [("app", "shop", "shop"), ("port", "9000", "shop")]
    assert [(c.type, c.kind, c.key) for c in ledger.changes(rev - 1)] == [
        ("delete", "app", "blog"),
        ("delete", "path", "/srv/b"),
        ("delete", "port", "8000"),
    ]
    assert ledger.release("blog") == rev  # nothing left: no new revision


def test_release_of_another_owners_key_is_refused(ledger: SqliteLedger) -> None:
    """Releasing a key someone else holds raises and releases none of the listed keys."""
    ledger.claim("blog", [Claim("port", "8000")])
    ledger.claim("shop", [Claim("port", "9000")])

    with pytest.raises(ConflictError) as info:
        ledger.release("shop", [("port", "9000"), ("port", "8000")])

    assert info.value.holder == "blog"
    assert "app 'shop' cannot release it" in str(info.value)
    assert keys(ledger) == [("port", "8000", "blog"), ("port", "9000", "shop")]


def test_release_of_a_free_key_is_a_noop(ledger: SqliteLedger) -> None:
    """Undo paths may release twice: a free key releases silently, without a revision."""
    rev = ledger.put("blog", "port", "8000")
    assert ledger.release("blog", [("port", "8000")]) == rev + 1
    assert ledger.release("blog", [("port", "8000")]) == rev + 1


def test_transaction_replaces_instances_atomically(ledger: SqliteLedger) -> None:
    """A transaction releases old instance records and claims new ones in one revision."""
    ledger.claim("blog", [Claim("instance", "blog.web.0", {"pid": 100, "start": 1.0})])

    with ledger.transaction() as txn:
        txn.release("blog", "instance", "blog.web.0")
        txn.claim("blog", "instance", "blog.web.0", {"pid": 200, "start": 2.0})
        txn.claim("blog", "instance", "blog.web.1", {"pid": 201, "start": 2.0})

    assert txn.revision == 2
    assert [(c.revision, c.type, c.key, c.value) for c in ledger.changes(1)] == [
        (2, "delete", "blog.web.0", {"pid": 100, "start": 1.0}),
        (2, "put", "blog.web.0", {"pid": 200, "start": 2.0}),
        (2, "put", "blog.web.1", {"pid": 201, "start": 2.0}),
    ]


def test_transaction_block_that_raises_commits_nothing(ledger: SqliteLedger) -> None:
    """An exception inside the with-block drops the transaction."""
    with pytest.raises(RuntimeError), ledger.transaction() as txn:
        txn.claim("blog", "port", "8000")
        raise RuntimeError("changed my mind")
    assert ledger.list() == [] and ledger.revision() == 0


def test_transaction_failing_later_op_rolls_back_earlier_ones(ledger: SqliteLedger) -> None:
    """A conflict in a late op undoes the release and claims before it."""
    ledger.put("blog", "instance", "blog.web.0", {"pid": 1})
    ledger.put("shop", "port", "9000")
    with pytest.raises(ConflictError), ledger.transaction() as txn:
        txn.release("blog", "instance", "blog.web.0")
        txn.claim("blog", "instance", "blog.web.1")
        txn.claim("blog", "port", "9000")
    assert keys(ledger) == [("instance", "blog.web.0", "blog"), ("port", "9000", "shop")]


def test_compares_guard_a_transaction(ledger: SqliteLedger) -> None:
    """expect_free / expect_held (with revision) fail with a conflict and write nothing."""
    rev = ledger.put("blog", "app", "blog", {"state": "up"})

    with pytest.raises(ConflictError, match=r"expected app 'blog' to be free, but it is held"):
        with ledger.transaction() as txn:
            txn.expect_free("app", "blog").claim("blog", "port", "1")
    with pytest.raises(ConflictError, match=r"to be held by app 'shop', but it is held by"):
        with ledger.transaction() as txn:
            txn.expect_held("app", "blog", "shop").claim("blog", "port", "1")
    with pytest.raises(
        ConflictError, match=r"expected port 1 to be held by app 'blog', but it is free"
    ):
        with ledger.transaction() as txn:
            txn.expect_held("port", "1", "blog").claim("blog", "port", "2")
    with pytest.raises(ConflictError, match=r"it changed at revision 1 \(expected 7\)"):
        with ledger.transaction() as txn:
            txn.expect_held("app", "blog", "blog", revision=7).claim("blog", "port", "1")
    assert ledger.revision() == rev and ledger.get("port", "1") is None

    with ledger.transaction() as txn:
        txn.expect_held("app", "blog", "blog", revision=rev).expect_free("port", "1")
        txn.claim("blog", "app", "blog", {"state": "down"})
    assert txn.revision == rev + 1


def test_values_must_be_json_objects(ledger: SqliteLedger) -> None:
    """A value that is not a JSON object is refused, naming the record, and nothing is written."""
    with pytest.raises(CorralError, match=r"value of port 8000 is not JSON") as info:
        ledger.claim("blog", [Claim("app", "blog"), Claim("port", "8000", {"x": object()})])
    assert info.value.code == ErrorCode.INVALID
    with pytest.raises(CorralError, match=r"must be a JSON object, got list"):
        ledger.put("blog", "port", "8000", [1, 2])  # type: ignore[arg-type]
    with pytest.raises(CorralError, match=r"ledger kind must be a non-empty string"):
        ledger.put("blog", "", "8000")
    assert ledger.list() == []


def test_list_filters_by_owner_kind_and_key_prefix(ledger: SqliteLedger) -> None:
    """list() filters combine; prefix is a literal prefix of the key (no LIKE wildcards)."""
    ledger.claim("blog", [Claim("instance", "blog.web.0"), Claim("instance", "blog.web.1")])
    ledger.claim("blog", [Claim("instance", "blog.worker.0"), Claim("port", "8000")])
    ledger.claim("blogx", [Claim("instance", "blogx.web.0"), Claim("path", "/a%b_c")])
    ledger.claim("shop", [Claim("path", "/a%bXc"), Claim("path", "/a\U0010ffff")])

    assert [r.key for r in ledger.list(prefix="blog.web.")] == ["blog.web.0", "blog.web.1"]
    assert [r.key for r in ledger.list(kind="instance", prefix="blog")] == [
        "blog.web.0",
        "blog.web.1",
        "blog.worker.0",
        "blogx.web.0",
    ]
    assert [r.key for r in ledger.list(owner="blog", kind="port")] == ["8000"]
    assert [r.key for r in ledger.list(prefix="/a%b_")] == ["/a%b_c"]
    assert [r.key for r in ledger.list(prefix="/a\U0010ffff")] == ["/a\U0010ffff"]
    assert len(ledger.list(owner="blog")) == 4 and len(ledger.list()) == 8


def test_changes_report_puts_and_deletes_in_revision_order(ledger: SqliteLedger) -> None:
    """changes(since) replays every put and delete after ``since``, oldest first."""
    assert ledger.revision() == 0 and ledger.changes(0) == []
    ledger.put("blog", "app", "blog", {"v": 1})  # 1
    ledger.claim("blog", [Claim("port", "8000"), Claim("lbname", "blog")])  # 2
    ledger.put("blog", "app", "blog", {"v": 2})  # 3
    ledger.release("blog", [("port", "8000")])  # 4
    ledger.put("shop", "port", "8000")  # 5

    got = [(c.revision, c.type, c.kind, c.key, c.owner, c.value) for c in ledger.changes(0)]
    assert got == [
        (1, "put", "app", "blog", "blog", {"v": 1}),
        (2, "put", "port", "8000", "blog", {}),
        (2, "put", "lbname", "blog", "blog", {}),
        (3, "put", "app", "blog", "blog", {"v": 2}),
        (4, "delete", "port", "8000", "blog", {}),
        (5, "put", "port", "8000", "shop", {}),
    ]
    assert [c.revision for c in ledger.changes(3)] == [4, 5]
    assert ledger.changes(5) == [] and ledger.revision() == 5


def test_change_log_is_bounded_and_reports_compaction(tmp_path: Path) -> None:
    """Old revisions are compacted; asking for them raises CompactedError, recent ones work."""
    ledger = SqliteLedger(tmp_path / "l.sqlite3", history=10)
    for i in range(300):
        ledger.put("blog", "counter", "c", {"i": i})
    assert ledger.revision() == 300
    with pytest.raises(CompactedError) as info:
        ledger.changes(0)
    assert info.value.compacted == 256 - 10
    assert [c.value["i"] for c in ledger.changes(297)] == [297, 298, 299]
    assert len(ledger.changes(246)) == 54
    ledger.close()


def test_leases_expire_and_then_no_longer_block(ledger: SqliteLedger, clock: Clock) -> None:
    """A record whose lease expired is invisible and claimable before expire() collects it."""
    lease = ledger.grant_lease(10, "driver:net")
    ledger.claim("driver:net", [Claim("address", "10.77.0.2")], lease=lease)
    record = ledger.get("address", "10.77.0.2")
    assert record is not None and record.lease == lease

    clock.advance(10)
    assert ledger.get("address", "10.77.0.2") is None
    assert ledger.list() == []
    assert ledger.lease(lease) is None

    rev = ledger.put("blog", "address", "10.77.0.2")
    assert [(c.type, c.owner) for c in ledger.changes(rev - 1)] == [
        ("delete", "driver:net"),
        ("put", "blog"),
    ]
    with pytest.raises(NotFoundError, match=f"lease {lease} does not exist or has expired"):
        ledger.keepalive(lease)


def test_expire_collects_expired_leases(ledger: SqliteLedger, clock: Clock) -> None:
    """expire() deletes the records of expired leases only and reports how many."""
    short = ledger.grant_lease(5, "driver:lb")
    long = ledger.grant_lease(50, "driver:lb")
    ledger.claim("driver:lb", [Claim("lbname", "a"), Claim("lbname", "b")], lease=short)
    ledger.claim("driver:lb", [Claim("lbname", "c")], lease=long)
    ledger.put("driver:lb", "lbname", "d")

    assert ledger.expire() == 0
    clock.advance(6)
    rev = ledger.revision()
    assert ledger.expire() == 2
    assert ledger.revision() == rev + 1
    assert [r.key for r in ledger.list()] == ["c", "d"]
    assert ledger.expire(now=clock.now + 100) == 1
    assert [r.key for r in ledger.list()] == ["d"]


def test_keepalive_extends_and_revoke_deletes(ledger: SqliteLedger, clock: Clock) -> None:
    """keepalive pushes expiry to now + TTL; revoke deletes the lease's records, twice is fine."""
    lease = ledger.grant_lease(10, "driver:cron")
    ledger.put("driver:cron", "cron.slot", "blog.backup", {"at": "03:00"}, lease=lease)
    clock.advance(8)
    renewed = ledger.keepalive(lease)
    assert renewed.expires_at == clock.now + 10 and renewed.owner == "driver:cron"
    clock.advance(8)
    assert ledger.get("cron.slot", "blog.backup") is not None

    rev = ledger.revoke(lease)
    assert ledger.get("cron.slot", "blog.backup") is None
    assert [(c.type, c.key, c.lease) for c in ledger.changes(rev - 1)] == [
        ("delete", "blog.backup", lease)
    ]
    assert ledger.revoke(lease) == rev
    with pytest.raises(NotFoundError):
        ledger.put("driver:cron", "cron.slot", "x", lease=lease)


def test_claims_under_bad_leases_are_refused(ledger: SqliteLedger) -> None:
    """Claiming under an unknown lease or under another owner's lease writes nothing."""
    with pytest.raises(
        NotFoundError, match=r"lease nope does not exist .* \(claiming app 'blog'\)"
    ):
        ledger.claim("blog", [Claim("app", "blog"), Claim("port", "1")], lease="nope")
    theirs = ledger.grant_lease(10, "driver:net")
    with pytest.raises(ConflictError, match=r"belongs to driver 'net'; app 'blog' cannot") as info:
        ledger.put("blog", "port", "1", lease=theirs)
    assert info.value.kind == "lease" and info.value.holder == "driver:net"
    with pytest.raises(CorralError, match=r"lease TTL must be > 0"):
        ledger.grant_lease(0, "blog")
    assert ledger.list() == []


def test_lease_expires_in_real_time(tmp_path: Path) -> None:
    """With the real clock, a short lease lapses and its key becomes free."""
    ledger = SqliteLedger(tmp_path / "l.sqlite3")
    lease = ledger.grant_lease(0.2, "driver:net")
    ledger.put("driver:net", "address", "10.0.0.9", lease=lease)
    with pytest.raises(ConflictError):
        ledger.put("blog", "address", "10.0.0.9")
    time.sleep(0.3)
    ledger.put("blog", "address", "10.0.0.9")
    record = ledger.get("address", "10.0.0.9")
    assert record is not None and record.owner == "blog" and record.lease is None
    ledger.close()


def test_state_survives_reopening(tmp_path: Path, clock: Clock) -> None:
    """Records, leases and the revision are on disk, not in the object."""
    path = tmp_path / "l.sqlite3"
    with SqliteLedger(path, clock=clock) as ledger:
        lease = ledger.grant_lease(30, "driver:net")
        ledger.claim("blog", [Claim("app", "blog", {"n": 1}), Claim("port", "8000")])
        ledger.put("driver:net", "address", "10.0.0.2", lease=lease)
    with SqliteLedger(path, clock=clock) as ledger:
        assert ledger.revision() == 2
        assert keys(ledger) == [
            ("address", "10.0.0.2", "driver:net"),
            ("app", "blog", "blog"),
            ("port", "8000", "blog"),
        ]
        assert ledger.lease(lease) is not None
    with pytest.raises(CorralError, match=r"is closed"):
        ledger.get("app", "blog")


def test_two_connections_see_each_others_claims(tmp_path: Path) -> None:
    """Two Ledger objects on one file (two processes, in effect) still conflict correctly."""
    path = tmp_path / "l.sqlite3"
    a, b = SqliteLedger(path), SqliteLedger(path)
    a.put("blog", "port", "8000")
    with pytest.raises(ConflictError):
        b.put("shop", "port", "8000")
    assert b.put("shop", "port", "9000") == 2
    assert a.revision() == 2
    a.close()
    b.close()


def test_threads_share_one_ledger(ledger: SqliteLedger) -> None:
    """Calls from several threads are serialised: every claim lands, revisions stay unique."""
    errors: list[BaseException] = []

    def work(owner: str) -> None:
        try:
            for i in range(50):
                ledger.put(owner, "slot", f"{owner}.{i}")
                ledger.release(owner, [("slot", f"{owner}.{i}")])
                ledger.put(owner, "slot", f"{owner}.{i}")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(f"app{t}",)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(ledger.list()) == 200
    assert ledger.revision() == 600
    assert sorted({c.revision for c in ledger.changes(0)}) == list(range(1, 601))


def test_commit_many_isolates_failures_and_numbers_revisions(ledger: SqliteLedger) -> None:
    """A batch commits each Txn on its own: a failing one changes nothing, the rest land."""
    ledger.put("blog", "port", "8000")
    a = Txn().claim("shop", "port", "9000").claim("shop", "app", "shop")
    bad = Txn().claim("other", "port", "7000").claim("other", "port", "8000")
    same = Txn().claim("blog", "port", "8000")  # changes nothing
    b = Txn().release("blog", "port", "8000").claim("blog", "port", "8001")

    results = ledger.commit_many([a, bad, same, b])

    assert results[0] == 2 and a.revision == 2
    assert isinstance(results[1], ConflictError) and results[1].holder == "blog"
    assert bad.revision is None
    assert results[2] == 2
    assert results[3] == 3 and b.revision == 3
    assert ledger.get("port", "7000") is None
    assert [(c.revision, c.type, c.key) for c in ledger.changes(1)] == [
        (2, "put", "9000"),
        (2, "put", "shop"),
        (3, "delete", "8000"),
        (3, "put", "8001"),
    ]


def test_commit_many_crosses_compaction_marks(tmp_path: Path) -> None:
    """A batch spanning a compaction mark still compacts, and revisions stay contiguous."""
    ledger = SqliteLedger(tmp_path / "l.sqlite3", history=5)
    results = ledger.commit_many([Txn().claim("a", "n", "n", {"i": i}) for i in range(300)])
    assert results == list(range(1, 301))
    with pytest.raises(CompactedError):
        ledger.changes(0)
    assert [c.revision for c in ledger.changes(295)] == [296, 297, 298, 299, 300]
    ledger.close()


def test_a_busy_ledger_is_reported_as_retryable(tmp_path: Path) -> None:
    """When another process holds the write lock past the timeout, the error says busy, retry."""
    path = tmp_path / "l.sqlite3"
    ledger = SqliteLedger(path, busy_timeout_ms=100)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(CorralError, match=r"is busy") as info:
            ledger.put("blog", "port", "8000")
        assert info.value.retry is True and info.value.code == ErrorCode.UNAVAILABLE
        assert ledger.get("port", "8000") is None  # reads still work beside the writer
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert ledger.put("blog", "port", "8000") == 1
    ledger.close()
