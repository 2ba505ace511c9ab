"""Builds corral's nftables tables from the desired state, as one atomic JSON batch.

Tables owned (``T`` = config.table): ``inet T`` (filter: ingress, egress, counters),
``ip T_nat`` and ``ip6 T_nat`` (host-port DNAT, masquerade). A re-apply keeps each table and
its named counters, flushes its rules, re-adds every chain and rule and deletes chains and
counters no longer wanted, all in the same transaction: the kernel swaps old for new at
commit, so running apps never see a gap and refused-attempt counters keep counting.

On a shared ledger (``DesiredState.peers`` set), a chain ``outside`` lets into the instances,
of what comes from outside the host, only replies, DNAT'd host ports and the other hosts.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from typing import Any

from corral.errors import CorralError, ErrorCode
from corral_net.config import NetConfig
from corral_net.egress import IPNetwork
from corral_net.model import AppPolicy, DesiredState, InstanceNet

Expr = dict[str, Any]
Command = dict[str, Any]



def _match(left: Expr, right: Any, op: str = "==") -> Expr:
    return {"match": {"op": op, "left": left, "right": right}}


def _meta(key: str) -> Expr:
    return {"meta": {"key": key}}


def _payload(protocol: str, field: str) -> Expr:
    return {"payload": {"protocol": protocol, "field": field}}


def _net(net: IPNetwork) -> Any:
    if net.prefixlen == net.max_prefixlen:
        return str(net.network_address)
    return {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}


def _set(items: Sequence[Any]) -> Any:
    return items[0] if len(items) == 1 else {"set": list(items)}


def _established() -> Expr:
    return _match({"ct": {"key": "state"}}, ["established", "related"], "in")


def _ports(low: int, high: int) -> list[list[Expr]]:
    """One match list per protocol: separate rules are far cheaper than anonymous sets."""
    right: Any = low if low == high else {"range": [low, high]}
    return [[_match(_payload(proto, "dport"), right)] for proto in ("tcp", "udp")]


def _link_local_icmpv6() -> list[list[Expr]]:
    """MLD (130-132, 143) and neighbour discovery (133-136), as ranges, not sets."""
    icmp_type = _payload("icmpv6", "type")
    return [[_match(icmp_type, {"range": [130, 136]})], [_match(icmp_type, 143)]]


def table_names(config: NetConfig) -> list[tuple[str, str]]:
    """(family, name) of every table corral owns under ``config``."""
    names = [("inet", config.table), ("ip", f"{config.table}_nat")]
    if config.pool6 is not None:
        names.append(("ip6", f"{config.table}_nat"))
    return names


class _Table:
    """Accumulates the chains, counters and rules of one table."""

    def __init__(self, family: str, name: str) -> None:
        self.family, self.name = family, name
        self.chains: dict[str, Expr] = {}
        self.counters: list[str] = []
        self.rules: list[Command] = []

    def chain(self, name: str, *, hook: str | None = None, prio: int = 0,
              kind: str = "filter") -> str:
        spec: Expr = {"family": self.family, "table": self.name, "name": name}
        if hook is not None:
            spec.update(type=kind, hook=hook, prio=prio, policy="accept")
        self.chains[name] = spec
        return name

    def rule(self, chain: str, *exprs: Expr) -> None:
        self.rules.append({"add": {"rule": {
            "family": self.family, "table": self.name, "chain": chain, "expr": list(exprs),
        }}})

    def commands(self, existing: list[dict[str, Any]] | None) -> list[Command]:
        ident = {"family": self.family, "name": self.name}
        out: list[Command] = [{"add": {"table": ident}}]
        if existing is not None:
            out.append({"flush": {"table": ident}})
        out += [{"add": {"chain": spec}} for spec in self.chains.values()]
        out += [{"add": {"counter": {"family": self.family, "table": self.name, "name": c}}}
                for c in self.counters]
        out += self.rules
        for obj in existing or []:
            if "chain" in obj and obj["chain"]["name"] not in self.chains:
                out.append({"delete": {"chain": {
                    "family": self.family, "table": self.name, "name": obj["chain"]["name"]}}})
            if "counter" in obj and obj["counter"]["name"] not in self.counters:
                out.append({"delete": {"counter": {
                    "family": self.family, "table": self.name, "name": obj["counter"]["name"]}}})
        return out


def _addr_match(net: IPNetwork, direction: str = "daddr") -> Expr:
    return _match(_payload("ip" if net.version == 4 else "ip6", direction), _net(net))


def _by_family(nets: Iterable[IPNetwork]) -> dict[int, list[IPNetwork]]:
    split: dict[int, list[IPNetwork]] = {4: [], 6: []}
    for net in nets:
        split[net.version].append(net)
    return split


def _allow_rules(table: _Table, chain: str, app: AppPolicy, state: DesiredState,
                 resolvers: Sequence[str], interfaces: Sequence[str]) -> None:
    """Accept DNS to the host's resolvers and the app's egress peers, then count and reject."""
    oif = [_match(_meta("oifname"), _set(list(interfaces)))] if interfaces else []
    dns = _by_family(ipaddress.ip_network(r) for r in resolvers)
    for version, nets in dns.items():
        if nets:
            proto = "ip" if version == 4 else "ip6"
            for ports in _ports(53, 53):
                table.rule(chain, _match(_payload(proto, "daddr"), _set([_net(n) for n in nets])),
                           *ports, {"accept": None})
    for entry in app.egress:
        targets = entry.networks if entry.name is None else state.resolved.get(entry.name, ())
        for version, nets in _by_family(targets).items():
            if not nets:
                continue
            proto = "ip" if version == 4 else "ip6"
            exprs = [*oif, _match(_payload(proto, "daddr"), _set([_net(n) for n in nets]))]
            for ports in _ports(*entry.ports) if entry.ports is not None else [[]]:
                table.rule(chain, *exprs, *ports, {"accept": None})


def _reject(table: _Table, chain: str, counter: str) -> None:
    table.rule(chain, _match(_meta("l4proto"), "tcp"), {"counter": counter},
               {"reject": {"type": "tcp reset"}})
    table.rule(chain, {"counter": counter},
               {"reject": {"type": "icmpx", "expr": "admin-prohibited"}})


def refused_counter(app: AppPolicy) -> str:
    """Name of the counter of an app's refused outgoing attempts."""
    return f"refused_{app.key}"


