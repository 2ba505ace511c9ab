"""Instance subnets on three hosts (tests/multihost.py), all drivers, confined: each host's
net driver claims its own slice of the pool in etcd (kind ``subnet``), hands out its
instances' addresses from it, routes to the other hosts' slices and lets those hosts (and
only them, from outside) reach its instances' granted ports. Strict reverse-path filtering
on every host changes nothing of it."""

from __future__ import annotations

import base64
import ipaddress
import json
from pathlib import Path
from typing import Any

import pytest

from corral.errors import CorralError
from corral.testing import drivers_running, wait_for
from multihost import DRIVERS, Cluster, Host, env_echo_toml, multihost, require_multihost

pytestmark = pytest.mark.root

PORT = 8080
SUBNETS = "/corral/v1/r/subnet/"


def app_dir(c: Cluster, name: str, frontend: int) -> Path:
    """The env-echo app ``name`` in a directory under the cluster's base."""
    return c.env_echo_app(name, env_echo_toml(name, port=PORT, frontend=frontend))


def start(h: Host) -> None:
    """Start ``h``'s kernel with every driver (confined); wait until they all run."""
    h.start_kernel(keyed=True, drivers=DRIVERS)
    wait_for(lambda: drivers_running(h.kernel, DRIVERS), timeout=30,
             what=f"{h.name}'s drivers running")


def deploy(h: Host, c: Cluster, name: str, frontend: int) -> str:
    """Deploy ``name`` on ``h`` (it answers "<name> -"); its one instance's address. A
    deploy refused because a driver was reconnecting at that moment is tried again."""
    r = h.cli("config", "set", name, f"APP={name}")
    assert r.returncode == 0, r.stdout + r.stderr
    d = app_dir(c, name, frontend)
    for _attempt in range(3):
        wait_for(lambda: drivers_running(h.kernel, DRIVERS), timeout=30,
                 what=f"{h.name}'s drivers running")
        r = h.cli("up", str(d), timeout=120)
        if r.returncode == 0 or "is not connected" not in r.stderr:
            break
    assert r.returncode == 0, r.stdout + r.stderr + h.kernel.log()
    (address,) = addresses(h, name)
    assert address in h.cli("ps").stdout
    return address


def addresses(h: Host, app: str) -> list[str]:
    """The addresses of ``app``'s instances on ``h`` (none while its kernel does not know
    it)."""
    try:
        return [str(i["address"]) for i in h.call("app.get", {"name": app})["instances"]]
    except CorralError:
        return []


def subnets(h: Host) -> dict[str, dict[str, Any]]:
    """The ``subnet`` records in etcd (read inside ``h``): CIDR -> record as stored."""
    r = h.etcdctl("get", "--prefix", SUBNETS, "-w", "json")
    assert r.returncode == 0, r.stderr
    return {base64.b64decode(kv["key"]).decode()[len(SUBNETS):]:
            json.loads(base64.b64decode(kv["value"]))
            for kv in json.loads(r.stdout).get("kvs", [])}


def by_host(records: dict[str, dict[str, Any]]) -> dict[str, str]:
    """host name -> its subnet, from the records (the owner says whose: driver:net@<host>)."""
    out: dict[str, str] = {}
    for cidr, rec in records.items():
        host = str(rec["owner"]).removeprefix("driver:net@")
        assert host not in out, records  # one subnet per host
        out[host] = cidr
    return out


def curl(h: Host, address: str, port: int = PORT, *, source: str | None = None,
         ) -> tuple[int, str]:
    """GET http://address:port/ from ``h``'s root namespace (from ``source`` if given):
    (curl's exit status, its body or its error). 7 is "connection refused"."""
    argv = ["curl", "-sS", "--noproxy", "*", "--max-time", "3"]
    if source is not None:
        argv += ["--interface", source]
    r = h.run(*argv, f"http://{address}:{port}/", timeout=10)
    return r.returncode, r.stdout or r.stderr


def counter(h: Host, name: str) -> int:
    """Packets of the named counter in ``h``'s ``inet corral`` table."""
    r = h.run("nft", "-j", "list", "counter", "inet", "corral", name)
    assert r.returncode == 0, r.stderr
    (found,) = [o["counter"] for o in json.loads(r.stdout)["nftables"] if "counter" in o]
    return int(found["packets"])


def routes(h: Host) -> set[str]:
    """``h``'s IPv4 routes made by corral (protocol 231), as ``dst via gateway``."""
    r = h.run("ip", "-4", "-j", "route", "show", "proto", "231")
    assert r.returncode == 0, r.stderr
    return {f"{x['dst']} via {x['gateway']}" for x in json.loads(r.stdout or "[]")}


