"""What the net driver enforces, per app and per instance, derived from the resolved manifest."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from corral.errors import ManifestError
from corral_net.egress import EgressEntry, parse_egress
from corral_net.pool import SlotAddresses


@dataclass(frozen=True)
class AppPolicy:
    """One app's network grants: its ports, egress peers and the interfaces it may use."""

    name: str
    ports: tuple[int, ...] = ()  # resolved host ports (after --offset); also the instance ports
    egress: tuple[EgressEntry, ...] = ()
    interfaces: tuple[str, ...] = ()  # empty: egress entries apply on any interface

    @property
    def key(self) -> str:
        """The app name as it appears in nft chain and counter names."""
        return re.sub(r"[^A-Za-z0-9_.-]", "_", self.name)


@dataclass(frozen=True)
class InstanceNet:
    """One instance's network: its namespace, host link and addresses."""

    id: str
    app: str
    netns: str
    link: str
    addresses: SlotAddresses
    port: int | None = None  # the port it binds ($PORT), None for portless processes
    kind: str = "instance"


def _port_value(name: str, raw: Any) -> int:
    value = raw.get("port") if isinstance(raw, Mapping) else raw
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ManifestError([f"ports.{name}: expected a port number 1-65535, got {raw!r}"])
    return value


def policy_from_manifest(name: str, manifest: Mapping[str, Any]) -> AppPolicy:
    """Read an app's network grants from its resolved manifest (``corral check --json``)."""
    ports_raw = manifest.get("ports") or {}
    if not isinstance(ports_raw, Mapping):
        raise ManifestError([f"ports: expected a table of named ports, got {ports_raw!r}"])
    ports = tuple(sorted({_port_value(str(k), v) for k, v in ports_raw.items()}))
    network = manifest.get("network") or {}
    if not isinstance(network, Mapping):
        raise ManifestError([f"network: expected a table, got {network!r}"])
    egress_raw = network.get("egress") or []
    interfaces_raw = network.get("interfaces") or []
    if not isinstance(egress_raw, list):
        raise ManifestError(["network.egress: expected a list of strings"])
    # The resolved manifest carries each entry as {"rule": "<as written>", ...}.
    egress_raw = [e.get("rule") if isinstance(e, Mapping) else e for e in egress_raw]
    if not all(isinstance(e, str) for e in egress_raw):
        raise ManifestError(["network.egress: expected strings such as '10.0.0.5/32:5432'"])
    if not isinstance(interfaces_raw, list) or not all(isinstance(i, str) for i in interfaces_raw):
        raise ManifestError(["network.interfaces: expected a list of interface names"])
    problems: list[str] = []
    egress: list[EgressEntry] = []
    for entry in egress_raw:
        try:
            egress.append(parse_egress(entry))
        except ManifestError as exc:
            problems.extend(exc.problems)
    if problems:
        raise ManifestError(problems)
    return AppPolicy(name=name, ports=ports, egress=tuple(egress),
                     interfaces=tuple(interfaces_raw))


@dataclass
class DesiredState:
    """The whole picture the rules are built from: apps, instances, resolved names, and on
    a shared ledger the other hosts' addresses."""

    apps: dict[str, AppPolicy] = field(default_factory=dict)
    instances: dict[str, InstanceNet] = field(default_factory=dict)
    resolved: dict[str, tuple[Any, ...]] = field(default_factory=dict)  # name -> networks
    # None: a host of its own. On a shared ledger: the addresses of the other hosts holding
    # subnets, the only senders from outside this host that reach an instance's address
    # directly (on its granted ports, as this host does); routed there by corral_net.routes.
    peers: tuple[str, ...] | None = None
