"""Egress entries of a manifest (``CIDR[:port]``, ``[v6]:port``, ``name:port``) and DNS.

Names are resolved at apply time with their TTL (dnspython, against the host's resolvers) and
refreshed when the TTL runs out. Without dnspython, getaddrinfo is used with a fixed TTL.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass

from corral.errors import ManifestError

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_NAME = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?\.?)+$")


@dataclass(frozen=True)
class EgressEntry:
    """One parsed egress entry: literal networks or a name, and an optional port range."""

    text: str
    networks: tuple[IPNetwork, ...] = ()
    name: str | None = None
    ports: tuple[int, int] | None = None  # inclusive range; None: every port and protocol


def _parse_ports(text: str, entry: str) -> tuple[int, int]:
    low, _, high = text.partition("-")
    try:
        first, last = int(low), int(high or low)
    except ValueError:
        raise ManifestError([f"network.egress {entry!r}: port {text!r} is not a number"]) from None
    if not 1 <= first <= last <= 65535:
        raise ManifestError([f"network.egress {entry!r}: port {text!r} outside 1-65535"])
    return first, last


def parse_egress(entry: str) -> EgressEntry:
    """Parse one egress entry; raise ManifestError naming it when it is malformed."""
    text = entry.strip()
    host, ports = text, None
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise ManifestError([f"network.egress {entry!r}: missing ']'"])
        host, rest = text[1:close], text[close + 1:]
        if rest:
            if not rest.startswith(":"):
                raise ManifestError([f"network.egress {entry!r}: expected ':port' after ']'"])
            ports = _parse_ports(rest[1:], entry)
    elif text.count(":") == 1:
        host, port_text = text.split(":")
        ports = _parse_ports(port_text, entry)
    try:
        return EgressEntry(entry, networks=(ipaddress.ip_network(host, strict=False),),
                           ports=ports)
    except ValueError:
        pass
    if ":" in host or "/" in host or not _NAME.match(host):
        raise ManifestError([
            f"network.egress {entry!r}: expected CIDR[:port], [IPv6]:port or name:port"
        ])
    return EgressEntry(entry, name=host.rstrip(".").lower(), ports=ports)


@dataclass(frozen=True)
class Resolution:
    """Addresses a name resolved to, and when to ask again (monotonic clock)."""

    addresses: tuple[IPNetwork, ...]
    expires: float


class NameResolver:
    """Resolves names with TTLs; uses ``nameservers`` (the host's resolvers) when given."""

    def __init__(self, nameservers: Sequence[str], *, fallback_ttl: float = 60.0,
                 min_ttl: float = 1.0, timeout: float = 2.0) -> None:
        self.nameservers = list(nameservers)
        self.fallback_ttl = fallback_ttl
        self.min_ttl = min_ttl
        self.timeout = timeout

    def resolve(self, name: str) -> Resolution:
        """Return A and AAAA records of ``name``; no answer is an empty, short-lived result."""
        try:
            import dns.exception
            import dns.resolver
        except ImportError:  # documented fallback: getaddrinfo, fixed TTL
            return self._getaddrinfo(name)
        resolver = dns.resolver.Resolver(configure=not self.nameservers)
        if self.nameservers:
            resolver.nameservers = self.nameservers
        resolver.lifetime = self.timeout
        found: list[IPNetwork] = []
        ttl = self.fallback_ttl
        for rdtype in ("A", "AAAA"):
            try:
                answer = resolver.resolve(name, rdtype, search=False)
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                continue
            except dns.exception.DNSException:
                # Resolver unreachable: keep the rule closed for this name, retry soon.
                ttl = min(ttl, 5.0)
                continue
            ttl = min(ttl, float(answer.rrset.ttl) if answer.rrset is not None else ttl)
            found.extend(ipaddress.ip_network(r.to_text()) for r in answer)
        if not found:
            ttl = min(ttl, 5.0)
        return Resolution(tuple(found), time.monotonic() + max(ttl, self.min_ttl))

    def _getaddrinfo(self, name: str) -> Resolution:
        try:
            infos = socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)
        except socket.gaierror:
            infos = []
        found = sorted({ipaddress.ip_network(info[4][0]) for info in infos}, key=str)
        return Resolution(tuple(found), time.monotonic() + self.fallback_ttl)
