"""The manifest's ``[network]`` section: its schema (where the app may connect to), owned by the
net driver. Cheap to import: ``corral check`` loads it without starting the driver."""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from corral.sdk.sections import Section, SectionModel, fail, is_hostname, json_schema

_INTERFACE = re.compile(r"[A-Za-z0-9_.:@-]{1,15}")

EGRESS_EXPECTED = (
    '"CIDR[:port]", "host:port" or "[IPv6 CIDR]:port", e.g. "10.0.0.0/8", '
    '"10.0.0.5/32:5432", "api.example.com:443", "[2001:db8::/32]:443"'
)


def _egress_port(text: str, value: object) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        fail(EGRESS_EXPECTED, value, "the port must be 1..65535")
    return int(text)


def _network(text: str, value: object) -> str | None:
    """Return the normalised network for an address or CIDR, or None if ``text`` is no IP."""
    try:
        return str(ipaddress.ip_network(text, strict=True))
    except ValueError:
        pass
    try:
        network = ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None
    fail(EGRESS_EXPECTED, value, f"{text} has host bits set; did you mean {network}?")


class EgressRule(BaseModel):
    """One parsed ``network.egress`` entry: a network or a host name, and maybe a port."""

    model_config = ConfigDict(extra="forbid", strict=True)

    rule: str = Field(description="the rule as written")
    network: str | None = Field(default=None, description="normalised CIDR, for address rules")
    host: str | None = Field(default=None, description="lower-case DNS name, for host rules")
    port: int | None = Field(default=None, description="None: every port")


def _egress(value: object) -> EgressRule:
    if isinstance(value, EgressRule):
        return value
    if isinstance(value, dict) and isinstance(value.get("rule"), str):
        value = value["rule"]  # the resolved JSON form, read back
    if not isinstance(value, str) or not value or value != value.strip():
        fail(EGRESS_EXPECTED, value)
    host: str | None = None
    network: str | None = None
    port: int | None = None
    if value.startswith("["):
        inside, bracket, rest = value[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            fail(EGRESS_EXPECTED, value)
        network = _network(inside, value)
        if network is None or ":" not in network:
            fail(EGRESS_EXPECTED, value, "brackets hold an IPv6 address or CIDR")
        if rest:
            port = _egress_port(rest[1:], value)
    elif value.count(":") > 1:  # a bare IPv6 address or CIDR, all ports
        network = _network(value, value)
        if network is None:
            fail(EGRESS_EXPECTED, value)
    else:
        address, colon, port_text = value.partition(":")
        if colon:
            port = _egress_port(port_text, value)
        network = _network(address, value)
        if network is None:
            if not is_hostname(address) or address.replace(".", "").isdigit():
                fail(EGRESS_EXPECTED, value)
            if port is None:
                fail(EGRESS_EXPECTED, value, 'a host name needs a port: "host:port"')
            host = address.rstrip(".").lower()
    return EgressRule(rule=value, network=network, host=host, port=port)


def _interface(value: object) -> str:
    if not isinstance(value, str) or not _INTERFACE.fullmatch(value) or value in {".", ".."}:
        fail("a network interface name (1-15 characters, no '/' or spaces)", value)
    return value


Egress = Annotated[
    EgressRule,
    BeforeValidator(_egress),
    json_schema(type="string", examples=["10.0.0.5/32:5432", "api.example.com:443"]),
]
Interface = Annotated[str, BeforeValidator(_interface), json_schema(type="string", maxLength=15)]


class Network(SectionModel):
    """``[network]``: where the app may connect to; everything else is refused."""

    interfaces: list[Interface] = Field(default_factory=list)
    egress: list[Egress] = Field(default_factory=list)


NETWORK = Section("network", Network, doc="interfaces and egress the app may use")
