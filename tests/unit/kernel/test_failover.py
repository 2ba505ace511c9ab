"""``corral.failover``: leadership, adoption of a lost host's app, eviction, the fencing rule.

Two or three host views over one SQLite ledger stand for kernels on one etcd cluster (the
records are what ``HostView`` writes); tests/e2e/test_failover.py runs it all on etcd.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from corral.errors import ConflictError, CorralError, NotFoundError
from corral.failover import (
    Failover,
    give_back,
    moved_away,
    should_fence,
    transfer,
)
from corral.ledger import Claim, HostView, SqliteLedger, Txn


@pytest.fixture
def shared(tmp_path: Path) -> Iterator[SqliteLedger]:
    ledger = SqliteLedger(tmp_path / "ledger.sqlite3")
    yield ledger
    ledger.close()


def live(shared: SqliteLedger, host: str, instances: int = 0) -> str:
    lease = shared.grant_lease(60, f"host:{host}")
    txn = Txn().claim(f"host:{host}", "host", host, {"address": host})
    txn.claim(f"host:{host}", "host-alive", host, {"instances": instances}, lease=lease)
    shared.commit(txn)
    return lease


def deploy(shared: SqliteLedger, host: str, app: str, port: str = "8080") -> None:
    """What a deploy on ``host`` leaves in the ledger (through its view)."""
    view = HostView(shared, host)
    uid = str(61000 + len(shared.list(kind="uid")))
    view.claim(app, [Claim("app", app, {"release": 1}), Claim("uid", uid, {"app": app}),
                     Claim("lbname", app), Claim("port", port),
                     Claim("instance", f"{app}-web-1", {"record": {}})])
    view.put(f"releases:{app}", "release", f"{app}/v1", {"number": 1, "status": "deployed"})


def test_transfer_moves_the_cluster_records_only_while_the_host_is_lost(
        shared: SqliteLedger) -> None:
    lease = live(shared, "h2")
    live(shared, "h1")
    deploy(shared, "h2", "shop")
    with pytest.raises(ConflictError, match="host 'h2' is alive"):
        transfer(shared, "shop", "h2", "h1")
    shared.revoke(lease)
    moved = transfer(shared, "shop", "h2", "h1")
    assert sorted((r.kind, r.owner) for r in moved) == [
        ("app", "shop@h2"), ("lbname", "shop@h2"), ("release", "releases:shop@h2"),
        ("uid", "shop@h2")]
    h1 = HostView(shared, "h1")
    assert h1.get("app", "shop") is not None and h1.get("release", "shop/v1") is not None
    assert shared.get("uid", "61000").owner == "shop@h1"  # type: ignore[union-attr]
    # what only meant something on h2 stays h2's (until it comes back, or is forgotten)
    assert shared.get("port", "@h2/8080").owner == "shop@h2"  # type: ignore[union-attr]
    assert transfer(shared, "shop", "h2", "h1") == []  # again: h1 holds it already
    with pytest.raises(NotFoundError, match=r"holds no app 'shop' .*held by shop@h1"):
        transfer(shared, "shop", "h2", "h3")


def test_transfer_is_all_or_nothing(shared: SqliteLedger) -> None:
    live(shared, "h1")
    deploy(shared, "h2", "shop")
    h2 = HostView(shared, "h2")
    records = sorted(shared.list(owner="shop@h2"), key=lambda r: r.kind)
    # the lost host comes back between the read and the commit: nothing moves
    real_commit = shared.commit

    def racing(txn: Txn) -> int:
        shared.commit = real_commit  # type: ignore[method-assign]
        live(shared, "h2")
        return real_commit(txn)

    shared.commit = racing  # type: ignore[method-assign]
    with pytest.raises(ConflictError):
        transfer(shared, "shop", "h2", "h1")
    assert sorted(shared.list(owner="shop@h2"), key=lambda r: r.kind) == records
    assert h2.get("app", "shop") is not None


def test_give_back_undoes_a_transfer_also_of_records_a_failed_start_released(
        shared: SqliteLedger) -> None:
    live(shared, "h1")
    deploy(shared, "h2", "shop")
    before = {(r.kind, r.key): (r.owner, r.value) for r in shared.list()
              if r.owner.endswith("@h2")}
    moved = transfer(shared, "shop", "h2", "h1")
    shared.release("shop@h1", [("app", "shop")])  # the failed start released the name
    give_back(shared, moved, "h1")
    after = {(r.kind, r.key): (r.owner, r.value) for r in shared.list()
             if r.owner.endswith("@h2")}
    assert after == before
    assert shared.list(owner="shop@h1") == []


def test_moved_away_finds_a_returning_hosts_apps_adopted_elsewhere(
        shared: SqliteLedger) -> None:
    live(shared, "h1")
    deploy(shared, "h2", "shop")
    deploy(shared, "h2", "blog", port="8081")
    assert moved_away(shared, "h2") == {}
    transfer(shared, "shop", "h2", "h1")
    found = moved_away(shared, "h2")
    assert set(found) == {"shop"}
    assert sorted(r.kind for r in found["shop"]) == ["instance", "port"]
    assert moved_away(shared, "h1") == {}


@pytest.mark.parametrize(("members", "fence"), [
    ([], True),
    ([("a", "no-leader"), ("b", "unknown"), ("c", "unknown")], True),  # cut off: others go on
    ([("a", "unknown"), ("b", "unknown"), ("c", "unknown")], True),
    ([("a", "no-leader"), ("b", "leader"), ("c", "unknown")], False),  # a way to the quorum
    ([("a", "leader"), ("b", "unknown"), ("c", "unknown")], False),
    ([("a", "no-leader"), ("b", "down"), ("c", "unknown")], False),  # quorum lost everywhere
    ([("a", "no-leader"), ("b", "down"), ("c", "down")], False),
    ([("a", "no-leader"), ("b", "no-leader"), ("c", "unknown")], False),
    ([("a", "no-leader"), ("b", "unknown"), ("c", "unknown"), ("d", "unknown"),
      ("e", "down")], True),
    ([("a", "no-leader"), ("b", "unknown"), ("c", "unknown"), ("d", "down"),
      ("e", "down")], False),
])
def test_fencing_rule(members: list[tuple[str, str]], fence: bool) -> None:
    assert should_fence(members) is fence


def test_one_leader_at_a_time_and_the_next_when_its_lease_goes(
        shared: SqliteLedger) -> None:
    leases = {h: live(shared, h) for h in ("h1", "h2", "h3")}

    async def never(host: str, op: str, args: dict[str, Any]) -> dict[str, Any]:
        raise AssertionError("not asked")

    views = {h: Failover(shared, h, lambda h=h: leases[h], never)  # type: ignore[misc]
             for h in leases}
    assert views["h2"].lead() is True
    assert views["h1"].lead() is False and views["h3"].lead() is False
    assert views["h2"].lead() is True
    shared.revoke(leases["h2"])  # h2 dies: its lease and leadership go together
    assert views["h3"].lead() is True
    assert views["h1"].lead() is False


def test_the_leader_places_orphans_on_the_least_loaded_host_and_skips_refusals(
        shared: SqliteLedger) -> None:
    leases = {h: live(shared, h) for h in ("h1", "h2", "h3")}
    deploy(shared, "h1", "a1")
    deploy(shared, "h1", "a2", port="8081")
    deploy(shared, "h3", "c1")
    deploy(shared, "h2", "shop")
    asked: list[tuple[str, dict[str, Any]]] = []

    async def ask(host: str, op: str, args: dict[str, Any]) -> dict[str, Any]:
        asked.append((host, args))
        if host == "h3":
            raise CorralError("release v1 of 'shop' is not copied to host h3 yet")
        return {"adopted": True}

    leader = Failover(shared, "h1", lambda: leases["h1"], ask)
    assert leader.orphans() == []
    shared.revoke(leases["h2"])
    assert leader.orphans() == [("shop", "h2")]
    assert leader.candidates("h2") == ["h3", "h1"]  # 1 app on h3, 2 on h1
    assert asyncio.run(leader.place("shop", "h2")) == "h1"
    assert [h for h, _ in asked] == ["h3", "h1"]
    assert asked[0][1] == {"name": "shop", "from_host": "h2"}
    assert leader.placed[0]["to"] == "h1"


def test_an_app_no_host_takes_waits_before_it_is_placed_again(shared: SqliteLedger) -> None:
    leases = {h: live(shared, h) for h in ("h1", "h3")}
    deploy(shared, "h2", "shop")
    asked: list[str] = []

    async def refuse(host: str, op: str, args: dict[str, Any]) -> dict[str, Any]:
        asked.append(host)
        raise CorralError("release v1 of 'shop' is not copied here yet")

    leader = Failover(shared, "h1", lambda: leases["h1"], refuse)
    assert leader.due("shop")
    assert asyncio.run(leader.place("shop", "h2")) is None
    assert sorted(asked) == ["h1", "h3"]
    assert not leader.due("shop") and leader.failed["shop"][0] == 1
    leader.failed["shop"] = (1, 0.0)  # its wait is over
    assert leader.due("shop")
    assert asyncio.run(leader.place("shop", "h2")) is None
    assert leader.failed["shop"][0] == 2


def test_placement_allows_by_name_labels_and_avoided_labels() -> None:
    from corral.manifest import PlacementSection

    anywhere = PlacementSection()
    assert anywhere.allows("h1", []) and anywhere.describe() == "any host"
    p = PlacementSection(hosts=["h1", "h2"], labels=["ssd"], avoid=["edge"])
    assert p.allows("h1", ["ssd", "eu"])
    assert not p.allows("h3", ["ssd"])  # not one of its hosts
    assert not p.allows("h1", ["eu"])  # lacks ssd
    assert not p.allows("h2", ["ssd", "edge"])  # avoided
    assert p.describe() == "hosts h1, h2; labels ssd; avoiding edge"


def test_the_leader_places_an_app_only_where_its_placement_allows(
        shared: SqliteLedger) -> None:
    leases = {}
    for host, labels in (("h1", ["ssd"]), ("h3", [])):
        lease = shared.grant_lease(60, f"host:{host}")
        txn = Txn().claim(f"host:{host}", "host", host, {"address": host})
        txn.claim(f"host:{host}", "host-alive", host, {"labels": labels}, lease=lease)
        shared.commit(txn)
        leases[host] = lease
    deploy(shared, "h1", "a1")  # h1 has more apps than h3
    view = HostView(shared, "h2")
    view.claim("shop", [Claim("app", "shop", {"release": 1, "spec": {"manifest": {
        "placement": {"labels": ["ssd"]}}}})])
    view.claim("blog", [Claim("app", "blog", {"release": 1, "spec": {"manifest": {
        "placement": {"avoid": ["ssd"], "hosts": ["h9"]}}}})])
    leader = Failover(shared, "h1", lambda: leases["h1"], never_asked)
    assert leader.candidates("h2") == ["h3", "h1"]
    assert leader.candidates("h2", "shop") == ["h1"]
    assert leader.candidates("h2", "blog") == []
    assert asyncio.run(leader.place("blog", "h2")) is None  # waits: no host fits


async def never_asked(host: str, op: str, args: dict[str, Any]) -> dict[str, Any]:
    raise AssertionError(f"{host} asked")


def test_a_handover_needs_the_live_hosts_record_naming_the_receiver(
        shared: SqliteLedger) -> None:
    lease = live(shared, "h2")
    live(shared, "h1")
    deploy(shared, "h2", "shop")
    with pytest.raises(ConflictError, match="host 'h2' is not handing app 'shop' over to "
                                            "host 'h1'"):
        transfer(shared, "shop", "h2", "h1", handover=True)
    shared.put("host:h2", "handover", "shop", {"to": "h3"}, lease=lease)
    with pytest.raises(ConflictError, match="not handing app 'shop' over to host 'h1'"):
        transfer(shared, "shop", "h2", "h1", handover=True)
    shared.put("host:h2", "handover", "shop", {"to": "h1"}, lease=lease)
    shared.put("host:h1", "handover", "blog", {"to": "h1"})  # not h2's word
    moved = transfer(shared, "shop", "h2", "h1", handover=True)
    assert {r.kind for r in moved} == {"app", "uid", "lbname", "release"}
    assert shared.get("app", "shop").owner == "shop@h1"  # type: ignore[union-attr]
    with pytest.raises(ConflictError, match="host 'h2' is alive"):  # no handover: refused
        transfer(shared, "shop", "h2", "h3")