def refused_in_counter(app: AppPolicy) -> str:
    """Name of the counter of refused attempts to reach an app on ungranted ports."""
    return f"refused_in_{app.key}"


REFUSED_OUTSIDE = "refused_outside"
"""Name of the counter of refused attempts from outside the host (shared ledger only)."""


def _outside_rules(table: _Table, forward: str, peers: Sequence[str], links: list[str]) -> None:
    """On a shared ledger, the instances' subnets are routed between hosts: add the chain
    ``outside``, which returns, of what is forwarded into an instance from outside this
    host, only replies, host ports (DNAT'd, as on a host of its own) and packets from the
    other hosts (``peers``, whose lbs reach an instance's address; the instance's ``in_``
    chain then checks its granted ports, as for this host), and counts (``refused_outside``)
    and rejects the rest; and the rule of ``forward`` that jumps to it for packets to one of
    ``links`` (the instances') that did not come in through one (an instance of this host
    reaching another is its egress rules' business, as on a host of its own)."""
    chain = table.chain("outside")
    table.counters.append(REFUSED_OUTSIDE)
    table.rule(chain, _established(), {"return": None})
    table.rule(chain, _match({"ct": {"key": "status"}}, "dnat", "in"), {"return": None})
    for version, nets in _by_family(ipaddress.ip_network(p) for p in peers).items():
        if nets:
            proto = "ip" if version == 4 else "ip6"
            table.rule(chain, _match(_payload(proto, "saddr"), _set([_net(n) for n in nets])),
                       {"return": None})
    _reject(table, chain, REFUSED_OUTSIDE)
    table.rule(forward, _match(_meta("oifname"), _set(links)),
               _match(_meta("iifname"), _set(links), "!="), {"jump": {"target": chain}})


def _filter_table(config: NetConfig, state: DesiredState) -> _Table:
    table = _Table("inet", config.table)
    forward = table.chain("forward", hook="forward")
    input_ = table.chain("input", hook="input")
    output = table.chain("output", hook="output")
    if state.peers is not None and state.instances:
        links = sorted(i.link for i in state.instances.values())
        _outside_rules(table, forward, state.peers, links)
    out_map: list[Any] = []
    host_map: list[Any] = []
    in_map: list[Any] = []
    for app in sorted(state.apps.values(), key=lambda a: a.name):
        links = sorted(i.link for i in state.instances.values() if i.app == app.name)
        if not links:
            continue
        refused, refused_in = refused_counter(app), refused_in_counter(app)
        table.counters += [refused, refused_in]
        out_chain = table.chain(f"out_{app.key}")
        host_chain = table.chain(f"host_{app.key}")
        in_chain = table.chain(f"in_{app.key}")
        for link in links:
            out_map.append([link, {"jump": {"target": out_chain}}])
            host_map.append([link, {"jump": {"target": host_chain}}])
            in_map.append([link, {"jump": {"target": in_chain}}])
        # Forwarded egress: DNS to the resolvers, listed peers via listed interfaces.
        table.rule(out_chain, _established(), {"accept": None})
        _allow_rules(table, out_chain, app, state, config.resolvers, app.interfaces)
        _reject(table, out_chain, refused)
        # To the host itself: no interface to check; only listed peers and resolvers.
        table.rule(host_chain, _established(), {"accept": None})
        for icmp in _link_local_icmpv6():
            table.rule(host_chain, *icmp, {"accept": None})
        _allow_rules(table, host_chain, app, state, config.resolvers, ())
        _reject(table, host_chain, refused)
        # Ingress, from the host or forwarded: granted ports only. It *returns* rather than
        # accepts, so a forwarded packet still meets its sender's egress chain afterwards.
        table.rule(in_chain, _established(), {"return": None})
        for icmp in _link_local_icmpv6():
            table.rule(in_chain, *icmp, {"return": None})
        if app.ports:
            for proto in ("tcp", "udp"):
                table.rule(in_chain, _match(_payload(proto, "dport"), _set(list(app.ports))),
                           {"return": None})
        _reject(table, in_chain, refused_in)
    # Instances with no app policy yet (prepared before attach) are closed both ways.
    orphan_links = sorted(i.link for i in state.instances.values() if i.app not in state.apps)
    if orphan_links:
        closed = table.chain("closed")
        table.rule(closed, _established(), {"return": None})
        for icmp in _link_local_icmpv6():
            table.rule(closed, *icmp, {"return": None})
        table.rule(closed, _match(_meta("l4proto"), "tcp"), {"reject": {"type": "tcp reset"}})
        table.rule(closed, {"reject": {"type": "icmpx", "expr": "admin-prohibited"}})
        for link in orphan_links:
            for mapping in (out_map, host_map, in_map):
                mapping.append([link, {"jump": {"target": closed}}])
    # Forward: the receiver's ingress check first (it returns when allowed), then the
    # sender's egress check (whose accept ends the chain).
    for chain, key, mapping in ((forward, "oifname", in_map), (forward, "iifname", out_map),
                                (input_, "iifname", host_map), (output, "oifname", in_map)):
        if mapping:
            table.rule(chain, {"vmap": {"key": _meta(key), "data": {"set": mapping}}})
    return table


