"""The net driver on a shared ledger: one subnet per host, routes and peers, without root.

The kernel is the lb tests' ``ClusterKernel`` (``unit.lb._cluster``): each host's kernel
serves ``ledger.list``/``claim``/``release`` through the real ``HostView`` of its host over
one SQLite ledger, so this host's records come back with owner ``driver:net``, the others'
as ``driver:net@<host>``, and a claim of a key another owner holds is the ledger's own
conflict, as on etcd. The other hosts' records are written as their kernels write them
(their net drivers' through their own ``HostView``, the host records through the shared
ledger itself, a host forgotten by ``corral.hosts.forget_host``). The routing table and
nftables are fakes of the same contracts as ``Netlink`` and ``Nftables``.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import corral_net.driver as driver_module
from corral.errors import CorralError, ErrorCode
from corral.hosts import forget_host
from corral.ledger import Claim, HostView, SqliteLedger
from corral.protocol import Welcome
from corral_net.claim import HostClaim
from corral_net.config import NetConfig
from corral_net.driver import NetDriver
from corral_net.host import HostNetwork
from corral_net.model import DesiredState, InstanceNet
from corral_net.pool import AddressPool
from corral_net.routes import ROUTE_PROTOCOL, Route, RouteKeeper, plan_routes, wanted_routes
from corral_net.ruleset import build
from corral_net.subnets import (
    HostIdentity,
    HostSlices,
    SubnetRecord,
    address6_beside,
    claim_subnet,
    local_config,
    parse_records,
    peer_addresses,
)
from unit.lb._cluster import ClusterKernel

DEFAULT = NetConfig(resolvers=("10.0.0.53",))
net = ipaddress.ip_network
addr = ipaddress.ip_address


# -- the shared ledger and the fakes -------------------------------------------------------------

@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[SqliteLedger]:
    """The ledger every host shares (etcd's stand-in)."""
    shared = SqliteLedger(tmp_path / "ledger.sqlite3")
    yield shared
    shared.close()


class RacingKernel(ClusterKernel):
    """A ``ClusterKernel`` whose ``before_claim`` runs before each key of a ``ledger.claim``
    is claimed: another host's claim landing between this host's list and its claim."""

    def __init__(self, ledger: SqliteLedger, host: str,
                 before_claim: Callable[[str], None]) -> None:
        super().__init__(ledger, host)
        self.before_claim = before_claim

    async def call(self, op: str, args: dict[str, Any] | None = None, *,
                   timeout: float = 30.0) -> dict[str, Any]:
        if op == "ledger.claim" and args is not None:
            for claim in args["claims"]:
                self.before_claim(claim["key"])
        return await super().call(op, args, timeout=timeout)


def hold(ledger: SqliteLedger, cidr: str, host: str, address: str | None = None,
         pool6: str | None = None) -> None:
    """Host ``host``'s net driver holds subnet ``cidr`` (claimed through its host's view)."""
    HostView(ledger, host).claim("driver:net", [Claim("subnet", cidr, {
        "host": host, "address": address, "address6": None, "pool6": pool6})])


def register(ledger: SqliteLedger, host: str, address: str | None) -> None:
    """The kernel's host record of ``host``, written as ``corral.hosts`` writes it: owner
    ``host:<host>``, through the shared ledger itself."""
    ledger.put(f"host:{host}", "host", host, {"address": address})


def stored(ledger: SqliteLedger, cidr: str) -> tuple[str, dict[str, Any]] | None:
    """Subnet record ``cidr`` as the shared ledger stores it: (owner ``<owner>@<host>``,
    value), None when no host holds it."""
    record = ledger.get("subnet", cidr)
    return None if record is None else (record.owner, record.value)


def writes(ledger: SqliteLedger) -> list[tuple[str, str, str]]:
    """Every change of a subnet record so far, oldest first: (``put``/``delete``, key,
    stored owner). An unchanged re-claim writes nothing, as on etcd."""
    return [(c.type, c.key, c.owner) for c in ledger.changes(0) if c.kind == "subnet"]


class FakeTable:
    """A main routing table (``corral_net.routes.RouteTable``); ``refuse`` makes adding a
    route to that destination fail as the kernel would for a gateway on no link."""

    def __init__(self, *routes: Route) -> None:
        self.present = list(routes)
        self.refuse: set[str] = set()
        self.log: list[str] = []

    def routes(self) -> list[Route]:
        return list(self.present)

    def add_route(self, route: Route) -> None:
        if str(route.dst) in self.refuse:
            raise CorralError(f"net: route add {route}: Network is unreachable",
                              code=ErrorCode.INTERNAL)
        self.present.append(Route(route.dst, route.gateway, route.prefsrc))
        self.log.append(f"add {route.dst}")

    def replace_route(self, route: Route) -> None:
        self.present = [r for r in self.present if not (r.dst == route.dst and r.ours)]
        self.present.append(Route(route.dst, route.gateway, route.prefsrc))
        self.log.append(f"replace {route.dst}")

    def remove_route(self, route: Route) -> None:
        self.present = [r for r in self.present if not (r.dst == route.dst and r.ours)]
        self.log.append(f"remove {route.dst}")


class FakeNft:
    """``Nftables`` of a host with no table yet; records every batch applied."""

    def __init__(self) -> None:
        self.batches: list[list[dict[str, Any]]] = []

    def list_table(self, family: str, table: str) -> list[dict[str, Any]] | None:
        return None

    def apply(self, commands: list[dict[str, Any]], *, what: str) -> None:
        if commands:
            self.batches.append(commands)

    def counters(self, family: str, table: str) -> dict[str, tuple[int, int]]:
        return {}


class FakeNetlink(FakeTable):
    """``Netlink`` as the driver's cluster part uses it: routes, addresses, forwarding."""

    addresses: dict[str, list[str]] = {"eth0": ["10.9.0.1", "2001:db8::1"], "lo": []}

    def global_addresses(self) -> dict[str, list[str]]:
        return {k: list(v) for k, v in self.addresses.items()}

    def enable_forwarding(self, ipv6: bool) -> None:
        self.log.append(f"forwarding ipv6={ipv6}")


# -- config and slices ---------------------------------------------------------------------------

def test_host_prefix_defaults_to_22_and_a_host_of_its_own_never_checks_it() -> None:
    """A host's config with a /24 pool (tighter than the default host_prefix) still loads: the
    split is only checked on a shared ledger, or when host_prefix is set."""
    config = NetConfig.from_mapping({"pool4": "10.150.3.0/24"})
    assert config.host_prefix == 22
    with pytest.raises(CorralError, match=r"host_prefix 22: .*10\.150\.3\.0/24"):
        HostSlices.of(config)


@pytest.mark.parametrize(("raw", "named"), [
    ({"host_prefix": 16}, r"host_prefix 16: .*pool4 10\.231\.0\.0/16"),
    ({"host_prefix": 31}, "host_prefix 31"),
    ({"host_prefix": "22"}, "host_prefix '22'"),
    ({"host_prefix": True}, "host_prefix True"),
    ({"host_prefix": 22, "pool6": "fd00::/120"}, r"pool6 fd00::/120: .*host_prefix 22"),
])
def test_a_host_prefix_that_does_not_fit_names_the_field(raw: dict[str, Any],
                                                         named: str) -> None:
    """host_prefix must be an integer longer than pool4's prefix, at most 30, and pool6 cut
    into as many slices must give each as many instance pairs."""
    with pytest.raises(CorralError, match=named) as info:
        NetConfig.from_mapping(raw)
    assert info.value.code == ErrorCode.INVALID
    assert "[drivers.net]" in info.value.reason


def test_slices_cut_both_pools_alike() -> None:
    """Slice N of pool4 goes with slice N of pool6; every slice is inside its pool, none
    overlaps another, and the index is read back from the CIDR."""
    slices = HostSlices.of(DEFAULT)
    assert slices.count == 64
    assert [str(n) for n in slices.slice(0)] == ["10.231.0.0/22", "fd63:6f72:7261:1::/70"]
    assert [str(n) for n in slices.slice(1)] == ["10.231.4.0/22",
                                                 "fd63:6f72:7261:1:400::/70"]
    assert str(slices.slice(63)[0]) == "10.231.252.0/22"
    v4s = [slices.slice(i)[0] for i in range(slices.count)]
    v6s = [slices.slice(i)[1] for i in range(slices.count)]
    assert len({str(n) for n in v4s}) == len({str(n) for n in v6s}) == 64
    assert all(n is not None and n.subnet_of(DEFAULT.pool6) for n in v6s)  # type: ignore[arg-type]
    assert [slices.index_of(str(n)) for n in v4s] == list(range(64))
    for other in ("10.231.0.0/21", "10.231.1.0/24", "10.232.0.0/22", "nonsense"):
        assert slices.index_of(other) is None
    with pytest.raises(CorralError):
        slices.slice(64)


def test_a_slice_holds_as_many_instances_in_v4_and_v6() -> None:
    """The driver's pools replaced by a slice: 256 slots of /30 and /126, within it."""
    record = SubnetRecord("10.231.4.0/22", "driver:net", "h1", "10.9.0.1", None,
                          "fd63:6f72:7261:1:400::/70", True)
    local = local_config(DEFAULT, record)
    pool = AddressPool(local)
    assert pool.size == 256
    assert str(pool.addresses(0).instance4) == "10.231.4.2"
    assert str(pool.addresses(255).instance4) == "10.231.7.254"
    assert str(pool.addresses(0).instance6) == "fd63:6f72:7261:1:400::2"
    assert local.table == DEFAULT.table and local.host_prefix == DEFAULT.host_prefix


def test_covered_counts_subnets_cut_with_another_host_prefix() -> None:
    """Another host's /21 (or /24) takes every slice it overlaps; outside pool4 none."""
    slices = HostSlices.of(DEFAULT)
    assert list(slices.covered("10.231.0.0/21")) == [0, 1]
    assert list(slices.covered("10.231.5.0/24")) == [1]
    assert list(slices.covered("10.232.0.0/22")) == []
    assert list(slices.covered("10.0.0.0/8")) == list(range(64))


# -- the claim -----------------------------------------------------------------------------------

def claim(kernel: ClusterKernel, address: str | None = "10.9.0.1",
          config: NetConfig = DEFAULT) -> tuple[SubnetRecord, list[SubnetRecord]]:
    return asyncio.run(claim_subnet(kernel, HostSlices.of(config),
                                    HostIdentity(kernel.host, address)))


def test_hosts_claim_the_lowest_free_slices_and_record_what_routes_to_them(
        ledger: SqliteLedger) -> None:
    """h1 then h2: slices 0 and 1, each recorded under driver:net@<host> with the host's address
    and its v6 slice; each sees the other's record."""
    mine1, _ = claim(ClusterKernel(ledger, "h1"), "10.9.0.1")
    mine2, seen = claim(ClusterKernel(ledger, "h2"), "10.9.0.2")
    assert (mine1.cidr, mine2.cidr) == ("10.231.0.0/22", "10.231.4.0/22")
    assert stored(ledger, "10.231.0.0/22") == ("driver:net@h1", {
        "host": "h1", "address": "10.9.0.1", "address6": None,
        "pool6": "fd63:6f72:7261:1::/70"})
    assert stored(ledger, "10.231.4.0/22") == ("driver:net@h2", {
        "host": "h2", "address": "10.9.0.2", "address6": None,
        "pool6": "fd63:6f72:7261:1:400::/70"})
    assert {(r.cidr, r.mine, r.host) for r in seen} == {("10.231.0.0/22", False, "h1"),
                                                        ("10.231.4.0/22", True, "h2")}


def test_a_restarted_driver_keeps_its_slice_and_updates_its_address(
        ledger: SqliteLedger) -> None:
    """The record held already is kept (no new claim while nothing changed); a changed
    address is written into it, on the same key."""
    hold(ledger, "10.231.0.0/22", "h9", "10.9.0.9")
    first, _ = claim(ClusterKernel(ledger, "h1"))
    written = len(writes(ledger))
    restarted = ClusterKernel(ledger, "h1")
    again, _ = claim(restarted)
    assert again == first and restarted.calls == ["ledger.list"]
    assert len(writes(ledger)) == written
    moved, _ = claim(ClusterKernel(ledger, "h1"), "10.9.0.77")
    assert moved.cidr == first.cidr == "10.231.4.0/22"
    assert stored(ledger, first.cidr) == ("driver:net@h1", {
        "host": "h1", "address": "10.9.0.77", "address6": None,
        "pool6": "fd63:6f72:7261:1:400::/70"})
    assert writes(ledger)[written:] == [("put", first.cidr, "driver:net@h1")]


def test_a_host_racing_for_the_same_slice_makes_the_loser_take_the_next(
        ledger: SqliteLedger) -> None:
    """h7 claims slice 0 between h1's list and its claim: h1's claim conflicts and it claims
    slice 1 instead."""
    def race(key: str) -> None:
        if ledger.get("subnet", key) is None and key == "10.231.0.0/22":
            hold(ledger, key, "h7", "10.9.0.7")

    kernel = RacingKernel(ledger, "h1", race)
    mine, records = claim(kernel)
    assert mine.cidr == "10.231.4.0/22"
    assert {(r.host, r.cidr) for r in records} == {("h7", "10.231.0.0/22"),
                                                   ("h1", "10.231.4.0/22")}
    assert kernel.calls.count("ledger.claim") == 2  # slice 0 refused, then slice 1
    assert stored(ledger, "10.231.0.0/22") == ("driver:net@h7", {
        "host": "h7", "address": "10.9.0.7", "address6": None, "pool6": None})
    assert [w for w in writes(ledger) if w[2] == "driver:net@h1"] == [
        ("put", "10.231.4.0/22", "driver:net@h1")]


def test_subnets_of_another_size_and_our_stale_ones(ledger: SqliteLedger) -> None:
    """Another host's /21 covers slices 0 and 1; our own record of an older layout (a /24) is
    released and the lowest free /22 claimed."""
    hold(ledger, "10.231.0.0/21", "h5", "10.9.0.5")
    HostView(ledger, "h1").claim("driver:net", [
        Claim("subnet", "10.231.200.0/24", {"host": "h1"})])
    mine, records = claim(ClusterKernel(ledger, "h1"))
    assert mine.cidr == "10.231.8.0/22"
    assert stored(ledger, "10.231.200.0/24") is None
    assert ("delete", "10.231.200.0/24", "driver:net@h1") in writes(ledger)
    assert sorted(r.cidr for r in records) == ["10.231.0.0/21", "10.231.8.0/22"]
    assert stored(ledger, "10.231.0.0/21") is not None  # the other host's kept


def test_a_full_pool_names_the_pool_the_prefix_and_the_holders(ledger: SqliteLedger) -> None:
    """pool4 /22 cut in /23: two slices, both held by other hosts: a conflict that says so."""
    hold(ledger, "10.231.0.0/23", "h2", "10.9.0.2")
    hold(ledger, "10.231.2.0/23", "h3", "10.9.0.3")
    config = NetConfig.from_mapping({"pool4": "10.231.0.0/22", "host_prefix": 23})
    kernel = ClusterKernel(ledger, "h1")
    with pytest.raises(CorralError) as info:
        claim(kernel, config=config)
    assert info.value.code == ErrorCode.CONFLICT
    for part in ("pool4 10.231.0.0/22", "host_prefix /23", "h2 (10.231.0.0/23)",
                 "h3 (10.231.2.0/23)"):
        assert part in info.value.reason
    assert "ledger.claim" not in kernel.calls  # nothing tried that every host would refuse


def test_records_parse_into_routes_ways() -> None:
    """A record's v4 next hop is its v4 address; the v6 one its address if v6, else its
    address6; malformed records are left out."""
    records = parse_records([
        {"key": "10.231.4.0/22", "owner": "driver:net@h2", "value": {
            "host": "h2", "address": "10.9.0.2", "address6": "2001:db8::2",
            "pool6": "fd63:6f72:7261:1:400::/70"}},
        {"key": "10.231.8.0/22", "owner": "driver:net@h3", "value": {
            "host": "h3", "address": "2001:db8::3", "pool6": None}},
        {"key": "not-a-net", "owner": "driver:net@h4", "value": {}},
        {"key": "10.231.12.0/22", "owner": "driver:net@h5", "value": "text"},
        {"key": "10.231.0.0/22", "owner": "driver:net", "value": {"host": "h1"}},
    ])
    assert [(r.cidr, r.mine) for r in records] == [("10.231.4.0/22", False),
                                                   ("10.231.8.0/22", False),
                                                   ("10.231.0.0/22", True)]
    h2, h3, _ = records
    assert (str(h2.via4), str(h2.via6)) == ("10.9.0.2", "2001:db8::2")
    assert (h3.via4, str(h3.via6), h3.network6) == (None, "2001:db8::3", None)
    assert sorted(peer_addresses(records, "h1")) == ["10.9.0.2", "2001:db8::2", "2001:db8::3"]
    assert peer_addresses(records, "h2") == ["2001:db8::3"]  # its own record by name


def test_address6_is_the_v6_address_beside_the_hosts_address() -> None:
    """The lowest global v6 address on the link that holds the host's address; none when the
    link has none or the address is on no link."""
    links = {"eth0": ["10.9.0.1", "2001:db8::9", "2001:db8::1"], "eth1": ["2001:db8:1::1"]}
    assert address6_beside(links, "10.9.0.1") == "2001:db8::1"
    assert address6_beside({"eth0": ["10.9.0.1"], "eth1": ["2001:db8:1::1"]},
                           "10.9.0.1") is None
    assert address6_beside(links, "10.9.9.9") is None
    assert address6_beside(links, "2001:db8::7") == "2001:db8::7"
    assert address6_beside(links, None) is None


# -- routes --------------------------------------------------------------------------------------

PEERS = [
    SubnetRecord("10.231.0.0/22", "driver:net", "h1", "10.9.0.1", None,
                 "fd63:6f72:7261:1::/70", True),
    SubnetRecord("10.231.4.0/22", "driver:net@h2", "h2", "10.9.0.2", "2001:db8::2",
                 "fd63:6f72:7261:1:400::/70", False),
    SubnetRecord("10.231.8.0/22", "driver:net@h3", "h3", "10.9.0.3", None,
                 "fd63:6f72:7261:1:800::/70", False),
    SubnetRecord("10.231.12.0/22", "driver:net@h4", "h4", None, None, None, False),
]
POOLS = (DEFAULT.pool4, DEFAULT.pool6)


def test_wanted_routes_go_to_each_other_hosts_subnet_via_its_address() -> None:
    """Not to our own subnet; v6 only when both run IPv6 and a v6 next hop is known; a host
    with no address gets none; the source is ours."""
    routes = wanted_routes(PEERS, ipv6=True, source4=addr("10.9.0.1"))  # type: ignore[arg-type]
    assert [str(r) for r in routes] == [
        "10.231.4.0/22 via 10.9.0.2 src 10.9.0.1 proto 231",
        "fd63:6f72:7261:1:400::/70 via 2001:db8::2 proto 231",
        "10.231.8.0/22 via 10.9.0.3 src 10.9.0.1 proto 231"]
    assert [str(r.dst) for r in wanted_routes(PEERS, ipv6=False)] == ["10.231.4.0/22",
                                                                     "10.231.8.0/22"]


def test_plan_adds_replaces_removes_only_ours_and_leaves_anothers_alone() -> None:
    """Ours the same way: untouched; ours another way: replaced (its metric kept); none:
    added; another's to the destination: blocked; ours to a subnet no longer wanted, inside
    the pools: removed; ours outside the pools and others' anywhere: untouched."""
    wanted = [Route(net("10.231.4.0/22"), addr("10.9.0.2")),
              Route(net("10.231.8.0/22"), addr("10.9.0.3")),
              Route(net("10.231.16.0/22"), addr("10.9.0.5")),
              Route(net("10.231.20.0/22"), addr("10.9.0.6"))]
    present = [Route(net("10.231.4.0/22"), addr("10.9.0.2")),
               Route(net("10.231.8.0/22"), addr("10.9.0.99"), metric=7),
               Route(net("10.231.20.0/22"), addr("10.9.0.1"), proto=4),  # static
               Route(net("10.231.24.0/22"), addr("10.9.0.7")),  # a forgotten host's
               Route(net("10.231.28.0/22"), addr("10.9.0.8"), proto=3),  # boot
               Route(net("10.77.0.0/22"), addr("10.9.0.8")),  # ours, outside the pools
               Route(net("10.9.0.0/24"), None, proto=2)]
    plan = plan_routes(wanted, present, POOLS)  # type: ignore[arg-type]
    assert [str(r.dst) for r in plan.add] == ["10.231.16.0/22"]
    assert [(str(r.dst), str(r.gateway), r.metric) for r in plan.replace] == [
        ("10.231.8.0/22", "10.9.0.3", 7)]
    assert [str(r.dst) for r in plan.remove] == ["10.231.24.0/22"]
    assert [str(r.dst) for r in plan.blocked] == ["10.231.20.0/22"]
    assert plan.changes == 3
    assert all(r.proto == ROUTE_PROTOCOL for r in plan.add + plan.replace + plan.remove)


def test_a_changed_source_is_a_replacement() -> None:
    """The same gateway from another source address is another way."""
    plan = plan_routes([Route(net("10.231.4.0/22"), addr("10.9.0.2"), addr("10.9.0.1"))],
                       [Route(net("10.231.4.0/22"), addr("10.9.0.2"))], POOLS)  # type: ignore[arg-type]
    assert [str(r) for r in plan.replace] == ["10.231.4.0/22 via 10.9.0.2 src 10.9.0.1 proto 231"]


def test_route_keeper_converges_and_goes_on_past_a_failure() -> None:
    """The first sync makes what it can (a refused route does not stop the others), the next
    one changes nothing, a host's record gone takes its route."""
    table = FakeTable(Route(net("10.231.40.0/22"), addr("10.9.0.40")))
    table.refuse.add("10.231.8.0/22")
    keeper = RouteKeeper(table, POOLS)  # type: ignore[arg-type]
    wanted = wanted_routes(PEERS, ipv6=False)
    keeper.sync(wanted)
    assert table.log == ["add 10.231.4.0/22", "remove 10.231.40.0/22"]
    assert keeper._reported == {"10.231.8.0/22": "net: route add 10.231.8.0/22 via 10.9.0.3 "
                                                 "proto 231: Network is unreachable"}
    table.refuse.clear()
    keeper.sync(wanted)
    assert table.log[-1] == "add 10.231.8.0/22" and keeper._reported == {}
    assert keeper.sync(wanted).changes == 0
    keeper.sync(wanted_routes(PEERS[:2], ipv6=False))  # h3 forgotten
    assert table.log[-1] == "remove 10.231.8.0/22"
    assert sorted(str(r.dst) for r in table.present) == ["10.231.4.0/22"]


# -- rules ---------------------------------------------------------------------------------------

def _rules(commands: list[dict[str, Any]], chain: str) -> list[list[dict[str, Any]]]:
    return [c["add"]["rule"]["expr"] for c in commands
            if "rule" in c.get("add", {}) and c["add"]["rule"]["chain"] == chain
            and c["add"]["rule"]["family"] == "inet"]


def _state(peers: tuple[str, ...] | None) -> DesiredState:
    from corral_net.model import policy_from_manifest
    from corral_net.pool import AddressPool

    state = DesiredState(peers=peers)
    state.apps["shop"] = policy_from_manifest("shop", {"ports": {"http": 8080}})
    pool = AddressPool(DEFAULT)
    for slot, link in enumerate(("crla", "crlb")):
        state.instances[link] = InstanceNet(link, "shop", f"corral-{link}", link,
                                            pool.addresses(slot), 8080)
    return state


def test_a_host_of_its_own_has_no_outside_chain() -> None:
    """peers None: the ruleset is what it always was (no chain, counter or jump added)."""
    commands = build(DEFAULT, _state(None), {})
    chains = [c["add"]["chain"]["name"] for c in commands if "chain" in c.get("add", {})]
    assert "outside" not in chains
    assert not any("outside" in str(c) for c in commands)
    assert build(DEFAULT, _state(None), {}) == build(DEFAULT, DesiredState(
        apps=_state(None).apps, instances=_state(None).instances), {})


def test_peers_alone_reach_instances_directly_from_outside() -> None:
    """Shared ledger: forward first sends what enters an instance link from outside to
    ``outside``, which returns replies, DNAT'd host ports and the peers' addresses (v4 and
    v6), and counts and rejects the rest; the granted ports are checked after it."""
    commands = build(DEFAULT, _state(("10.9.0.2", "10.9.0.3", "2001:db8::2")), {})
    forward = _rules(commands, "forward")
    first = forward[0]
    assert first[0]["match"] == {"op": "==", "left": {"meta": {"key": "oifname"}},
                                 "right": {"set": ["crla", "crlb"]}}
    assert first[1]["match"] == {"op": "!=", "left": {"meta": {"key": "iifname"}},
                                 "right": {"set": ["crla", "crlb"]}}
    assert first[2] == {"jump": {"target": "outside"}}
    assert "vmap" in forward[1][0]  # then the instances' own in_/out_ chains
    outside = _rules(commands, "outside")
    assert outside[0][0]["match"]["left"] == {"ct": {"key": "state"}}
    assert outside[1] == [{"match": {"op": "in", "left": {"ct": {"key": "status"}},
                                     "right": "dnat"}}, {"return": None}]
    assert outside[2] == [{"match": {"op": "==", "left": {"payload": {
        "protocol": "ip", "field": "saddr"}}, "right": {"set": ["10.9.0.2", "10.9.0.3"]}}},
        {"return": None}]
    assert outside[3] == [{"match": {"op": "==", "left": {"payload": {
        "protocol": "ip6", "field": "saddr"}}, "right": "2001:db8::2"}}, {"return": None}]
    assert outside[4][-2:] == [{"counter": "refused_outside"},
                               {"reject": {"type": "tcp reset"}}]
    assert outside[5][-1] == {"reject": {"type": "icmpx", "expr": "admin-prohibited"}}
    assert len(outside) == 6
    counters = [c["add"]["counter"]["name"] for c in commands if "counter" in c.get("add", {})]
    assert "refused_outside" in counters


def test_no_peer_yet_lets_nothing_in_directly() -> None:
    """Shared ledger, no other host: ``outside`` has no address to let in."""
    outside = _rules(build(DEFAULT, _state(()), {}), "outside")
    assert not any("saddr" in str(rule) for rule in outside)
    assert len(outside) == 4


def test_set_peers_reapplies_only_when_the_set_changes() -> None:
    """The order the ledger lists hosts in changes nothing; a new host re-applies; with no
    instance known (a restarted driver before state.sync) nothing is applied, whose batch
    would delete the running instances' rules; a host of its own refuses peers."""
    nft = FakeNft()
    host = HostNetwork(DEFAULT, nft=nft, netlink=FakeNetlink(),  # type: ignore[arg-type]
                       peers=["10.9.0.3", "10.9.0.2"])
    host.state.apps.update(_state(None).apps)
    host.state.instances.update(_state(None).instances)
    assert host.set_peers(["10.9.0.2", "10.9.0.3"]) is False and nft.batches == []
    assert host.set_peers(["10.9.0.2", "10.9.0.3", "10.9.0.4"]) is True
    assert host.state.peers == ("10.9.0.2", "10.9.0.3", "10.9.0.4")
    assert "10.9.0.4" in str(nft.batches[-1])
    with pytest.raises(CorralError, match="peer host address"):
        host.set_peers(["not an address"])
    empty_nft = FakeNft()
    empty = HostNetwork(DEFAULT, nft=empty_nft, netlink=FakeNetlink(),  # type: ignore[arg-type]
                        peers=[])
    assert empty.set_peers(["10.9.0.2"]) is True and empty.state.peers == ("10.9.0.2",)
    assert empty_nft.batches == []  # no instance (none adopted yet): nothing applied
    alone = HostNetwork(DEFAULT, nft=FakeNft(), netlink=FakeNetlink())  # type: ignore[arg-type]
    with pytest.raises(CorralError):
        alone.set_peers(["10.9.0.2"])


# -- the driver ----------------------------------------------------------------------------------

@pytest.fixture
def welcomed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
             ) -> Callable[[ClusterKernel, dict[str, Any]], tuple[NetDriver, FakeNetlink]]:
    """A NetDriver welcomed with a config, on a kernel of the shared ledger; its host claim
    under tmp_path, netlink and nftables faked (nothing of this machine's network is
    touched)."""
    table = FakeNetlink()
    monkeypatch.setattr(driver_module, "HostClaim",
                        lambda config: HostClaim(config, tmp_path / "claims"))
    monkeypatch.setattr(driver_module, "Netlink", lambda: table)
    monkeypatch.setattr("corral_net.host.Netlink", lambda: table)
    monkeypatch.setattr("corral_net.host.Nftables", FakeNft)

    def make(kernel: ClusterKernel, config: dict[str, Any]) -> tuple[NetDriver, FakeNetlink]:
        driver = NetDriver()
        driver.kernel = kernel  # type: ignore[assignment]
        driver.welcomed(Welcome(peer_id="p", heartbeat_ms=1000, config=config))
        return driver, table

    return make


