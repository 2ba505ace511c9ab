"""Three hosts on one machine (tests/multihost.py), for real: an etcd member in each host's
network namespace, the cluster formed across the bridge; several live hosts on one ledger,
each running its own apps, app names unique in the cluster and host ports per host; a host
killed -9 is lost after its TTL while the others stay ready, and its kernel started again
takes its place; a partitioned member leaves a quorum of two that still commits; with the
quorum lost a claim and a deploy are refused with the ledger's clear error, nothing of them
claimed, while a running app serves on; healed, claims work again."""

from __future__ import annotations

import base64
import json
import threading
import time
import urllib.request
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


APP_TOML = """[app]
name = "{name}"

[processes]
web = {{ command = "python3 -m http.server {port} --bind 0.0.0.0", instances = 1, port = "http" }}

[ports]
http = {port}
"""


def app_dir(c: Cluster, directory: str, name: str, port: int = 8080) -> Path:
    """An app that serves its own name (a static file) on ``port``, under the cluster's
    directory (/tmp: every host sees it)."""
    d = c.base / directory
    d.mkdir(mode=0o755)
    d.chmod(0o755)
    (d / "corral.toml").write_text(APP_TOML.format(name=name, port=port))
    (d / "index.html").write_text(f"{directory}\n")
    for f in d.iterdir():
        f.chmod(0o644)
    return d


