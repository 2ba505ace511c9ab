"""The net driver's host configuration: address pools, names it owns, resolvers."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corral.errors import CorralError, ErrorCode

DEFAULT_POOL4 = "10.231.0.0/16"
# ULA whose global ID spells "cora" in hex: unlikely to clash with a site's own fd00::/64.
DEFAULT_POOL6 = "fd63:6f72:7261:1::/64"
# On a ledger several hosts share, each host's slice of pool4: a /22 is 256 instances.
DEFAULT_HOST_PREFIX = 22


def host_resolvers(resolv_conf: Path = Path("/etc/resolv.conf")) -> list[str]:
    """Return the nameserver addresses listed in ``resolv_conf`` (empty if it is missing)."""
    try:
        text = resolv_conf.read_text()
    except OSError:
        return []
    servers: list[str] = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            addr = parts[1].split("%", 1)[0]  # drop an IPv6 zone index
            try:
                servers.append(str(ipaddress.ip_address(addr)))
            except ValueError:
                continue
    return servers


@dataclass(frozen=True)
class NetConfig:
    """Everything the net driver needs from the host config's ``[drivers.net]`` section."""

    pool4: ipaddress.IPv4Network = field(
        default_factory=lambda: ipaddress.IPv4Network(DEFAULT_POOL4)
    )
    pool6: ipaddress.IPv6Network | None = field(
        default_factory=lambda: ipaddress.IPv6Network(DEFAULT_POOL6)
    )
    table: str = "corral"  # nft tables: inet <table>, ip <table>_nat, ip6 <table>_nat
    netns_prefix: str = "corral-"  # /run/netns/<prefix><instance id sanitized>
    link_prefix: str = "crl"  # host-side veth names: <prefix><hash>, at most 15 chars
    resolvers: tuple[str, ...] = field(default_factory=lambda: tuple(host_resolvers()))
    dns_fallback_ttl: float = 60.0  # TTL used when names resolve through getaddrinfo
    dns_min_ttl: float = 1.0  # never refresh more often than this
    # On a shared ledger: the prefix of each host's slice of pool4 (pool6 is cut into as
    # many slices); unused on a host of its own (corral_net.subnets).
    host_prefix: int = DEFAULT_HOST_PREFIX

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any] | None) -> NetConfig:
        """Build a config from the host config's driver section; unknown keys are an error."""
        raw = dict(raw or {})
        known = {
            "pool4", "pool6", "table", "netns_prefix", "link_prefix", "resolvers",
            "dns_fallback_ttl", "dns_min_ttl", "host_prefix",
        }
        unknown = sorted(set(raw) - known)
        if unknown:
            raise CorralError(
                f"[drivers.net]: unknown key(s) {', '.join(unknown)}; expected one of "
                f"{', '.join(sorted(known))}",
                code=ErrorCode.INVALID,
            )
        kwargs: dict[str, Any] = {}
        try:
            if "pool4" in raw:
                kwargs["pool4"] = ipaddress.IPv4Network(raw["pool4"])
            if "pool6" in raw:
                kwargs["pool6"] = ipaddress.IPv6Network(raw["pool6"]) if raw["pool6"] else None
            if "resolvers" in raw:
                kwargs["resolvers"] = tuple(str(ipaddress.ip_address(r)) for r in raw["resolvers"])
        except (ValueError, TypeError) as exc:
            raise CorralError(f"[drivers.net]: {exc}", code=ErrorCode.INVALID) from exc
        for key in ("table", "netns_prefix", "link_prefix"):
            if key in raw:
                kwargs[key] = str(raw[key])
        for key in ("dns_fallback_ttl", "dns_min_ttl"):
            if key in raw:
                kwargs[key] = float(raw[key])
        if "host_prefix" in raw:
            value = raw["host_prefix"]
            if isinstance(value, bool) or not isinstance(value, int):
                raise CorralError(f"[drivers.net] host_prefix {value!r}: expected a prefix "
                                  "length (an integer, e.g. 22)", code=ErrorCode.INVALID)
            kwargs["host_prefix"] = value
        config = cls(**kwargs)
        config.validate()
        if "host_prefix" in raw:  # set on purpose: it must fit the pools now, not only once
            config.validate_split()  # the ledger turns out to be shared
        return config

    def validate(self) -> None:
        """Raise CorralError naming the setting if the config cannot work."""
        if self.pool4.prefixlen > 30:
            raise CorralError(f"[drivers.net] pool4 {self.pool4}: needs at least a /30",
                              code=ErrorCode.INVALID)
        if self.pool6 is not None and self.pool6.prefixlen > 126:
            raise CorralError(f"[drivers.net] pool6 {self.pool6}: needs at least a /126",
                              code=ErrorCode.INVALID)
        if not 1 <= self.host_prefix <= 30:
            raise CorralError(f"[drivers.net] host_prefix {self.host_prefix}: a host's slice "
                              "of pool4 is a /1 to a /30", code=ErrorCode.INVALID)
        if not 1 <= len(self.link_prefix) <= 5:
            raise CorralError("[drivers.net] link_prefix: 1 to 5 characters (IFNAMSIZ is 16)",
                              code=ErrorCode.INVALID)
        for key in ("table", "netns_prefix", "link_prefix"):
            value = getattr(self, key)
            if not value or not all(c.isalnum() or c in "_-" for c in value):
                raise CorralError(f"[drivers.net] {key}={value!r}: letters, digits, _ and - only",
                                  code=ErrorCode.INVALID)

    def validate_split(self) -> None:
        """Raise CorralError naming ``host_prefix`` (or ``pool6``) unless the pools can be cut
        into one slice per host: a /``host_prefix`` of pool4, and pool6 into as many slices,
        each holding at least as many instance pairs (/126) as a v4 slice holds (/30)."""
        if self.host_prefix <= self.pool4.prefixlen:
            raise CorralError(
                f"[drivers.net] host_prefix {self.host_prefix}: each host gets a slice of "
                f"pool4 {self.pool4}, so it must be longer than /{self.pool4.prefixlen} "
                f"(and at most 30)", code=ErrorCode.INVALID)
        prefix6 = self.host_prefix6
        if self.pool6 is not None and prefix6 is not None and prefix6 > 96 + self.host_prefix:
            raise CorralError(
                f"[drivers.net] pool6 {self.pool6}: cut like pool4 {self.pool4} into "
                f"{2 ** (self.host_prefix - self.pool4.prefixlen)} host slices (host_prefix "
                f"{self.host_prefix}) it gives /{prefix6} slices, which hold fewer instance "
                f"pairs than a /{self.host_prefix} of pool4; give pool6 a shorter prefix (or a "
                "longer host_prefix), or turn IPv6 off (pool6 = \"\")", code=ErrorCode.INVALID)

    @property
    def host_prefix6(self) -> int | None:
        """The prefix of each host's slice of pool6 (pool6 cut into as many slices as pool4),
        None when IPv6 is off."""
        if self.pool6 is None:
            return None
        return self.pool6.prefixlen + (self.host_prefix - self.pool4.prefixlen)


def instance_names(config: NetConfig, instance_id: str) -> tuple[str, str]:
    """Return (netns name, host-side link name) for ``instance_id``; stable across restarts."""
    import hashlib
    import re

    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", instance_id)
    digest = hashlib.blake2b(f"{config.netns_prefix}{instance_id}".encode(), digest_size=8)
    # A hash keeps names unique after sanitizing and truncating; IFNAMSIZ leaves 15 chars.
    netns = f"{config.netns_prefix}{safe[:200]}-{digest.hexdigest()[:6]}"
    link = f"{config.link_prefix}{digest.hexdigest()}"[:15]
    return netns, link