def test_a_host_of_its_own_keeps_the_whole_pool(welcomed: Any, ledger: SqliteLedger) -> None:
    """Not shared: the pools as configured, no subnet claimed, no route, no peers."""
    kernel = ClusterKernel(ledger, "h1", shared=False)
    driver, table = welcomed(kernel, {"pool4": "10.150.3.0/24", "table": "zt1"})
    network = asyncio.run(driver._network())
    assert str(network.pool.pool4) == "10.150.3.0/24" and network.state.peers is None
    assert kernel.calls == ["kernel.status"] and ledger.revision() == 0
    assert table.log == []


def test_a_kernel_without_status_is_a_host_of_its_own(welcomed: Any,
                                                      ledger: SqliteLedger) -> None:
    """A kernel that does not serve kernel.status (the conformance stand-in) owns its ledger;
    any other failure of it is the operation's."""
    class Old(ClusterKernel):
        async def call(self, op: str, args: dict[str, Any] | None = None, *,
                       timeout: float = 30.0) -> dict[str, Any]:
            if op == "kernel.status":
                self.calls.append(op)
                raise CorralError("no", code=ErrorCode.UNKNOWN_OPERATION)
            return await super().call(op, args, timeout=timeout)

    old = Old(ledger, "h1")
    driver, _ = welcomed(old, {"table": "zt2"})
    assert str(asyncio.run(driver._network()).pool.pool4) == "10.231.0.0/16"
    assert old.calls == ["kernel.status"] and ledger.revision() == 0

    class Down(ClusterKernel):
        async def call(self, op: str, args: dict[str, Any] | None = None, *,
                       timeout: float = 30.0) -> dict[str, Any]:
            raise CorralError("kernel lost", code=ErrorCode.UNAVAILABLE, retry=True)

    driver, _ = welcomed(Down(ledger, "h1"), {"table": "zt3"})
    with pytest.raises(CorralError, match="kernel lost"):
        asyncio.run(driver._network())