@pytest.mark.timeout(300)
def test_each_host_holds_a_subnet_routed_from_the_others_and_kept_across_a_restart() -> None:
    """a on h1 and b on h2 get addresses in their hosts' own subnets (one record per host in
    etcd); h3's root namespace reaches both on their addresses, h1 reaches b; the hosts
    route to each other's subnets; a sender on h3 that is no host's address, an instance on
    h2 (no egress grant) and an ungranted port are refused; h1's kernel restarted keeps
    h1's subnet, a's address and the route to it."""
    require_multihost()
    # A lease that outlasts h1's restart on a busy machine: h1 is never lost (its apps
    # re-placed) meanwhile.
    with multihost(3, ttl_s=10) as c:
        hosts = [c.host(i) for i in (1, 2, 3)]
        h1, h2, h3 = hosts
        for h in hosts:  # strict reverse-path filtering everywhere: routes are symmetric
            for conf in ("all", "default", "eth0"):
                r = h.run("sysctl", "-qw", f"net.ipv4.conf.{conf}.rp_filter=1")
                assert r.returncode == 0, r.stderr
        for h in hosts:
            start(h)
        a = deploy(h1, c, "a", 8081)
        b = deploy(h2, c, "b", 8082)

        held = by_host(wait_for(lambda: len(subnets(h1)) == 3 and subnets(h1), timeout=20,
                                what="a subnet record per host"))
        assert sorted(held) == ["h1", "h2", "h3"], held
        nets = {h: ipaddress.ip_network(cidr) for h, cidr in held.items()}
        assert all(n.prefixlen == 22 and n.subnet_of(ipaddress.ip_network("10.231.0.0/16"))
                   for n in nets.values()), nets
        assert len(set(nets.values())) == 3
        assert not any(x.overlaps(y) for x in nets.values() for y in nets.values() if x != y)
        assert ipaddress.ip_address(a) in nets["h1"], (a, nets)
        assert ipaddress.ip_address(b) in nets["h2"], (b, nets)
        records = subnets(h1)
        for h in hosts:
            value = records[held[h.name]]["value"]
            assert (value["host"], value["address"]) == (h.name, h.address), records

        for h in hosts:
            want = {f"{held[o.name]} via {o.address}" for o in hosts if o is not h}
            wait_for(lambda h=h, want=want: routes(h) == want, timeout=10,  # type: ignore[misc]
                     what=f"{h.name}'s routes to the other hosts' subnets")
        wait_for(lambda: curl(h3, a) == (0, "a -\n"), timeout=15, what="a from h3")
        wait_for(lambda: curl(h3, b) == (0, "b -\n"), timeout=15, what="b from h3")
        wait_for(lambda: curl(h1, b) == (0, "b -\n"), timeout=15, what="b from h1")

        # Only the hosts: the same h3 from an address no host holds is refused by h1.
        stranger = str(c.network.network_address + 77)
        r = h3.run("ip", "addr", "add", f"{stranger}/{c.network.prefixlen}", "dev", "eth0")
        assert r.returncode == 0, r.stderr
        refused = counter(h1, "refused_outside")
        status, said = curl(h3, a, source=stranger)
        assert status == 7, (status, said)  # refused at once (a reset), not a time-out
        assert counter(h1, "refused_outside") > refused
        assert curl(h3, a, source=h3.address) == (0, "a -\n")
        # Only the granted port, as for h1 itself.
        refused = counter(h1, "refused_in_a")
        assert curl(h3, a, 9999)[0] == 7
        assert counter(h1, "refused_in_a") > refused
        # An instance reaches another host's instance only as its egress says (b's: nothing).
        ns = [n for n in h2.run("ls", "/run/netns").stdout.split() if n.startswith("corral-b.")]
        assert len(ns) == 1, ns
        r = h2.run("ip", "netns", "exec", ns[0], "curl", "-sS", "--noproxy", "*",
                   "--max-time", "3", f"http://{a}:{PORT}/")
        assert r.returncode == 7, (r.returncode, r.stdout, r.stderr)
        assert counter(h2, "refused_b") > 0

        h1.stop_kernel()
        assert routes(h1) == {f"{held[o.name]} via {o.address}" for o in (h2, h3)}
        assert curl(h3, a) == (0, "a -\n")  # the app, its rules and the routes stay
        start(h1)
        wait_for(lambda: addresses(h1, "a") == [a], timeout=20,
                 what="a adopted by h1's new kernel, on its address")
        assert by_host(subnets(h2)) == held
        wait_for(lambda: h2.address in h1.run("nft", "list", "chain", "inet", "corral",
                                              "outside").stdout, timeout=10,
                 what="h1's rebuilt rules let h2 in")
        assert curl(h3, a) == (0, "a -\n")
        assert curl(h2, a) == (0, "a -\n")
        status, said = curl(h3, a, source=stranger)
        assert status == 7, (status, said)
