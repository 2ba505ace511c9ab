"""Escape attempts 5-7 and 15 of SECURITY.md, made from inside a real instance namespace.

Each app process runs via ``ip netns exec`` + ``setpriv`` as uid 65534 with no_new_privs,
the way the kernel's launch path runs apps.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from typing import Any

import pytest
from netlab import HostService, Lab, host_connect

from corral.testing import free_port
from corral_net.model import policy_from_manifest

REFUSED = {"ECONNREFUSED", "EHOSTUNREACH", "ENETUNREACH", "EACCES", "EPERM"}


def _host_addresses() -> list[str]:
    """The host's own non-loopback addresses outside corral's pools (eth0 and the like)."""
    import json
    import subprocess

    out = subprocess.run(["ip", "-j", "addr"], capture_output=True, text=True, check=True)
    found = []
    for link in json.loads(out.stdout):
        for addr in link.get("addr_info", []):
            ip = ipaddress.ip_address(addr["local"])
            if not ip.is_loopback and not ip.is_link_local:
                found.append(str(ip))
    return found


def _assert_refused(results: list[dict[str, Any]], what: str) -> None:
    for result in results:
        assert result["result"] in REFUSED, f"{what}: {result} should be refused"
        # Refusals are rejects (tcp reset / admin-prohibited), so they fail fast, never hang.
        assert result.get("seconds", 0) < 1.0, f"{what}: {result} was not refused fast"


def _shop(lab: Lab, port: int, extra_egress: list[str] | None = None) -> Any:
    egress = [f"{lab.peer_db4}/32:5432", f"[{lab.peer_db6}]:5432", "db.test:5432",
              *(extra_egress or [])]
    policy = policy_from_manifest("shop", {
        "ports": {"http": port}, "network": {"egress": egress, "interfaces": [lab.peer_link]}})
    lab.net.set_app(policy)
    instance = lab.net.prepare_instance("shop", "shop.web.0", port=port)
    lab.resolv_conf(instance.netns, lab.peer_db4)
    return instance


@pytest.mark.root
def test_listed_database_peer_is_reached_by_v4_v6_and_name(lab: Lab) -> None:
    instance = _shop(lab, free_port("::"))
    results = lab.probe(instance.netns, [
        {"op": "connect", "host": lab.peer_db4, "port": 5432},
        {"op": "connect", "host": lab.peer_db6, "port": 5432},
        {"op": "resolve", "name": "db.test"},
        {"op": "connect", "host": "db.test", "port": 5432},
    ])
    assert [r["result"] for r in results[:2]] == ["ok:peer:5432", "ok:peer:5432"]
    assert lab.peer_db4 in results[2]["result"], results[2]
    assert results[3]["result"] == "ok:peer:5432", results[3]


@pytest.mark.root
def test_unlisted_peers_are_refused_and_counted(lab: Lab, host_service: HostService) -> None:
    """Escape 6 (v4, v6, literal, name) and 'no host services unless listed'; all counted."""
    instance = _shop(lab, free_port("::"))
    gateway4 = str(instance.addresses.gateway4)
    gateway6 = str(instance.addresses.gateway6)
    attempts = [
        {"op": "connect", "host": lab.peer_other4, "port": 5432},  # unlisted address, v4
        {"op": "connect", "host": lab.peer_other6, "port": 5432},  # unlisted address, v6
        {"op": "connect", "host": lab.peer_db4, "port": 5433},  # listed host, unlisted port
        {"op": "connect", "host": lab.peer_db6, "port": 5433},
        {"op": "connect", "host": "blocked.test", "port": 5432},  # unlisted name
        {"op": "connect", "host": gateway4, "port": host_service.port},  # the host itself
        {"op": "connect", "host": gateway6, "port": host_service.port},
        {"op": "connect", "host": lab.peer_host4, "port": host_service.port},
        {"op": "connect", "host": lab.peer_host6, "port": host_service.port},
    ]
    attempts += [{"op": "connect", "host": a, "port": host_service.port}
                 for a in _host_addresses() if a not in {lab.peer_host4, lab.peer_host6}]
    before = lab.net.stats()["shop"]["refused"]
    results = lab.probe(instance.netns, attempts)
    _assert_refused(results, "unlisted peer")
    # DNS goes only to the host's resolvers: a DNS query to another server gets nowhere.
    udp = lab.probe(instance.netns, [{"op": "udp", "host": lab.peer_other4, "port": 53},
                                     {"op": "udp", "host": lab.peer_db4, "port": 5433}])
    assert all(not r["result"].startswith("ok") for r in udp), udp
    after = lab.net.stats()["shop"]["refused"]
    assert after - before >= len(attempts) + 2, (before, after)
    # The control: the host service itself is up and reachable from the host.
    assert host_connect("127.0.0.1", host_service.port) == f"ok:host:{host_service.port}"


@pytest.mark.root
def test_raw_and_packet_sockets_and_ping_fail(lab: Lab) -> None:
    """Escape 7: raw/packet sockets are EPERM for the app uid; ICMP echo sockets are denied,
    and even root inside the namespace gets no echo reply from an unlisted peer."""
    import errno

    instance = _shop(lab, free_port("::"))
    results = lab.probe(instance.netns, [
        {"op": "socket", "family": "inet", "type": "raw", "proto": socket.IPPROTO_ICMP},
        {"op": "socket", "family": "inet6", "type": "raw", "proto": socket.IPPROTO_ICMPV6},
        {"op": "socket", "family": "packet", "type": "raw", "proto": 0x0300},
        {"op": "socket", "family": "inet", "type": "dgram", "proto": socket.IPPROTO_ICMP},
        {"op": "socket", "family": "inet6", "type": "dgram", "proto": socket.IPPROTO_ICMPV6},
    ])
    assert [r["result"] for r in results[:3]] == ["EPERM"] * 3, results
    assert [r["result"] for r in results[3:]] == ["EACCES"] * 2, results
    # Root in the netns (stronger than the app) pings the unlisted peer: no echo reply.
    code = (
        "import socket,struct,select,sys\n"
        "s=socket.socket(socket.AF_INET,socket.SOCK_RAW,socket.IPPROTO_ICMP)\n"
        "def ck(b):\n s=sum(struct.unpack('!%dH'%(len(b)//2),b)); s=(s>>16)+(s&0xffff)\n"
        " return ~(s+(s>>16))&0xffff\n"
        "h=struct.pack('!BBHHH',8,0,0,7,1)+b'corral!!'\n"
        "p=struct.pack('!BBHHH',8,0,ck(h),7,1)+b'corral!!'\n"
        f"s.sendto(p,('{lab.peer_other4}',0))\n"
        "r,_,_=select.select([s],[],[],1.5)\n"
        "print('none' if not r else 'type=%d code=%d'%tuple(s.recv(100)[20:22]))\n"
    )
    import subprocess

    done = subprocess.run(["ip", "netns", "exec", instance.netns, "/usr/bin/python3", "-c", code],
                          capture_output=True, text=True, timeout=10, check=True)
    answer = done.stdout.strip()
    assert answer in {"none", "type=3 code=13"}, f"ping got {answer!r}, not admin-prohibited"
    assert errno.EPERM  # the errno names above are errno.errorcode names


@pytest.mark.root
def test_only_granted_ports_reach_the_app(lab: Lab) -> None:
    """Escape 5: an app listening on ungranted ports (TCP, UDP, v4, v6) is not reachable
    from the host, from another app, or from another host; the granted port is."""
    granted, ungranted = free_port("::"), free_port("::")
    instance = _shop(lab, granted)
    lab.serve_in(instance.netns, [granted, ungranted], [granted, ungranted], "shop")
    inst4, inst6 = str(instance.addresses.instance4), str(instance.addresses.instance6)
    # From the host.
    assert host_connect(inst4, granted) == f"ok:shop:{granted}"
    assert host_connect(inst6, granted) == f"ok:shop:{granted}"
    assert host_connect(inst4, ungranted) == "ECONNREFUSED"
    assert host_connect(inst6, ungranted) == "ECONNREFUSED"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(1)
        s.connect((inst4, ungranted))
        with pytest.raises(OSError):  # EPERM on send: the output hook rejects it locally
            s.send(b"x")
            s.recv(100)
    # From another app that even lists the instance's addresses on every port.
    lab.net.set_app(policy_from_manifest("other", {"network": {
        "egress": [f"{inst4}/32", f"{inst6}/128"]}}))
    other = lab.net.prepare_instance("other", "other.web.0")
    results = lab.probe(other.netns, [
        {"op": "connect", "host": inst4, "port": granted},
        {"op": "connect", "host": inst4, "port": ungranted},
        {"op": "connect", "host": inst6, "port": ungranted},
        {"op": "udp", "host": inst4, "port": ungranted},
        {"op": "udp", "host": inst4, "port": granted},
    ])
    assert results[0]["result"] == f"ok:shop:{granted}"
    _assert_refused(results[1:3], "ungranted port from another app")
    assert not results[3]["result"].startswith("ok"), results[3]
    assert results[4]["result"] == f"ok:shop:{granted}", results[4]
    # From another host (the peer netns routes to the pool via the host).
    from_peer = lab.probe(lab.peer_ns, [
        {"op": "connect", "host": inst4, "port": ungranted},
        {"op": "connect", "host": inst6, "port": ungranted},
        {"op": "connect", "host": lab.peer_host4, "port": granted},  # the DNAT'd host port
        {"op": "connect", "host": lab.peer_host6, "port": granted},
        {"op": "connect", "host": lab.peer_host4, "port": ungranted},
    ], uid=None)
    _assert_refused(from_peer[:2], "ungranted port from another host")
    assert [r["result"] for r in from_peer[2:4]] == [f"ok:shop:{granted}"] * 2, from_peer
    assert from_peer[4]["result"] == "ECONNREFUSED"
    assert lab.net.stats()["shop"]["refused_in"] >= 6


@pytest.mark.root
def test_two_copies_with_offset_each_on_own_host_port(lab: Lab) -> None:
    """Two copies of one app (--offset 100) side by side, each reached on its own host port,
    also through 127.0.0.1 from the host itself."""
    base = free_port("::")
    while not 1 <= base + 100 <= 65535:
        base = free_port("::")
    copies = {"twin": base, "twin-b": base + 100}
    for name, port in copies.items():
        lab.net.set_app(policy_from_manifest(name, {"ports": {"http": port}}))
        instance = lab.net.prepare_instance(name, f"{name}.web.0", port=port)
        lab.serve_in(instance.netns, [port], [], name)
    for name, port in copies.items():
        for address in ("127.0.0.1", lab.peer_host4, lab.peer_host6):
            assert host_connect(address, port) == f"ok:{name}:{port}", (name, address)


@pytest.mark.root
def test_host_port_spreads_over_instances(lab: Lab) -> None:
    port = free_port("::")
    lab.net.set_app(policy_from_manifest("pair", {"ports": {"http": port}}))
    for index in range(2):
        instance = lab.net.prepare_instance("pair", f"pair.web.{index}", port=port)
        lab.serve_in(instance.netns, [port], [], f"pair{index}")
    seen = {host_connect("127.0.0.1", port) for _ in range(6)}
    assert seen == {f"ok:pair0:{port}", f"ok:pair1:{port}"}


@pytest.mark.root
def test_bus_over_tcp_is_unreachable_from_the_app(lab: Lab, host_service: HostService) -> None:
    """Escape 15 (network half): a kernel bus endpoint on tcp:// is not reachable from an app.
    (ipc:// endpoints are guarded by directory mode and ZAP uid checks, tested by the kernel.)"""
    instance = _shop(lab, free_port("::"))
    results = lab.probe(instance.netns, [
        {"op": "connect", "host": str(instance.addresses.gateway4), "port": host_service.port},
        {"op": "connect", "host": "127.0.0.1", "port": host_service.port},
    ])
    _assert_refused(results, "bus endpoint")
    time.sleep(0)


@pytest.mark.root
def test_listed_peer_is_refused_through_an_unlisted_interface(lab: Lab) -> None:
    """[network].interfaces: a peer on the egress list is still refused when the only route
    to it leaves through an interface the manifest does not list."""
    port = free_port("::")
    policy = policy_from_manifest("shop", {
        "ports": {"http": port},
        "network": {"egress": [f"{lab.peer_db4}/32:5432"], "interfaces": ["lo"]}})
    lab.net.set_app(policy)
    instance = lab.net.prepare_instance("shop", "shop.web.0", port=port)
    results = lab.probe(instance.netns, [{"op": "connect", "host": lab.peer_db4, "port": 5432}])
    _assert_refused(results, "listed peer via an unlisted interface")