def test_a_shared_ledger_gives_the_driver_its_slice_routes_and_peers(
        welcomed: Any, ledger: SqliteLedger) -> None:
    """Shared: the subnet claimed with the host's address from its host record, the pools
    replaced by the slice, a route to the other host's subnet from our own address, that
    host let in, forwarding on."""
    register(ledger, "h1", "10.9.0.1")
    register(ledger, "h2", "10.9.0.2")
    hold(ledger, "10.231.0.0/22", "h2", "10.9.0.2", "fd63:6f72:7261:1::/70")
    driver, table = welcomed(ClusterKernel(ledger, "h1"), {"table": "zt4"})
    network = asyncio.run(driver._network())
    assert (str(network.pool.pool4), str(network.pool.pool6)) == (
        "10.231.4.0/22", "fd63:6f72:7261:1:400::/70")
    assert stored(ledger, "10.231.4.0/22") == ("driver:net@h1", {
        "host": "h1", "address": "10.9.0.1", "address6": "2001:db8::1",
        "pool6": "fd63:6f72:7261:1:400::/70"})
    assert [str(r) for r in table.present] == ["10.231.0.0/22 via 10.9.0.2 src 10.9.0.1 "
                                               "proto 231"]
    assert network.state.peers == ("10.9.0.2",)
    assert "forwarding ipv6=True" in table.log


