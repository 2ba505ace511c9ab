"""Teardown is exact, re-apply has no gap and keeps counters, a restarted driver adopts."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from typing import Any

import pytest
from netlab import Lab, host_connect

from corral.testing import free_port
from corral_net.config import instance_names
from corral_net.host import HostNetwork
from corral_net.model import policy_from_manifest


def _json(*argv: str) -> Any:
    return json.loads(subprocess.run(argv, capture_output=True, text=True, check=True).stdout)


def host_snapshot() -> dict[str, Any]:
    """The host's ruleset, links, addresses, routes and namespaces, minus volatile fields."""
    ruleset = _json("nft", "-j", "list", "ruleset")["nftables"]
    for obj in ruleset:
        for body in obj.values():
            if isinstance(body, dict):
                body.pop("handle", None)
    links = sorted((link["ifname"], link.get("operstate"), link.get("mtu"))
                   for link in _json("ip", "-j", "link"))
    addrs = sorted((link["ifname"], a["local"], a["prefixlen"])
                   for link in _json("ip", "-j", "addr") for a in link.get("addr_info", []))
    routes = sorted(json.dumps(r, sort_keys=True) for family in ("-4", "-6")
                    for r in _json("ip", family, "-j", "route", "show", "table", "all"))
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {"ruleset": ruleset, "links": links, "addrs": addrs, "routes": routes,
            "netns": sorted(netns.split("\n"))}


@pytest.mark.root
def test_teardown_leaves_the_host_as_it_was(lab: Lab) -> None:
    before = host_snapshot()
    port = free_port("::")
    lab.net.set_app(policy_from_manifest("gone", {
        "ports": {"http": port},
        "network": {"egress": [f"{lab.peer_db4}:5432", "db.test:5432"],
                    "interfaces": [lab.peer_link]}}))
    first = lab.net.prepare_instance("gone", "gone.web.0", port=port)
    lab.net.prepare_instance("gone", "gone.web.1", port=port)
    lab.net.set_app(policy_from_manifest("also", {"ports": {"http": free_port("::")}}))
    lab.net.prepare_instance("also", "also.web.0")
    during = host_snapshot()
    assert during != before
    assert any(first.netns in line for line in during["netns"])
    # instance.stopped: its rules go at once, its namespace and links right after
    assert lab.net.stop_instance("gone.web.0") == first
    assert any(first.netns in line for line in host_snapshot()["netns"])
    lab.net.remove_network("gone.web.0")
    lab.net.remove_app("gone")  # app.detach
    lab.net.remove_app("also")
    assert host_snapshot() == before
    # Idempotent: a second teardown is harmless.
    assert lab.net.stop_instance("gone.web.0") is None
    lab.net.remove_network("gone.web.0")
    lab.net.remove_app("gone")
    assert host_snapshot() == before


@pytest.mark.root
def test_reapply_has_no_gap_and_keeps_counters(lab: Lab) -> None:
    """state.sync rebuilds the tables in one transaction while traffic flows; an open
    connection survives, no connect attempt in a tight loop fails, counters carry over."""
    port = free_port("::")
    manifest = {"ports": {"http": port},
                "network": {"egress": [f"{lab.peer_db4}:5432"], "interfaces": [lab.peer_link]}}
    policy = policy_from_manifest("steady", manifest)
    lab.net.set_app(policy)
    instance = lab.net.prepare_instance("steady", "steady.web.0", port=port)
    lab.serve_in(instance.netns, [port], [], "steady")
    lab.probe(instance.netns, [{"op": "connect", "host": lab.peer_other4, "port": 5432}] * 3)
    refused = lab.net.stats()["steady"]["refused"]
    assert refused >= 3
    held = socket.create_connection((str(instance.addresses.instance4), port), timeout=3)
    failures: list[str] = []
    stop = time.monotonic() + 1.5
    import threading

    def hammer() -> None:
        while time.monotonic() < stop:
            got = host_connect("127.0.0.1", port, timeout=2)
            if got != f"ok:steady:{port}":
                failures.append(got)

    worker = threading.Thread(target=hammer)
    worker.start()
    syncs = 0
    while time.monotonic() < stop:
        lab.net.sync([policy], [{"id": "steady.web.0", "app": "steady", "port": port}])
        syncs += 1
    worker.join()
    assert syncs > 5 and failures == [], (syncs, failures[:5])
    assert held.recv(100) == f"steady:{port}\n".encode()
    held.close()
    assert lab.net.stats()["steady"]["refused"] >= refused

    # A restarted driver (a fresh HostNetwork) adopts the running instance from the host.
    reborn = HostNetwork(lab.config)
    report = reborn.sync([policy], [{"id": "steady.web.0", "app": "steady", "port": port}])
    lab.net = reborn  # the lab's teardown now goes through the adopting instance
    assert report["adopted"] == ["steady.web.0"] and report["missing"] == []
    assert reborn.state.instances["steady.web.0"].addresses == instance.addresses
    assert host_connect("127.0.0.1", port) == f"ok:steady:{port}"
    assert reborn.stats()["steady"]["refused"] >= refused


