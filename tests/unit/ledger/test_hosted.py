"""``HostView``: several hosts on one ledger, cluster-wide kinds unique, the rest per host.

Two views (h1, h2) over one SQLite ledger stand for two kernels on one etcd cluster: the view
only maps keys and owners, so the backend does not matter here (the etcd backend passes the
same ledger contract tests, and tests/e2e/test_multihost.py runs views on etcd for real).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.errors import ConflictError
from corral.ledger import Claim, HostView, Ledger, SqliteLedger, Txn


@pytest.fixture
def shared(tmp_path: Path) -> Iterator[SqliteLedger]:
    ledger = SqliteLedger(tmp_path / "ledger.sqlite3")
    yield ledger
    ledger.close()


@pytest.fixture
def h1(shared: SqliteLedger) -> HostView:
    return HostView(shared, "h1")


@pytest.fixture
def h2(shared: SqliteLedger) -> HostView:
    return HostView(shared, "h2")


def test_an_app_name_held_on_one_host_is_refused_on_another_naming_host(
        h1: HostView, h2: HostView) -> None:
    h1.claim("shop", [Claim("app", "shop", {"v": 1}), Claim("port", "8080")])
    with pytest.raises(ConflictError) as err:
        h2.claim("shop", [Claim("app", "shop", {"v": 2}), Claim("port", "8080")])
    assert "app 'shop' is held by app 'shop' on host h1" in str(err.value)
    assert err.value.details["holder"] == "shop@h1"
    # nothing of the refused claim was written: h2's port 8080 is still free
    assert h2.list() == []
    assert h1.get("app", "shop") is not None
    assert h1.get("app", "shop").value == {"v": 1}  # type: ignore[union-attr]


def test_per_host_kinds_are_separate_per_host(h1: HostView, h2: HostView,
                                              shared: SqliteLedger) -> None:
    h1.claim("shop", [Claim("port", "8080"), Claim("path", "/srv/data")])
    h2.claim("blog", [Claim("port", "8080"), Claim("path", "/srv/data")])
    assert [(r.kind, r.key, r.owner) for r in h1.list()] == [
        ("path", "/srv/data", "shop"), ("port", "8080", "shop")]
    assert [(r.kind, r.key, r.owner) for r in h2.list(kind="port")] == [("port", "8080", "blog")]
    assert sorted((r.key, r.owner) for r in shared.list(kind="port")) == [
        ("@h1/8080", "shop@h1"), ("@h2/8080", "blog@h2")]
    # on one host a port is still one app's: the message names the host
    with pytest.raises(ConflictError, match=r"port 8080 on host h1 is held by app 'shop' on "
                                            r"host h1 since .* \(app 'blog' on host h1 cannot "
                                            r"claim it\)"):
        h1.put("blog", "port", "8080")


def test_release_of_an_owner_takes_only_its_own_hosts_records(
        h1: HostView, h2: HostView, shared: SqliteLedger) -> None:
    h1.claim("web", [Claim("port", "80"), Claim("instance", "web.1")])
    h2.claim("web", [Claim("port", "80"), Claim("instance", "web.1")])
    h1.release("web")
    assert h1.list() == []
    assert [(r.kind, r.key) for r in h2.list(owner="web")] == [("instance", "web.1"),
                                                               ("port", "80")]
    assert len(shared.list()) == 2


def test_reads_show_this_hosts_records_and_shared_kinds_of_all(h1: HostView,
                                                               h2: HostView) -> None:
    h1.claim("shop", [Claim("app", "shop"), Claim("uid", "61001"), Claim("release", "shop/1")])
    h2.claim("blog", [Claim("app", "blog"), Claim("uid", "61002")])
    assert [r.key for r in h2.list(kind="app")] == ["blog"]  # never another host's apps
    assert h2.get("app", "shop") is None
    assert h2.get("release", "shop/1") is None
    # uids come from one range: every host sees every uid taken, others' owners qualified
    assert sorted((r.key, r.owner) for r in h2.list(kind="uid")) == [
        ("61001", "shop@h1"), ("61002", "blog")]
    assert h2.holder("app", "shop") == "shop@h1"
    assert h2.holder("app", "nobody") is None
    with pytest.raises(ValueError):
        h2.holder("port", "80")


def test_prefix_filters_apply_to_the_callers_keys(h1: HostView) -> None:
    h1.claim("shop", [Claim("instance", "shop.web.1"), Claim("instance", "shop.web.2"),
                      Claim("instance", "blog.web.1"), Claim("release", "shop/1")])
    assert [r.key for r in h1.list(kind="instance", prefix="shop.")] == ["shop.web.1",
                                                                         "shop.web.2"]
    assert [r.key for r in h1.list(prefix="shop")] == ["shop.web.1", "shop.web.2", "shop/1"]


def test_transactions_compares_and_group_commit_map_too(h1: HostView, h2: HostView) -> None:
    h1.put("shop", "port", "9000")
    held = h1.get("port", "9000")
    assert held is not None and held.owner == "shop"
    txn = Txn().expect_held("port", "9000", "shop", revision=held.revision)
    txn.claim("shop", "port", "9001")
    rev = h1.commit(txn)
    assert txn.revision == rev
    # h2's port 9000 is free although h1's is held
    assert h2.commit(Txn().expect_free("port", "9000").claim("x", "port", "9000")) > rev
    results = h2.commit_many([Txn().claim("a", "lbname", "web"),
                              Txn().claim("b", "lbname", "web"),
                              Txn().claim("b", "port", "9001")])
    assert isinstance(results[0], int) and isinstance(results[2], int)
    assert isinstance(results[1], ConflictError)
    assert "held by app 'a' on host h2" in str(results[1])
    with pytest.raises(ConflictError):
        h1.put("c", "lbname", "web")  # cluster-wide: h2's app a holds it


def test_changes_and_leases_as_this_host_sees_them(h1: HostView, h2: HostView) -> None:
    start = h1.revision()
    lease = h1.grant_lease(30, "shop")
    h1.put("shop", "instance", "shop.1", lease=lease)
    h2.put("blog", "instance", "blog.1")
    seen = [(c.type, c.kind, c.key, c.owner, c.lease) for c in h1.changes(start)]
    assert seen == [("put", "instance", "shop.1", "shop", lease)]
    found = h1.lease(lease)
    assert found is not None and found.owner == "shop"
    assert h1.keepalive(lease).owner == "shop"
    h1.revoke(lease)
    assert h1.list(kind="instance") == []
    assert [r.key for r in h2.list(kind="instance")] == ["blog.1"]


def test_a_name_with_the_separators_is_refused(shared: Ledger) -> None:
    for bad in ("", "h@1", "h/1"):
        with pytest.raises(ValueError):
            HostView(shared, bad)


def test_a_lost_host_is_forgotten_and_its_names_are_free(h1: HostView, h2: HostView,
                                                         shared: SqliteLedger) -> None:
    """``corral hosts forget``: everything h1 held goes, h2's stays; refused while h1 is
    alive, for the asking host itself and for a host the ledger does not know."""
    from corral.errors import NotFoundError
    from corral.hosts import ALIVE, HOST, forget_host, list_hosts

    h1.claim("shop", [Claim("app", "shop"), Claim("port", "8080"), Claim("uid", "61000"),
                      Claim("release", "shop/1"), Claim("instance", "shop.web.1")])
    h2.claim("blog", [Claim("app", "blog"), Claim("port", "8080")])
    h1.claim("net", [Claim("subnet", "10.231.0.0/22", {"host": "h1"})])
    h2.claim("net", [Claim("subnet", "10.231.4.0/22", {"host": "h2"})])
    assert [(r.key, r.owner) for r in h2.list(kind="subnet")] == [
        ("10.231.0.0/22", "net@h1"), ("10.231.4.0/22", "net")]  # every host lists them all
    shared.put("host:h1", HOST, "h1", {"address": "10.0.0.1"})
    shared.put("host:h2", HOST, "h2", {"address": "10.0.0.2"})
    lease = shared.grant_lease(30, "host:h1")
    shared.put("host:h1", ALIVE, "h1", {"pid": 7, "seen": 0}, lease=lease)
    rows = {r["name"]: r for r in list_hosts(shared, "h2")}
    assert rows["h1"]["apps"] == ["shop"] and rows["h2"]["apps"] == ["blog"]
    assert rows["h1"]["subnets"] == ["10.231.0.0/22"]
    assert rows["h2"]["subnets"] == ["10.231.4.0/22"]
    assert rows["h1"]["state"] == "ready" and rows["h2"]["state"] == "lost"

    with pytest.raises(ConflictError, match="host 'h1' is alive"):
        forget_host(shared, "h1", "h2")
    with pytest.raises(ConflictError, match="is this host"):
        forget_host(shared, "h2", "h2")
    with pytest.raises(NotFoundError):
        forget_host(shared, "h9", "h2")
    assert h1.get("app", "shop") is not None  # nothing changed

    shared.revoke(lease)  # h1 lost
    done = forget_host(shared, "h1", "h2")
    assert done["released"] == {"app": 1, "port": 1, "uid": 1, "release": 1, "instance": 1,
                                "subnet": 1}
    assert not [r for r in shared.list() if "h1" in r.owner or r.key.startswith("@h1/")]
    assert shared.get(HOST, "h1") is None
    assert [(r.kind, r.key) for r in h2.list(owner="blog")] == [("app", "blog"),
                                                                ("port", "8080")]
    assert [r.key for r in h2.list(kind="subnet")] == ["10.231.4.0/22"]  # h2's stays
    h2.claim("shop", [Claim("app", "shop")])  # the name is free now
    assert [r["name"] for r in list_hosts(shared, "h2")] == ["h2"]


def test_wait_for_change_sees_only_its_kind_and_prefix(h1: HostView, h2: HostView) -> None:
    """``wait_for_change`` (the polling default, through a host view): a change made after the
    revision given counts, even before the call; other kinds, prefixes and hosts do not."""
    import threading
    import time as _time

    start = h1.revision()
    h2.put("blog", "mail", "x/1")  # h2's own key: not h1's "x/" prefix
    h1.put("shop", "other", "x/1")
    began = _time.monotonic()
    assert h1.wait_for_change("mail", "x/", start, 0.3) is False
    assert _time.monotonic() - began >= 0.3
    h1.put("shop", "mail", "x/2")  # before the call, after ``start``: reported
    assert h1.wait_for_change("mail", "x/", start, 5) is True
    now = h1.revision()
    later = threading.Timer(0.2, lambda: h1.put("shop", "mail", "x/3"))
    later.start()
    began = _time.monotonic()
    assert h1.wait_for_change("mail", "x/", now, 5) is True
    assert _time.monotonic() - began < 2
    later.join()