def test_each_refresh_follows_the_hosts_that_come_and_go(welcomed: Any,
                                                         ledger: SqliteLedger) -> None:
    """A host joining gets a route and is let in; a host forgotten (its record gone) loses
    both; a lost host's record (still there) keeps them; our own record, gone, is claimed
    again on the same key."""
    register(ledger, "h1", "10.9.0.1")
    driver, table = welcomed(ClusterKernel(ledger, "h1"), {"table": "zt5", "pool6": ""})
    network = asyncio.run(driver._network())
    assert network.state.peers == () and table.present == []
    for host, address, cidr in (("h2", "10.9.0.2", "10.231.4.0/22"),
                                ("h3", "10.9.0.3", "10.231.8.0/22")):
        register(ledger, host, address)  # joined, never alive since: lost
        hold(ledger, cidr, host, address)
    asyncio.run(driver._refresh_cluster())
    assert sorted(str(r) for r in table.present) == [
        "10.231.4.0/22 via 10.9.0.2 src 10.9.0.1 proto 231",
        "10.231.8.0/22 via 10.9.0.3 src 10.9.0.1 proto 231"]
    assert network.state.peers == ("10.9.0.2", "10.9.0.3")
    assert forget_host(ledger, "h3", "h1")["released"] == {"subnet": 1}
    hold(ledger, "10.231.4.0/22", "h2", "10.9.0.22")  # h2 came back on another address
    forget_host(ledger, "h1", "h2")  # ours, released under us (h1 forgotten while it ran)
    assert stored(ledger, "10.231.0.0/22") is None
    asyncio.run(driver._refresh_cluster())
    assert [str(r) for r in table.present] == [
        "10.231.4.0/22 via 10.9.0.22 src 10.9.0.1 proto 231"]
    assert network.state.peers == ("10.9.0.22",)
    assert stored(ledger, "10.231.0.0/22") == ("driver:net@h1", {
        "host": "h1", "address": "10.9.0.1", "address6": "2001:db8::1", "pool6": None})


def test_a_slice_held_under_the_legacy_owner_is_kept_and_moved_to_the_driver_s(
        ledger: SqliteLedger) -> None:
    """Before, the driver's records were owned by ``net``, which is also an app's possible
    name (its ``down`` released the host's subnet): the slice is kept, now owned by
    ``driver:net``, and the kernel releasing an app named ``net`` leaves it alone."""
    HostView(ledger, "h1").claim("net", [Claim("subnet", "10.231.4.0/22", {
        "host": "h1", "address": "10.9.0.1", "address6": None, "pool6": None})])
    mine, _ = claim(ClusterKernel(ledger, "h1"))
    assert mine.cidr == "10.231.4.0/22"
    assert stored(ledger, "10.231.4.0/22") == ("driver:net@h1", {
        "host": "h1", "address": "10.9.0.1", "address6": None,
        "pool6": "fd63:6f72:7261:1:400::/70"})
    HostView(ledger, "h1").release("net")  # an app named net taken down on h1
    assert stored(ledger, "10.231.4.0/22") is not None
