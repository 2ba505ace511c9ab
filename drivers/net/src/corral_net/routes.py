"""Routes to the other hosts' instance subnets, kept in the host's main routing table.

On a shared ledger every host holds a subnet (``corral_net.subnets``); this host reaches
another's instances through a route to that host's subnet via that host's address (v4, and
v6 when both hosts run IPv6 and the other has an IPv6 address on its link). The hosts must
share a link (the next hop is the other host itself): across routers, route the subnets
there, or tunnel.

Every route corral makes carries ``ROUTE_PROTOCOL`` (``ip route show proto 231``); only
routes of that protocol, to destinations inside the cluster's pools, are ever replaced or
removed. A route to the same destination made by anyone else (an operator's static route)
is left as it is, and reported. ``plan_routes`` is the pure decision, ``RouteKeeper`` carries
it out through ``Netlink`` (the one module that speaks netlink).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from corral.errors import CorralError
from corral_net.egress import IPNetwork
from corral_net.subnets import SubnetRecord

log = structlog.get_logger("corral.net")
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
ROUTE_PROTOCOL = 231
"""corral's route protocol number (free in iproute2's rt_protos; 10.231 is its pool)."""


@dataclass(frozen=True)
class Route:
    """One route of the main table: ``dst`` via ``gateway`` (None: on a link, no gateway),
    from ``prefsrc``; ``proto`` who made it, ``metric`` its priority (as listed)."""

    dst: IPNetwork
    gateway: IPAddress | None
    prefsrc: IPAddress | None = None
    proto: int = ROUTE_PROTOCOL
    metric: int | None = None

    @property
    def ours(self) -> bool:
        """Whether corral made it."""
        return self.proto == ROUTE_PROTOCOL

    def same_path(self, other: Route) -> bool:
        """Whether both send ``dst`` the same way (gateway and source)."""
        return (self.dst, self.gateway, self.prefsrc) == (other.dst, other.gateway,
                                                          other.prefsrc)

    def __str__(self) -> str:
        via = f" via {self.gateway}" if self.gateway is not None else ""
        src = f" src {self.prefsrc}" if self.prefsrc is not None else ""
        return f"{self.dst}{via}{src} proto {self.proto}"


@dataclass(frozen=True)
class RoutePlan:
    """What makes the main table hold the wanted routes: routes to add, ours to replace
    (a peer's address changed) and ours to remove (a subnet whose record is gone), and the
    wanted routes another's route to the same destination blocks."""

    add: tuple[Route, ...] = ()
    replace: tuple[Route, ...] = ()
    remove: tuple[Route, ...] = ()
    blocked: tuple[Route, ...] = ()

    @property
    def changes(self) -> int:
        """How many routes the plan adds, replaces or removes."""
        return len(self.add) + len(self.replace) + len(self.remove)


def wanted_routes(peers: Iterable[SubnetRecord], *, ipv6: bool,
                  source4: ipaddress.IPv4Address | None = None,
                  source6: ipaddress.IPv6Address | None = None) -> list[Route]:
    """The routes to the other hosts' subnets: each v4 subnet via its host's v4 address; each
    v6 subnet via its host's v6 address when this host runs IPv6 (``ipv6``) too. A host with
    no address of the family gets no route of it. ``source4``/``source6``: this host's own
    address, set as the routes' preferred source (so the others see it as the sender, the
    address their firewall lets in), when it is one of this host's."""
    out: list[Route] = []
    for peer in sorted(peers, key=lambda p: p.network):
        if peer.mine:
            continue
        if peer.via4 is not None:
            out.append(Route(peer.network, peer.via4, source4))
        net6 = peer.network6
        if ipv6 and net6 is not None and peer.via6 is not None:
            out.append(Route(net6, peer.via6, source6))
    return out


def plan_routes(wanted: Sequence[Route], present: Iterable[Route],
                pools: Sequence[IPNetwork]) -> RoutePlan:
    """Compare the wanted routes with the main table's (``present``, whoever made them).

    A wanted route is added when no route has its destination, replaced when ours has it
    another way, left alone when ours has it the same way, and blocked when only another's
    has it. Ours to a destination inside ``pools`` (the cluster's pools) that no wanted route
    has are removed; nothing else is ever touched."""
    present = list(present)
    wanted_dst = {w.dst for w in wanted}
    add, replace, blocked = [], [], []
    for route in wanted:
        same_dst = [p for p in present if p.dst == route.dst]
        ours = [p for p in same_dst if p.ours]
        if ours:
            if not any(route.same_path(p) for p in ours):
                replace.append(Route(route.dst, route.gateway, route.prefsrc,
                                     metric=ours[0].metric))
        elif same_dst:
            blocked.append(route)
        else:
            add.append(route)
    remove = [p for p in present if p.ours and p.dst not in wanted_dst
              and _inside(p.dst, pools)]
    return RoutePlan(tuple(add), tuple(replace), tuple(remove), tuple(blocked))


def _inside(net: IPNetwork, pools: Sequence[IPNetwork]) -> bool:
    for pool in pools:
        if isinstance(net, ipaddress.IPv4Network) and isinstance(pool, ipaddress.IPv4Network):
            if net.subnet_of(pool):
                return True
        elif isinstance(net, ipaddress.IPv6Network) and isinstance(pool, ipaddress.IPv6Network):
            if net.subnet_of(pool):
                return True
    return False


class RouteTable(Protocol):
    """The main routing table as ``RouteKeeper`` needs it (``corral_net.netlink.Netlink``)."""

    def routes(self) -> list[Route]:
        """Every unicast route of the main table with a destination (v4 and v6)."""
        ...

    def add_route(self, route: Route) -> None:
        """Add ``route`` (with ``ROUTE_PROTOCOL``); CorralError if it cannot be made."""
        ...

    def replace_route(self, route: Route) -> None:
        """Replace our route to ``route.dst`` (metric ``route.metric``) with ``route``."""
        ...

    def remove_route(self, route: Route) -> None:
        """Remove our route ``route``; absent is fine."""
        ...


@dataclass
class RouteKeeper:
    """Keeps the main table's routes to the other hosts' subnets as wanted."""

    table: RouteTable
    pools: Sequence[IPNetwork]
    _reported: dict[str, str] = field(default_factory=dict)  # dst -> last problem logged

    def sync(self, wanted: Sequence[Route]) -> RoutePlan:
        """Add, replace and remove routes so that ours are exactly ``wanted`` (within the
        pools); each failure is logged (once per destination and reason) and the others go
        on; the plan carried out is returned."""
        plan = plan_routes(wanted, self.table.routes(), self.pools)
        problems: dict[str, str] = {}
        for route in plan.blocked:
            problems[str(route.dst)] = "a route to it that corral did not make is in the way"
        steps = ([(r, self.table.add_route, "added") for r in plan.add]
                 + [(r, self.table.replace_route, "replaced") for r in plan.replace]
                 + [(r, self.table.remove_route, "removed") for r in plan.remove])
        for route, step, done in steps:
            try:
                step(route)
            except CorralError as exc:
                problems[str(route.dst)] = exc.reason
                continue
            log.info(f"route to a host subnet {done}", route=str(route))
        for dst, why in problems.items():
            if self._reported.get(dst) != why:
                log.warning("route to a host subnet not made", dst=dst, why=why)
        self._reported = problems
        return plan
