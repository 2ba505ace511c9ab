"""The ONE module that speaks netlink (pyroute2): namespaces, veth links, addresses, routes.

Also writes the few per-link sysctls those links need. Every multi-step action undoes its
completed steps when a later one fails.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

from pyroute2 import IPRoute, NetlinkError, NetNS, netns

from corral.errors import CorralError, ErrorCode
from corral_net.pool import SlotAddresses

NETNS_DIR = Path("/run/netns")
IFA_F_NODAD = 0x02  # the address needs no duplicate detection: a point-to-point pair
AF_INET6 = 10


def _sysctl(path: str, value: str) -> None:
    with open(f"/proc/sys/{path}", "w") as handle:
        handle.write(value)


def _sysctl_read(path: str) -> str:
    with open(f"/proc/sys/{path}") as handle:
        return handle.read().strip()


class Netlink:
    """Creates and removes per-instance network namespaces and their veth pairs."""

    def create_instance(self, ns_name: str, link: str, addrs: SlotAddresses) -> None:
        """Make netns ``ns_name`` with ``eth0`` paired to host link ``link``, addressed, routed."""
        undo: list[Callable[[], None]] = []
        step = "create netns"
        try:
            netns.create(ns_name)
            undo.append(lambda: self._remove_netns(ns_name))
            step = "create veth"
            with IPRoute() as ipr:
                ipr.link("add", ifname=link, kind="veth",
                         peer={"ifname": "eth0", "net_ns_fd": ns_name})
                undo.append(lambda: self._remove_link(link))
                index = ipr.link_lookup(ifname=link)[0]
                step = "address host side"
                ipr.addr("add", index=index, address=str(addrs.gateway4),
                         prefixlen=addrs.prefixlen4)
                if addrs.gateway6 is not None:
                    ipr.addr("add", index=index, address=str(addrs.gateway6),
                             prefixlen=addrs.prefixlen6, flags=IFA_F_NODAD)
                # route_localnet lets DNAT'd connections from 127.0.0.1 leave through this link
                # (they are masqueraded to the gateway address on the way out).
                _sysctl(f"net/ipv4/conf/{link}/route_localnet", "1")
                ipr.link("set", index=index, state="up")
            step = "configure netns"
            with NetNS(ns_name) as ns:
                ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
                eth0 = ns.link_lookup(ifname="eth0")[0]
                ns.addr("add", index=eth0, address=str(addrs.instance4),
                        prefixlen=addrs.prefixlen4)
                if addrs.instance6 is not None:
                    ns.addr("add", index=eth0, address=str(addrs.instance6),
                            prefixlen=addrs.prefixlen6, flags=IFA_F_NODAD)
                ns.link("set", index=eth0, state="up")
                ns.route("add", dst="default", gateway=str(addrs.gateway4))
                if addrs.gateway6 is not None:
                    ns.route("add", dst="default", gateway=str(addrs.gateway6), family=AF_INET6)
        except (NetlinkError, OSError) as exc:
            for action in reversed(undo):
                try:
                    action()
                except (NetlinkError, OSError):
                    pass  # best effort: report the original failure, not the cleanup's
            raise CorralError(
                f"net: {step} for {ns_name} (link {link}): {exc}", code=ErrorCode.INTERNAL
            ) from exc

    def remove_instance(self, ns_name: str, link: str) -> None:
        """Remove the host link (its peer goes with it) and the netns; absent parts are fine;
        an empty name stands for no such part."""
        self.remove_link(link)
        self.remove_namespace(ns_name)

    def remove_link(self, link: str) -> None:
        """Remove host link ``link`` (its veth peer goes with it); absent is fine."""
        if link:
            self._remove_link(link)

    def remove_namespace(self, ns_name: str) -> None:
        """Remove network namespace ``ns_name`` from /run/netns; absent is fine."""
        # never an empty name: /run/netns itself "exists", and pyroute2 would detach it
        if ns_name:
            self._remove_netns(ns_name)

    def _remove_link(self, link: str) -> None:
        with IPRoute() as ipr:
            indexes = ipr.link_lookup(ifname=link)
            if indexes:
                try:
                    ipr.link("del", index=indexes[0])
                except NetlinkError as exc:
                    if exc.code != errno.ENODEV:
                        raise

    def _remove_netns(self, ns_name: str) -> None:
        if (NETNS_DIR / ns_name).exists():
            netns.remove(ns_name)

    def namespaces(self, prefix: str) -> list[str]:
        """Names of the network namespaces under /run/netns starting with ``prefix``."""
        try:
            return sorted(n for n in os.listdir(NETNS_DIR) if n.startswith(prefix))
        except FileNotFoundError:
            return []

    def links(self, prefix: str) -> dict[str, list[str]]:
        """Host links whose name starts with ``prefix``, with their addresses."""
        found: dict[str, list[str]] = {}
        with IPRoute() as ipr:
            names = {
                link["index"]: link.get_attr("IFLA_IFNAME")
                for link in ipr.get_links()
            }
            for name in names.values():
                if name and name.startswith(prefix):
                    found[name] = []
            for addr in ipr.get_addr():
                name = names.get(addr["index"])
                if name in found:
                    found[name].append(str(addr.get_attr("IFA_ADDRESS")))
        return found

    def enable_forwarding(self, ipv6: bool) -> None:
        """Turn on IPv4 (and IPv6) forwarding; apps' traffic is routed through the host."""
        if _sysctl_read("net/ipv4/ip_forward") != "1":
            _sysctl("net/ipv4/ip_forward", "1")
        if ipv6 and _sysctl_read("net/ipv6/conf/all/forwarding") != "1":
            _sysctl("net/ipv6/conf/all/forwarding", "1")
