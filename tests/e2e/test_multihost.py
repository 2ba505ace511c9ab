"""Three hosts on one machine (tests/multihost.py), for real: an etcd member in each host's
network namespace, the cluster formed across the bridge; one live host per ledger; a host
killed -9 is lost after its TTL and another host's kernel takes over; a partitioned member
leaves a quorum of two that still commits; with the quorum lost a claim is refused with the
ledger's clear error; healed, claims work again."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from corral.errors import CorralError, ErrorCode
from corral.testing import wait_for
from multihost import MARKER, Cluster, Host, multihost, require_multihost

pytestmark = pytest.mark.root

OWNER = "test:multihost"
KIND = "mh-probe"
def hosts(h: Host) -> dict[str, dict[str, Any]]:
    """``corral hosts --json`` run inside ``h``, by host name."""
    r = h.cli("hosts", "--json")
    assert r.returncode == 0, r.stderr
    return {row["name"]: row for row in json.loads(r.stdout)}


def probes(h: Host) -> set[str]:
    """The probe keys in the ledger, as ``corral ledger --json`` inside ``h`` lists them."""
    r = h.cli("ledger", "--kind", KIND, "--json")
    assert r.returncode == 0, r.stderr
    return {rec["key"] for rec in json.loads(r.stdout)["records"]}


def claim(h: Host, key: str) -> int:
    """Claim a probe key through ``h``'s kernel (a ledger write); its revision."""
    res = h.call("ledger.claim", {"owner": OWNER, "claims": [
        {"kind": KIND, "key": key, "value": {"via": h.name}}]}, timeout=45)
    return int(res["revision"])


def alive_in_etcd(observer: Host, name: str) -> bool:
    """Whether host ``name``'s lease-bound record is in etcd (read with etcdctl from inside
    ``observer``)."""
    r = observer.etcdctl("get", f"/corral/v1/r/host-alive/{name}", "-w", "json")
    assert r.returncode == 0, r.stderr
    return int(json.loads(r.stdout).get("count", 0)) > 0


def starts(h: Host, extra_toml: str = "") -> bool:
    try:
        h.start_kernel(extra_toml, timeout=15)
    except RuntimeError:
        return False
    return True


def check_hosts_apart(c: Cluster) -> None:
    """Each host has its own /run, hostname and address; the root namespace sees none."""
    assert not Path("/run", MARKER).exists()
    for h in c.hosts:
        assert h.run("cat", f"/run/{MARKER}").stdout == h.name
        assert h.run("hostname").stdout.strip() == h.name
        addr = h.run("ip", "-4", "-o", "addr", "show", "dev", "eth0").stdout
        assert f"inet {h.address}/24" in addr, addr


def check_etcd_across_hosts(c: Cluster) -> None:
    """The three members, each in its own netns, are one healthy cluster."""
    h1, h2 = c.host(1), c.host(2)
    r = h1.etcdctl("endpoint", "health", "--cluster")
    assert r.returncode == 0, r.stdout + r.stderr
    for h in c.hosts:
        assert f"{h.client_url} is healthy" in r.stdout + r.stderr, r.stdout + r.stderr
    r = h2.etcdctl("member", "list", "-w", "json")
    assert r.returncode == 0, r.stderr
    members = json.loads(r.stdout)["members"]
    assert sorted(m["name"] for m in members) == ["h1", "h2", "h3"], members
    assert sorted(u for m in members for u in m["peerURLs"]) == sorted(
        h.peer_url for h in c.hosts), members


