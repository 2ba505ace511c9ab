"""The ONE module that speaks netlink (pyroute2): namespaces, veth links, addresses, routes
(the instances' own, and the host's routes to other hosts' subnets, ``corral_net.routes``).

Also writes the few per-link sysctls those links need. Every multi-step action undoes its
completed steps when a later one fails.

Namespaces are made and entered from a short-lived thread of this process (``unshare`` /
``setns`` act on the calling thread only), not from a forked child as pyroute2's
``netns.create`` and ``NetNS`` do: a fork of the driver costs several milliseconds per
instance, on the path of every start and build. Each such thread ends after its one job, so
no thread of the driver is ever left in another namespace, whatever fails.
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from pyroute2 import IPRoute, NetlinkError, netns

from corral.errors import CorralError, ErrorCode
from corral_net.pool import SlotAddresses
from corral_net.routes import ROUTE_PROTOCOL, Route

NETNS_DIR = Path("/run/netns")
IFA_F_NODAD = 0x02  # the address needs no duplicate detection: a point-to-point pair
AF_INET, AF_INET6 = 2, 10
MAIN_TABLE = 254
RTN_UNICAST = 1
RT_SCOPE_UNIVERSE = 0


CLONE_NEWNET = 0x40000000
MS_BIND, MS_REC, MS_SHARED = 0x1000, 0x4000, 0x100000
_T = TypeVar("_T")
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_void_p]


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _on_own_thread(job: Callable[[], _T]) -> _T:
    """Run ``job`` on a new thread and return what it returned (or raise what it raised)."""
    box: dict[str, object] = {}

    def run() -> None:
        try:
            box["value"] = job()
        except BaseException as exc:  # handed to the caller as is
            box["error"] = exc

    worker = threading.Thread(target=run, name="corral-netns")
    worker.start()
    worker.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


def _share_netns_dir() -> None:
    """Make NETNS_DIR a shared mount (a bind of itself if it is none), as ``ip netns add``
    does, so a namespace bound there is seen from every mount namespace."""
    NETNS_DIR.mkdir(mode=0o755, exist_ok=True)
    path = str(NETNS_DIR).encode()
    if _libc.mount(b"", path, b"none", MS_SHARED | MS_REC, None) == 0:
        return
    _check(_libc.mount(path, path, b"none", MS_BIND | MS_REC, None), f"bind {NETNS_DIR}")
    _check(_libc.mount(b"", path, b"none", MS_SHARED | MS_REC, None), f"share {NETNS_DIR}")


def _create_netns(ns_name: str) -> None:
    """Create network namespace ``ns_name``, bound at NETNS_DIR/ns_name (``ip netns add``)."""
    _share_netns_dir()
    target = NETNS_DIR / ns_name
    os.close(os.open(target, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0))

    def make() -> None:
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _check(_libc.unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")
            try:
                _check(_libc.mount(b"/proc/thread-self/ns/net", str(target).encode(), b"none",
                                   MS_BIND, None), f"bind the namespace at {target}")
            finally:
                _check(_libc.setns(home, CLONE_NEWNET), "setns back")
        finally:
            os.close(home)

    try:
        _on_own_thread(make)
    except OSError:
        target.unlink(missing_ok=True)
        raise


def _in_netns(ns_name: str, job: Callable[[IPRoute], _T]) -> _T:
    """Run ``job`` with an rtnetlink socket opened inside namespace ``ns_name``."""
    def enter() -> _T:
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            fd = os.open(NETNS_DIR / ns_name, os.O_RDONLY | os.O_CLOEXEC)
            try:
                _check(_libc.setns(fd, CLONE_NEWNET), f"setns into {ns_name}")
            finally:
                os.close(fd)
            try:
                with IPRoute() as ns:
                    return job(ns)
            finally:
                _check(_libc.setns(home, CLONE_NEWNET), "setns back")
        finally:
            os.close(home)

    return _on_own_thread(enter)


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
        self.create_links(ns_name, link)
        try:
            self.address_links(ns_name, link, addrs)
        except CorralError:
            self._undo([lambda: self._remove_link(link), lambda: self._remove_netns(ns_name)])
            raise

    def create_links(self, ns_name: str, link: str) -> None:
        """Make netns ``ns_name`` and the veth pair ``link`` (host) / ``eth0`` (inside), down
        and without addresses: what an instance's network needs before its address is known.
        Nothing is left behind on failure."""
        undo: list[Callable[[], None]] = []
        step = "create netns"
        try:
            _create_netns(ns_name)
            undo.append(lambda: self._remove_netns(ns_name))
            step = "create veth"
            with IPRoute() as ipr:
                ipr.link("add", ifname=link, kind="veth",
                         peer={"ifname": "eth0", "net_ns_fd": ns_name})
        except (NetlinkError, OSError) as exc:
            self._undo(undo)
            raise CorralError(
                f"net: {step} for {ns_name} (link {link}): {exc}", code=ErrorCode.INTERNAL
            ) from exc

    def address_links(self, ns_name: str, link: str, addrs: SlotAddresses) -> None:
        """Address, raise and route the pair ``create_links`` made; the caller removes the
        pair on failure."""
        step = "address host side"
        try:
            with IPRoute() as ipr:
                index = ipr.link_lookup(ifname=link)[0]
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

            def configure(ns: IPRoute) -> None:
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

            _in_netns(ns_name, configure)
        except (NetlinkError, OSError) as exc:
            raise CorralError(
                f"net: {step} for {ns_name} (link {link}): {exc}", code=ErrorCode.INTERNAL
            ) from exc

    @staticmethod
    def _undo(actions: list[Callable[[], None]]) -> None:
        for action in reversed(actions):
            try:
                action()
            except (NetlinkError, OSError):
                pass  # best effort: report the original failure, not the cleanup's

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

    # -- the host's routes to other hosts' subnets (corral_net.routes) -------------------------
    def routes(self) -> list[Route]:
        """Every unicast route of the main table that has a destination (not the default
        route), v4 and v6, whoever made it."""
        found: list[Route] = []
        with IPRoute() as ipr:
            for family in (AF_INET, AF_INET6):
                for msg in ipr.get_routes(family=family, table=MAIN_TABLE):
                    dst = msg.get_attr("RTA_DST")
                    if msg["type"] != RTN_UNICAST or dst is None:
                        continue
                    if (msg.get_attr("RTA_TABLE") or msg["table"]) != MAIN_TABLE:
                        continue
                    gateway = msg.get_attr("RTA_GATEWAY")
                    prefsrc = msg.get_attr("RTA_PREFSRC")
                    found.append(Route(
                        ipaddress.ip_network(f"{dst}/{msg['dst_len']}", strict=False),
                        ipaddress.ip_address(gateway) if gateway else None,
                        ipaddress.ip_address(prefsrc) if prefsrc else None,
                        proto=int(msg["proto"]), metric=msg.get_attr("RTA_PRIORITY")))
        return found

    def add_route(self, route: Route) -> None:
        """Add ``route`` to the main table with corral's protocol; CorralError naming it when
        the kernel refuses (another route to it exists, the gateway is not on a link...)."""
        self._route("add", route)

    def replace_route(self, route: Route) -> None:
        """Replace the main table's route to ``route.dst`` of metric ``route.metric`` (ours:
        the caller checked) with ``route``."""
        self._route("replace", route)

    def remove_route(self, route: Route) -> None:
        """Remove ``route`` from the main table if corral's protocol made it (the kernel
        matches the protocol); absent is fine."""
        try:
            self._route("del", route)
        except CorralError as exc:
            cause = exc.__cause__
            if not (isinstance(cause, NetlinkError)
                    and cause.code in (errno.ESRCH, errno.ENOENT)):
                raise

    @staticmethod
    def _route(command: str, route: Route) -> None:
        spec: dict[str, object] = {
            "dst": str(route.dst), "table": MAIN_TABLE, "proto": ROUTE_PROTOCOL,
            "family": AF_INET if route.dst.version == 4 else AF_INET6}
        if route.gateway is not None:
            spec["gateway"] = str(route.gateway)
        if route.prefsrc is not None and command != "del":
            spec["prefsrc"] = str(route.prefsrc)
        if route.metric is not None:
            spec["priority"] = route.metric
        try:
            with IPRoute() as ipr:
                ipr.route(command, **spec)
        except (NetlinkError, OSError) as exc:
            hint = ""
            if isinstance(exc, NetlinkError) and exc.code == errno.ENETUNREACH:
                hint = " (the other host's address is on none of this host's links: hosts " \
                       "must share one, or route the subnets elsewhere)"
            raise CorralError(f"net: route {command} {route}: {exc}{hint}",
                              code=ErrorCode.INTERNAL) from exc

    def global_addresses(self) -> dict[str, list[str]]:
        """The host's addresses of global scope (v4 and v6), by link name."""
        found: dict[str, list[str]] = {}
        with IPRoute() as ipr:
            names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
            for addr in ipr.get_addr():
                name = names.get(addr["index"])
                if name and addr["scope"] == RT_SCOPE_UNIVERSE:
                    found.setdefault(name, []).append(str(addr.get_attr("IFA_ADDRESS")))
        return found