@pytest.mark.root
def test_sync_collects_what_nobody_wants(lab: Lab) -> None:
    keep = policy_from_manifest("keep", {})
    lab.net.set_app(keep)
    lab.net.set_app(policy_from_manifest("drop", {}))
    lab.net.prepare_instance("keep", "keep.web.0")
    dropped = lab.net.prepare_instance("drop", "drop.web.0")
    report = lab.net.sync([keep], [{"id": "keep.web.0", "app": "keep"}])
    assert "drop.web.0" in report["removed"]
    assert lab.net.netlink.namespaces(lab.config.netns_prefix) == [
        lab.net.state.instances["keep.web.0"].netns]
    assert dropped.link not in lab.net.netlink.links(lab.config.link_prefix)


@pytest.mark.root
def test_links_made_ahead_of_the_address_are_kept_then_addressed(lab: Lab) -> None:
    """The namespace and pair ``make_links`` makes while the driver claims the address are
    not a crash's leftovers to a ``sync`` meanwhile; ``prepare_instance`` addresses and
    routes them; ``drop_links`` removes those of an instance that was never prepared."""
    lab.net.set_app(policy_from_manifest("ahead", {}))
    ns_name, link = instance_names(lab.config, "ahead.web.0")
    assert lab.net.make_links("ahead.web.0")
    assert not lab.net.make_links("ahead.web.0")  # made already
    report = lab.net.sync([policy_from_manifest("ahead", {})], [])
    assert ns_name not in report["removed"]
    assert lab.net.netlink.namespaces(lab.config.netns_prefix) == [ns_name]
    assert link in lab.net.netlink.links(lab.config.link_prefix)
    instance = lab.net.prepare_instance("ahead", "ahead.web.0")
    assert (instance.netns, instance.link) == (ns_name, link)
    inside = subprocess.run(["ip", "-n", ns_name, "-j", "route", "show", "default"],
                            capture_output=True, text=True, check=True).stdout
    assert str(instance.addresses.gateway4) in inside
    assert {str(instance.addresses.gateway4), str(instance.addresses.gateway6)} <= set(
        lab.net.netlink.links(lab.config.link_prefix)[link])
    lab.net.drop_links("ahead.web.0")  # prepared: not the driver's to drop any more
    assert ns_name in lab.net.netlink.namespaces(lab.config.netns_prefix)

    assert lab.net.make_links("never.web.0")
    never_ns, never_link = instance_names(lab.config, "never.web.0")
    lab.net.drop_links("never.web.0")
    assert never_ns not in lab.net.netlink.namespaces(lab.config.netns_prefix)
    assert never_link not in lab.net.netlink.links(lab.config.link_prefix)


@pytest.mark.root
def test_egress_names_follow_dns_on_ttl(lab: Lab) -> None:
    lab.net.set_app(policy_from_manifest("follow", {"network": {
        "egress": ["db.test:5432"], "interfaces": [lab.peer_link]}}))
    instance = lab.net.prepare_instance("follow", "follow.web.0")
    probe = [{"op": "connect", "host": lab.peer_db4, "port": 5432},
             {"op": "connect", "host": lab.peer_new4, "port": 5432}]
    first = [r["result"] for r in lab.probe(instance.netns, probe)]
    assert first == ["ok:peer:5432", "ECONNREFUSED"]
    lab.set_zone({"db.test": {"ttl": 1, "addrs": [lab.peer_new4]}})
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        time.sleep(min(lab.net.refresh_names(), 0.5))
        if lab.net.state.resolved.get("db.test", ()) and \
                str(lab.net.state.resolved["db.test"][0].network_address) == lab.peer_new4:
            break
    second = [r["result"] for r in lab.probe(instance.netns, probe)]
    assert second == ["ECONNREFUSED", "ok:peer:5432"]