def fetch(h: Host, port: int = 8080) -> str | None:
    """GET / on ``h``'s address (through the bridge, no proxy); the body, or None."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://{h.address}:{port}/index.html", timeout=2) as r:
            return str(r.read().decode())
    except OSError:
        return None


def apps(h: Host) -> set[tuple[str, str]]:
    """(app, host) of every app ``corral ps --json`` lists inside ``h`` (every host's)."""
    r = h.cli("ps", "--json")
    assert r.returncode == 0, r.stderr
    return {(row["app"], row["host"]) for row in json.loads(r.stdout)}


def pid_of(h: Host, app: str) -> int:
    """The pid of ``app``'s one instance, as ``corral ps`` inside ``h`` reports it."""
    r = h.cli("ps", "--json")
    assert r.returncode == 0, r.stderr
    rows = [row for row in json.loads(r.stdout) if row["app"] == app]
    assert len(rows) == 1 and len(rows[0]["instances"]) == 1, rows
    return int(rows[0]["instances"][0]["pid"])


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

        # -- h1's and h2's kernels register: two live hosts on one ledger ------------------
        t = time.monotonic()
        h1.start_kernel()
        note("h1 kernel start", t)
        seen = hosts(h1)
        assert set(seen) == {"h1"}, seen
        assert seen["h1"]["state"] == "ready" and seen["h1"]["address"] == h1.address, seen
        h2.start_kernel()
        seen = hosts(h1)
        assert {n: r["state"] for n, r in seen.items()} == {"h1": "ready", "h2": "ready"}, seen

        # -- h1 crashes: lost after its TTL, h2 stays ready; h1 comes back -----------------
        h1.kill9()
        killed = time.monotonic()
        assert h1.kernel.proc is not None and h1.kernel.proc.poll() is not None
        assert alive_in_etcd(h3, "h1")  # the lease outlives the kernel until its TTL
        wait_for(lambda: not alive_in_etcd(h3, "h1"), timeout=c.ttl_s + 10, step=0.1,
                 what="h1's lease expiring in etcd")
        note("h1 lease gone after kill -9", killed)
        seen = hosts(h2)
        assert seen["h1"]["state"] == "lost" and seen["h2"]["state"] == "ready", seen
        assert seen["h2"]["address"] == h2.address, seen
        assert "h2 (this host)" in h2.cli("hosts").stdout
        # a kernel killed -9 leaves its lease until the TTL: started again at once under the
        # same name and address it takes the host's place without waiting for it
        h1.start_kernel()
        wait_for(lambda: hosts(h2)["h1"]["state"] == "ready", timeout=c.ttl_s + 5,
                 what="h1 ready again")
        # the same name from another address is another machine: refused, naming the holder
        h3.kernel.config.write_text(h3.host_toml().replace('name = "h3"', 'name = "h1"'))
        with pytest.raises(RuntimeError, match=r"host name 'h1' is in use by the kernel at "
                                               + h1.address.replace(".", r"\.")):
            h3.kernel.start(timeout=15)
        h1.stop_kernel()
        # an app on h2, to see it serve through the partition and the lost quorum
        r = h2.cli("up", str(app_dir(c, "blog", "blog")), timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        wait_for(lambda: fetch(h2) == "blog\n", timeout=20, what="blog serving on h2")

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
        # a deploy too, before anything is claimed; the running app serves on regardless
        r = h2.cli("up", str(app_dir(c, "news", "news", port=8081)), timeout=60)
        assert r.returncode != 0 and "the ledger is unavailable" in r.stderr, r.stderr
        assert fetch(h2) == "blog\n" and fetch(h2, 8081) is None

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
        # nothing of the refused deploy was claimed
        held = h2.etcdctl("get", "--prefix", "--keys-only", "/corral/v1/r/").stdout
        assert "news" not in held and "/corral/v1/r/app/blog" in held, held
        assert fetch(h2) == "blog\n"
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


def test_hosts_run_their_own_apps_with_names_unique_in_the_cluster() -> None:
    """Two live hosts on one etcd ledger, each running the apps deployed on it: each serves
    its own on the same host port (ports are per host), an app name held on h1 is refused on
    h2 naming h1 before anything is built, each host restores only its own apps and lists
    every host's, operations on h1's app asked on h2 run on h1 (releases, restart, down; not
    config set), once h1's app is down its name is free for h2, and once h2 is lost and
    forgotten (`corral hosts forget`) its names are free for h1. (A TTL of 8 s: the checks
    made while the killed h2's lease still runs take two CLI calls, over 3 s on a slow
    machine.)"""
    require_multihost()
    with multihost(3, ttl_s=8) as c:
        h1, h2 = c.host(1), c.host(2)
        h1.start_kernel()
        h2.start_kernel()
        shop, blog = app_dir(c, "shop", "shop"), app_dir(c, "blog", "blog")
        for h, d in ((h1, shop), (h2, blog)):
            r = h.cli("up", str(d), timeout=120)
            assert r.returncode == 0, r.stdout + r.stderr
        wait_for(lambda: fetch(h1) == "shop\n" and fetch(h2) == "blog\n", timeout=20,
                 what="shop on h1 and blog on h2 serving on port 8080")
        both = {("shop", "h1"), ("blog", "h2")}
        assert apps(h1) == both and apps(h2) == both  # every host lists every host's apps
        ports = h1.etcdctl("get", "--prefix", "--keys-only", "/corral/v1/r/port/").stdout
        assert sorted(ports.split()) == ["/corral/v1/r/port/@h1/8080",
                                         "/corral/v1/r/port/@h2/8080"], ports

        # an app name is the cluster's: refused on h2 at once, naming h1; nothing changed
        copy = app_dir(c, "shop-copy", "shop", port=8081)
        r = h2.cli("up", str(copy), timeout=120)
        assert r.returncode != 0, r.stdout
        assert "app 'shop' is deployed by another host: the name is held by app 'shop' on " \
               "host h1" in r.stderr, r.stderr
        held = h2.etcdctl("get", "--prefix", "/corral/v1/r/", "-w", "json").stdout
        owners = {json.loads(base64.b64decode(kv["value"]))["owner"]
                  for kv in json.loads(held)["kvs"]}
        assert "shop@h2" not in owners and "shop@h1" in owners, owners
        assert apps(h2) == both and fetch(h1) == "shop\n"

        # spreading an app needs the cluster key (the other hosts run it from copies)
        wide = app_dir(c, "wide", "wide", port=8082)
        with (wide / "corral.toml").open("a") as f:
            f.write("\n[placement]\nspread = 2\n")
        r = h2.cli("up", str(wide), timeout=120)
        assert r.returncode == 2, r.stdout + r.stderr
        assert "[placement] spread = 2 needs host h2's [host] cluster_key" in r.stderr, r.stderr
        assert "nothing was built or claimed" in r.stderr, r.stderr
        held = h2.etcdctl("get", "--prefix", "--keys-only", "/corral/v1/r/").stdout
        assert "wide" not in held, held

        # asked on h2 about h1's app: run on h1 and answered through the ledger
        r = h2.cli("releases", "shop", "--json")
        assert r.returncode == 0, r.stderr
        assert [rel["release"] for rel in json.loads(r.stdout)["releases"]] == [1], r.stdout
        before = pid_of(h1, "shop")
        r = h2.cli("restart", "shop", timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        assert pid_of(h2, "shop") != before and fetch(h1) == "shop\n"
        history = json.loads(h1.cli("releases", "shop", "--json").stdout)
        r = h2.cli("config", "set", "shop", "A=1")
        assert r.returncode != 0 and "runs on host h1" in r.stderr, r.stdout + r.stderr
        r = h2.cli("config", "shop", "--json")
        assert r.returncode == 0 and json.loads(r.stdout).get("vars", {}) == {}, r.stdout
        assert json.loads(h1.cli("releases", "shop", "--json").stdout) == history

        # each host counts its own instances
        def counts() -> dict[str, Any]:
            return {n: row.get("instances") for n, row in hosts(h2).items()}
        wait_for(lambda: counts() == {"h1": 1, "h2": 1}, timeout=10, what="instance counts")

        # a restarted kernel adopts its own apps, never another host's
        h1.stop_kernel()
        assert fetch(h1) == "shop\n"  # apps outlive their kernel
        h1.start_kernel()
        assert apps(h1) == both and apps(h2) == both
        r = h1.cli("ps")
        assert r.returncode == 0 and r.stdout.startswith("HOST"), r.stdout

        # down of h1's app, asked on h2, frees the name: h2 may deploy an app called shop now
        r = h2.cli("down", "shop")
        assert r.returncode == 0, r.stderr
        wait_for(lambda: fetch(h1) is None, timeout=15, what="shop gone from h1")
        r = h2.cli("up", str(copy), timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        wait_for(lambda: fetch(h2, 8081) == "shop-copy\n", timeout=20, what="shop on h2")
        assert apps(h1) == {("blog", "h2"), ("shop", "h2")}
        assert fetch(h2) == "blog\n"
        assert hosts(h1)["h2"]["apps"] == ["blog", "shop"] and hosts(h2)["h1"]["apps"] == []

        # h2 lost for good: its names stay held until h1 forgets it, then h1 may take them
        h2.kill9()
        killed = time.monotonic()
        r = h1.cli("hosts", "forget", "h2")
        assert r.returncode != 0 and "host 'h2' is alive" in r.stderr, r.stdout + r.stderr
        asked = time.monotonic()
        r = h1.cli("ps", "--json")  # h2 is not lost yet (its lease runs): it does not answer
        assert r.returncode == 0 and json.loads(r.stdout) == [], r.stdout
        # (renewed every third of the TTL: the lease runs at least 2/3 of it after the kill)
        assert asked - killed < c.ttl_s * 2 / 3, f"too slow: `ps` asked {asked - killed:.1f} s " \
            "after the kill, when h2's lease may have run out"
        assert "host h2 did not answer" in r.stderr, r.stderr
        wait_for(lambda: hosts(h1)["h2"]["state"] == "lost", timeout=c.ttl_s + 10,
                 what="h2 lost")
        r = h1.cli("up", str(blog), timeout=120)
        assert r.returncode != 0 and "on host h2" in r.stderr, r.stdout + r.stderr
        r = h1.cli("restart", "blog")
        assert r.returncode != 0 and "runs on host h2, which is lost" in r.stderr, r.stderr
        r = h1.cli("hosts", "forget", "h2", "--json")
        assert r.returncode == 0, r.stderr
        released = json.loads(r.stdout)["released"]
        assert released["app"] == 2 and released["port"] == 2, released
        assert "h2" not in hosts(h1)
        r = h1.cli("up", str(blog), timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        wait_for(lambda: fetch(h1) == "blog\n", timeout=20, what="blog on h1")


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