def test_three_hosts_takeover_partition_and_quorum() -> None:
    """The harness end to end; prints the timings it observes."""
    require_multihost()
    timings: dict[str, float] = {}

    def note(what: str, since: float) -> None:
        timings[what] = time.monotonic() - since
        print(f"{what}: {timings[what]:.2f} s", flush=True)

    began = time.monotonic()
    with multihost(3) as c:
        note("build (3 netns, 3 etcd members healthy)", began)
        h1, h2, h3 = c.host(1), c.host(2), c.host(3)
        check_hosts_apart(c)
        check_etcd_across_hosts(c)

        # -- h1's kernel registers ---------------------------------------------------------
        t = time.monotonic()
        h1.start_kernel()
        note("h1 kernel start", t)
        seen = hosts(h1)
        assert set(seen) == {"h1"}, seen
        assert seen["h1"]["state"] == "ready" and seen["h1"]["address"] == h1.address, seen

        # -- one live host per ledger: h2 is refused, naming h1 -----------------------------
        t = time.monotonic()
        with pytest.raises(RuntimeError, match=r"in use by host 'h1'"):
            h2.start_kernel(timeout=15)
        note("h2 refused while h1 is alive", t)

        # -- h1 crashes: lost after its TTL, h2 takes over ----------------------------------
        h1.kill9()
        killed = time.monotonic()
        assert h1.kernel.proc is not None and h1.kernel.proc.poll() is not None
        assert alive_in_etcd(h3, "h1")  # the lease outlives the kernel until its TTL
        wait_for(lambda: not alive_in_etcd(h3, "h1"), timeout=c.ttl_s + 10, step=0.1,
                 what="h1's lease expiring in etcd")
        note("h1 lease gone after kill -9", killed)
        wait_for(lambda: starts(h2), timeout=20, step=0.1,
                 what="h2's kernel starting")
        note("h2 kernel serving after kill -9 of h1", killed)
        assert timings["h2 kernel serving after kill -9 of h1"] <= c.ttl_s + 10, timings
        seen = hosts(h2)
        assert seen["h1"]["state"] == "lost" and seen["h2"]["state"] == "ready", seen
        assert seen["h2"]["address"] == h2.address, seen
        assert "h2 (this host)" in h2.cli("hosts").stdout

        # -- h3 partitioned: two members of three keep the quorum --------------------------
        t = time.monotonic()
        h3.cut()
        assert not h3.member_healthy()
        assert h2.etcdctl("endpoint", "health", endpoints=[h3],
                          command_timeout=1).returncode != 0
        note("h3 cut off (seen from the root namespace and from h2)", t)
        t = time.monotonic()
        claim(h2, "during-cut")
        note("claim with h3 cut off", t)
        assert "during-cut" in probes(h2)
        assert hosts(h2)["h2"]["state"] == "ready"

        # -- h1's member stopped too: no quorum, a claim is refused clearly -----------------
        h1.stop_member()
        t = time.monotonic()
        with pytest.raises(CorralError) as err:
            claim(h2, "without-quorum")
        note("claim refused without quorum", t)
        text = err.value.reason
        print(f"without quorum: {text}")
        assert err.value.code == ErrorCode.UNAVAILABLE, text
        assert "the etcd ledger is unavailable" in text, text
        for h in c.hosts:  # each member's failure is named
            assert h.address in text, text
        # an app operation (down, deploy, scale...) is refused up front, within the probe's
        # 3 s, instead of holding the kernel for the ledger's timeout at each of its steps
        t = time.monotonic()
        with pytest.raises(CorralError) as err:
            h2.call("app.down", {"name": "ghost"}, timeout=45)
        took = time.monotonic() - t
        note("app.down refused without quorum", t)
        assert err.value.code == ErrorCode.UNAVAILABLE, err.value.reason
        assert err.value.reason.startswith("app.down refused: the ledger is unavailable"), \
            err.value.reason
        assert took < 8, took

        # -- healed: claims work again -------------------------------------------------------
        h3.heal()
        h1.start_member()
        t = time.monotonic()
        c.wait_healthy()
        note("members healthy after heal", t)

        def claims_again() -> bool:
            try:
                claim(h2, "after-heal")
            except CorralError:
                return False
            return True

        wait_for(claims_again, timeout=30, step=0.2, what="a claim after the heal")
        note("claims again after heal", t)
        keys = probes(h2)
        assert {"during-cut", "after-heal"} <= keys, keys
        if "nothing was written" in text:
            assert "without-quorum" not in keys, keys
        r = h3.etcdctl("endpoint", "health", "--cluster")
        assert r.returncode == 0, r.stdout + r.stderr
        t = time.monotonic()
        wait_for(lambda: hosts(h2)["h2"]["state"] == "ready", timeout=c.ttl_s + 5,
                 what="h2 ready after the heal")
        note("h2 ready after the heal", t)
        torn = time.monotonic()
    note("teardown", torn)
    note("total", began)
    print(f"host ttl_s = {c.ttl_s}; detection (lease gone after kill -9) = "
          f"{timings['h1 lease gone after kill -9']:.2f} s")


def test_kernel_answers_while_a_claim_waits_for_a_lost_quorum() -> None:
    """With the default heartbeat (1 s), a claim that waits for a lost quorum must not stop
    the kernel: ``kernel.status`` still answers, and the claim ends with the ledger's error."""
    require_multihost()
    with multihost(3) as c:
        h1 = c.host(1)
        h1.start_kernel()
        c.host(2).stop_member()
        c.host(3).stop_member()
        outcome: dict[str, BaseException | int] = {}

        def claim_in_thread() -> None:
            try:
                outcome["claim"] = claim(h1, "without-quorum")
            except BaseException as exc:
                outcome["claim"] = exc

        worker = threading.Thread(target=claim_in_thread)
        worker.start()
        try:
            time.sleep(1.0)  # the claim is waiting for etcd now
            t = time.monotonic()
            try:
                h1.call("kernel.status", timeout=3.0)
                status: str = "answered"
            except CorralError as exc:
                status = f"no answer: {exc}"
            print(f"kernel.status during the claim: {status} "
                  f"({time.monotonic() - t:.2f} s)")
        finally:
            worker.join(60)
        print(f"the claim: {outcome.get('claim')!r}")
        assert status == "answered", status
        result = outcome.get("claim")
        assert isinstance(result, CorralError), result
        assert "the etcd ledger is unavailable" in result.reason, result.reason
