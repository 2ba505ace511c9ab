"""One instance subnet per host, claimed in a ledger several hosts share (etcd).

On a host of its own the net driver hands out the whole of ``pool4``/``pool6``. When the
kernel's ledger is shared (``kernel.status`` says ``shared_ledger``) every host's driver
would hand out the same addresses, so each takes a slice instead: pool4 is cut into
/``host_prefix`` slices (``HostSlices``) and pool6 into as many, slice N of one going with
slice N of the other. A slice is claimed in the ledger as kind ``subnet`` (a cluster-wide
kind every host lists), key the v4 slice's CIDR, owner ``driver:net`` (stored as
``driver:net@<host>``; no app can be named so, so an app's ``down`` never releases it),
value ``{"host", "address", "address6", "pool6"}``: who holds it, the addresses the other
hosts route it through (``corral_net.routes``), and the v6 slice that goes with it.

``claim_subnet`` keeps the slice this host holds already (a restart, a new driver), else
claims the lowest one no host holds, the next after a conflict with a host racing for it.
A host's record goes only when the host is forgotten (``corral hosts forget``): a lost host's
subnet stays its own, as its apps' addresses do.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

import structlog

from corral.errors import CorralError, ErrorCode
from corral_net.config import NetConfig

log = structlog.get_logger("corral.net")
SUBNET = "subnet"
HOST = "host"
OWNER = "driver:net"  # this driver's records; another host's come back as driver:net@<host>
LEGACY_OWNER = "net"
"""The owner of subnet records before 0.x (an app could be named so): such a record of this
host is claimed again under ``OWNER``."""
CLAIM_ATTEMPTS = 8


class KernelCalls(Protocol):
    """What this module asks of the kernel (``corral.sdk``'s ``KernelLink`` is one)."""

    async def call(self, op: str, args: dict[str, Any] | None = None, *,
                   timeout: float = 30.0) -> dict[str, Any]:
        """Send a request to the kernel; its reply, or ``CorralError``."""
        ...


@dataclass(frozen=True)
class HostSlices:
    """pool4 cut into /``host_prefix`` slices and pool6 into as many (``validate_split``)."""

    pool4: ipaddress.IPv4Network
    pool6: ipaddress.IPv6Network | None
    host_prefix: int
    host_prefix6: int | None

    @classmethod
    def of(cls, config: NetConfig) -> HostSlices:
        """The slices of ``config``'s pools; CorralError naming ``host_prefix`` (or
        ``pool6``) when they cannot be cut so."""
        config.validate_split()
        return cls(config.pool4, config.pool6, config.host_prefix, config.host_prefix6)

    @property
    def count(self) -> int:
        """How many hosts the pools have room for."""
        return 1 << (self.host_prefix - self.pool4.prefixlen)

    def slice(self, index: int) -> tuple[ipaddress.IPv4Network, ipaddress.IPv6Network | None]:
        """Slice ``index`` of pool4 and the slice of pool6 that goes with it."""
        if not 0 <= index < self.count:
            raise CorralError(f"net: host slice {index} outside pool4 {self.pool4} "
                              f"({self.count} slices of /{self.host_prefix})",
                              code=ErrorCode.INVALID)
        v4 = ipaddress.IPv4Network((int(self.pool4.network_address)
                                    + (index << (32 - self.host_prefix)), self.host_prefix))
        v6 = None
        if self.pool6 is not None and self.host_prefix6 is not None:
            v6 = ipaddress.IPv6Network((int(self.pool6.network_address)
                                        + (index << (128 - self.host_prefix6)),
                                        self.host_prefix6))
        return v4, v6

    def index_of(self, cidr: str) -> int | None:
        """The index of the slice whose v4 CIDR is exactly ``cidr``; None for anything else
        (outside pool4, another size, not a network)."""
        try:
            net = ipaddress.IPv4Network(cidr)
        except ValueError:
            return None
        if net.prefixlen != self.host_prefix or not net.subnet_of(self.pool4):
            return None
        return (int(net.network_address) - int(self.pool4.network_address)) >> (
            32 - self.host_prefix)

    def covered(self, cidr: str) -> range:
        """The indexes of the slices that ``cidr`` (another host's subnet, maybe cut with
        another ``host_prefix``) overlaps; empty when it lies outside pool4."""
        try:
            net = ipaddress.IPv4Network(cidr)
        except ValueError:
            return range(0)
        if not net.overlaps(self.pool4):
            return range(0)
        shift = 32 - self.host_prefix
        base = int(self.pool4.network_address)
        first = max(int(net.network_address), base)
        last = min(int(net.broadcast_address), int(self.pool4.broadcast_address))
        return range((first - base) >> shift, ((last - base) >> shift) + 1)


@dataclass(frozen=True)
class SubnetRecord:
    """One host's subnet as the ledger lists it (``mine``: held by this host's driver)."""

    cidr: str
    owner: str
    host: str
    address: str | None  # the host's address (``[host] address``), None when it has none
    address6: str | None  # its global IPv6 address on the same link, when it has one
    pool6: str | None
    mine: bool

    @property
    def network(self) -> ipaddress.IPv4Network:
        """The v4 subnet."""
        return ipaddress.IPv4Network(self.cidr)

    @property
    def network6(self) -> ipaddress.IPv6Network | None:
        """The v6 subnet, None when the host runs no IPv6."""
        return ipaddress.IPv6Network(self.pool6) if self.pool6 else None

    @property
    def via4(self) -> ipaddress.IPv4Address | None:
        """The IPv4 address the other hosts route this subnet through (None: none known)."""
        found = _address(self.address, 4)
        return found if isinstance(found, ipaddress.IPv4Address) else None

    @property
    def via6(self) -> ipaddress.IPv6Address | None:
        """The IPv6 address the other hosts route the v6 subnet through (None: none known)."""
        found = _address(self.address, 6) or _address(self.address6, 6)
        return found if isinstance(found, ipaddress.IPv6Address) else None


def _address(text: str | None, version: int
             ) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``text`` as an address of IP ``version``; None when it is none (or of the other)."""
    try:
        addr = ipaddress.ip_address(text) if text else None
    except ValueError:
        return None
    return addr if addr is not None and addr.version == version else None


def parse_records(listed: Iterable[Mapping[str, Any]], owner: str = OWNER) -> list[SubnetRecord]:
    """The ``subnet`` records of a ``ledger.list`` answer; ones that are no IPv4 network, or
    whose value is not an object, are left out (logged)."""
    out: list[SubnetRecord] = []
    for raw in listed:
        value = raw.get("value")
        key = str(raw.get("key", ""))
        try:
            ipaddress.IPv4Network(key)
            if not isinstance(value, Mapping):
                raise ValueError("its value is not an object")
            pool6 = value.get("pool6")
            if pool6:
                ipaddress.IPv6Network(str(pool6))
        except ValueError as exc:
            log.warning("subnet record ignored", key=key, owner=raw.get("owner"), why=str(exc))
            continue
        out.append(SubnetRecord(
            cidr=key, owner=str(raw.get("owner", "")), host=str(value.get("host") or ""),
            address=_text(value.get("address")), address6=_text(value.get("address6")),
            pool6=str(pool6) if pool6 else None,
            mine=raw.get("owner") in {owner, LEGACY_OWNER if owner == OWNER else owner}))
    return out


def _text(value: Any) -> str | None:
    return str(value) if value else None


@dataclass(frozen=True)
class HostIdentity:
    """This host as its subnet record names it."""

    name: str
    address: str | None
    address6: str | None = None


async def host_address(kernel: KernelCalls, name: str) -> str | None:
    """The address of host ``name`` in the ledger's host records (``[host] address``), None
    when it registered none."""
    listed = await kernel.call("ledger.list", {"kind": HOST})
    for record in listed.get("records", []):
        if record.get("key") == name and isinstance(record.get("value"), Mapping):
            address = record["value"].get("address")
            return str(address) if address else None
    return None


async def claim_subnet(kernel: KernelCalls, slices: HostSlices, me: HostIdentity,
                       owner: str = OWNER) -> tuple[SubnetRecord, list[SubnetRecord]]:
    """Claim this host's subnet: the one it holds already (its value brought up to date),
    else the lowest slice no host's subnet overlaps, the next one after a conflict with a
    host racing for it. Returns this host's record and every host's records listed last.
    A record of ours that is no slice of the pools (host_prefix or the pools changed) is
    released. CorralError (conflict) naming the pool, host_prefix and the hosts holding
    slices when none is free."""
    raced: set[int] = set()
    for _attempt in range(CLAIM_ATTEMPTS):
        listed = await kernel.call("ledger.list", {"kind": SUBNET})
        records = parse_records(listed.get("records", []), owner)
        held = sorted((r for r in records if r.mine), key=lambda r: r.network)
        kept = next((r for r in held if slices.index_of(r.cidr) is not None), None)
        stale = [r for r in held if r is not kept]
        if stale:
            log.warning("subnets of another pool layout released",
                        subnets=[r.cidr for r in stale], pool4=str(slices.pool4),
                        host_prefix=slices.host_prefix)
            for holder in sorted({r.owner for r in stale}):
                await kernel.call("ledger.release", {"owner": holder, "keys": [
                    [SUBNET, r.cidr] for r in stale if r.owner == holder]})
            records = [r for r in records if r not in stale]
        if kept is not None:
            index = slices.index_of(kept.cidr)
            assert index is not None
            mine = _record(slices, index, me, owner)
            if kept.owner != owner:  # held under the legacy owner: moved to this one
                await kernel.call("ledger.release", {
                    "owner": kept.owner, "keys": [[SUBNET, kept.cidr]]})
                await claim_record(kernel, mine, owner)
            elif _value(mine) != _value(kept):  # the address changed: the others follow it
                await claim_record(kernel, mine, owner)
            return mine, [mine if r is kept else r for r in records]
        taken = set(raced)
        for record in records:
            if not record.mine:
                taken.update(slices.covered(record.cidr))
        index = next((i for i in range(slices.count) if i not in taken), None)
        if index is None:
            holders = sorted({f"{r.host or r.owner} ({r.cidr})" for r in records
                              if not r.mine})
            raise CorralError(
                f"net: no free host subnet in pool4 {slices.pool4}: its {slices.count} "
                f"slices of host_prefix /{slices.host_prefix} are held by "
                f"{', '.join(holders) or 'hosts being claimed'}; set a larger [drivers.net] "
                "pool4 or a longer host_prefix on every host, or forget lost hosts "
                "(corral hosts forget)", code=ErrorCode.CONFLICT)
        mine = _record(slices, index, me, owner)
        try:
            await claim_record(kernel, mine, owner)
        except CorralError as exc:
            if exc.code != ErrorCode.CONFLICT:
                raise
            raced.add(index)  # a host took it since the list: the next one
            continue
        return mine, [*records, mine]
    raise CorralError(f"net: no subnet of pool4 {slices.pool4} could be claimed for host "
                      f"{me.name} in {CLAIM_ATTEMPTS} attempts (hosts racing for them)",
                      code=ErrorCode.CONFLICT, retry=True)


def _record(slices: HostSlices, index: int, me: HostIdentity, owner: str) -> SubnetRecord:
    v4, v6 = slices.slice(index)
    return SubnetRecord(cidr=str(v4), owner=owner, host=me.name, address=me.address,
                        address6=me.address6, pool6=str(v6) if v6 is not None else None,
                        mine=True)


def _value(record: SubnetRecord) -> dict[str, Any]:
    return {"host": record.host, "address": record.address, "address6": record.address6,
            "pool6": record.pool6}


async def claim_record(kernel: KernelCalls, record: SubnetRecord, owner: str = OWNER) -> None:
    """Claim ``record`` (this host's subnet) in the ledger for ``owner``; a re-claim of one
    it holds brings its value up to date. CorralError (conflict) when another host holds it."""
    await kernel.call("ledger.claim", {"owner": owner, "claims": [
        {"kind": SUBNET, "key": record.cidr, "value": _value(record)}]})


def address6_beside(addresses: Mapping[str, Iterable[str]], address: str | None) -> str | None:
    """This host's IPv6 address to route its v6 subnet through: ``address`` itself when it
    is one, else the lowest global IPv6 address on the link that holds ``address``
    (``addresses``: global addresses by link, ``Netlink.global_addresses``), else None."""
    own = _address(address, 6)
    if own is not None:
        return str(own)
    for held in addresses.values():
        held = list(held)
        if address is not None and address in held:
            v6 = sorted(ipaddress.IPv6Address(a) for a in held if _address(a, 6) is not None)
            return str(v6[0]) if v6 else None
    return None


def peer_addresses(records: Iterable[SubnetRecord], host: str) -> list[str]:
    """The addresses of the hosts other than ``host`` that hold subnets (v4 and v6): the
    senders from outside this host its instances let in."""
    found: list[str] = []
    for record in records:
        if record.mine or record.host == host:
            continue
        found += [str(a) for a in (record.via4, record.via6) if a is not None]
    return found


def local_config(config: NetConfig, record: SubnetRecord) -> NetConfig:
    """``config`` with its pools replaced by this host's slices (``record``)."""
    return replace(config, pool4=record.network, pool6=record.network6)