def _dnat_targets(app: AppPolicy, port: int, instances: list[InstanceNet]) -> list[InstanceNet]:
    serving = [i for i in instances if i.port == port]
    return serving or instances  # a port no process names: every instance may serve it


def _nat_table(config: NetConfig, state: DesiredState, family: str) -> _Table:
    table = _Table(family, f"{config.table}_nat")
    pool = config.pool4 if family == "ip" else config.pool6
    assert pool is not None
    pre = table.chain("prerouting", hook="prerouting", prio=-100, kind="nat")
    out = table.chain("output", hook="output", prio=-100, kind="nat")
    post = table.chain("postrouting", hook="postrouting", prio=100, kind="nat")
    seen: dict[int, str] = {}
    for app in sorted(state.apps.values(), key=lambda a: a.name):
        instances = sorted((i for i in state.instances.values()
                            if i.app == app.name and i.kind == "instance"), key=lambda i: i.id)
        for port in app.ports:
            targets = _dnat_targets(app, port, instances)
            if not targets:
                continue
            if port in seen:
                raise CorralError(
                    f"net: host port {port} wanted by app {app.name!r} is DNAT'd to app "
                    f"{seen[port]!r}", code=ErrorCode.CONFLICT)
            seen[port] = app.name
            addrs = [str(t.addresses.instance4 if family == "ip" else t.addresses.instance6)
                     for t in targets]
            if len(addrs) == 1:
                to: Any = addrs[0]
            else:
                to = {"map": {"key": {"numgen": {"mode": "inc", "mod": len(addrs), "offset": 0}},
                              "data": {"set": [[n, a] for n, a in enumerate(addrs)]}}}
            for chain in (pre, out):
                for ports in _ports(port, port):
                    table.rule(chain,
                               _match({"fib": {"result": "type", "flags": ["daddr"]}}, "local"),
                               *ports, {"dnat": {"addr": to}})
    proto = "ip" if family == "ip" else "ip6"
    table.rule(post, _match(_payload(proto, "saddr"), _net(pool)),
               _match(_payload(proto, "daddr"), _net(pool), "!="), {"masquerade": None})
    links = sorted(i.link for i in state.instances.values())
    if family == "ip" and links:
        # Connections from the host to 127.0.0.1:<host port> leave DNAT'd through the link;
        # the app must see the gateway as their source, or it answers its own loopback.
        table.rule(post, _match(_payload("ip", "saddr"), _net(ipaddress.ip_network("127.0.0.0/8"))),
                   _match(_meta("oifname"), _set(links)), {"masquerade": None})
    return table


def build(config: NetConfig, state: DesiredState,
          existing: dict[tuple[str, str], list[dict[str, Any]] | None]) -> list[Command]:
    """The whole transaction that makes corral's tables match ``state``.

    ``existing`` maps each owned (family, table) to its current objects (None: absent).
    With no instances left, the tables are deleted, so the host's ruleset is as before.
    """
    if not state.instances:
        return [{"delete": {"table": {"family": f, "name": n}}}
                for (f, n) in table_names(config) if existing.get((f, n)) is not None]
    tables = [_filter_table(config, state), _nat_table(config, state, "ip")]
    if config.pool6 is not None:
        tables.append(_nat_table(config, state, "ip6"))
    commands: list[Command] = []
    for table in tables:
        commands += table.commands(existing.get((table.family, table.name)))
    return commands
