"""One app's instances on several hosts at once (``[placement] spread``, by default every
host), for real, on the three-host harness (tests/multihost.py) with every driver: the home
deals the instances, every host runs its share from its copy of the release, each host's lb
balances over all of them, and the shares follow the home's deploys, scales, restarts and
`down`; a lost host's share is dealt to the others and comes back with its host; a host
that joins later gets a share; a lost home is adopted by a host running a share, which
becomes the home.
"""

from __future__ import annotations

import base64
import codecs
import ipaddress
import json
import os
import select
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime
from typing import Any

import pytest

from corral.testing import wait_for
from multihost import DRIVERS, Cluster, Host, env_echo_toml, multihost, require_multihost

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]


def deploy(c: Cluster, on: Host, instances: int = 3, spread: int | None = 3) -> None:
    """shop with ``instances`` web instances (``[placement] spread``, unset if None)."""
    extra = f"[placement]\nspread = {spread}\n" if spread is not None else ""
    d = c.env_echo_app("shop", env_echo_toml("shop", instances=instances, extra=extra))
    r = on.cli("config", "set", "shop", "APP=shop")
    assert r.returncode == 0, r.stdout + r.stderr
    r = on.cli("up", str(d), timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def where(h: Host) -> dict[str, tuple[str, int, str]]:
    """Every instance of shop in the cluster, as `corral ps` on ``h`` shows them: slot
    (its id without the ``-gN`` of a replacement) -> (host, pid, address)."""
    r = h.cli("ps", "--json")
    assert r.returncode == 0, r.stderr
    out = {}
    for row in json.loads(r.stdout):
        if row["app"] == "shop":
            for i in row["instances"]:
                if i["state"] == "ready":
                    slot = str(i["id"]).partition("-g")[0]
                    out[slot] = (row["host"], int(i["pid"]), str(i["address"]))
    return out


def placed(h: Host) -> dict[str, str]:
    """id -> host of every ready instance of shop."""
    return {i: v[0] for i, v in where(h).items()}


def instance_via_lb(h: Host, timeout: float = 1.0) -> str | None:
    """Which instance (slot) answered a request to shop through the lb on ``h``."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    req = urllib.request.Request(f"http://{h.address}:8081/",
                                 headers={"Host": "shop.corral.test"})
    try:
        with opener.open(req, timeout=timeout) as r:
            body = r.read().decode()
            return r.headers.get("X-Instance") if body == "shop -\n" else None
    except OSError:
        return None


def served_by(h: Host, want: set[str], within: float = 20.0) -> set[str]:
    """The instances seen answering through ``h``'s lb, until all of ``want`` were or
    ``within`` seconds passed (the lbs learn the other hosts' instances within a second or
    two, then check their health)."""
    seen: set[str] = set()
    deadline = time.monotonic() + within
    while not want <= seen and time.monotonic() < deadline:
        got = instance_via_lb(h)
        if got:
            seen.add(got)
        time.sleep(0.02)
    return seen


def ready_in_ledger(h: Host) -> set[tuple[str, str]]:
    """(slot, host) of every instance of shop whose ledger record says ready (a lost
    host's records stay until it is back or forgotten)."""
    out = set()
    for key, rec in records(h, "instance").items():
        state = ((rec.get("value") or {}).get("record") or {}).get("state")
        if "/shop." in key and state == "ready":
            out.add((key.rsplit("/", 1)[1].partition("-g")[0],
                     str(rec["owner"]).rpartition("@")[2]))
    return out


def records(h: Host, kind: str) -> dict[str, dict[str, Any]]:
    r = h.etcdctl("get", "--prefix", f"/corral/v1/r/{kind}/", "-w", "json")
    assert r.returncode == 0, r.stderr
    return {base64.b64decode(kv["key"]).decode(): json.loads(base64.b64decode(kv["value"]))
            for kv in json.loads(r.stdout).get("kvs", [])}


def followed_lines(proc: subprocess.Popen[str], want: set[str], within: float = 30.0
                   ) -> set[str]:
    """``SLOT@HOST`` (the instance id without the ``-gN`` of a replacement) of each
    "serving" line ``corral logs -f`` printed, until all of ``want`` were or ``within``
    seconds passed."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()  # read raw: a text wrapper's read() of a pipe with nothing in
    decoder = codecs.getincrementaldecoder("utf-8")("replace")  # it yet can raise TypeError
    seen: set[str] = set()
    deadline = time.monotonic() + within
    buffer = ""
    while not want <= seen and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            break  # it exited
        buffer += decoder.decode(chunk)
        *lines, buffer = buffer.split("\n")
        for line in lines:
            fields = line.split()
            if len(fields) >= 3 and "serving on port" in line:
                instance, _, host = fields[1].rpartition("@")
                seen.add(f"{instance.partition('-g')[0]}@{host}")
    return seen


def three(c: Cluster) -> tuple[Host, Host, Host]:
    hs = (c.host(1), c.host(2), c.host(3))
    for h in hs:
        h.start_kernel(keyed=True, drivers=DRIVERS)
    return hs


def test_a_spread_app_runs_a_share_on_every_host_and_follows_its_home() -> None:
    """No ``spread`` in the manifest: with a cluster key, every host runs a share."""
    require_multihost()
    with multihost(3) as c:
        h1, h2, h3 = three(c)
        deploy(c, h1, spread=None)
        want = {"shop.web.1": "h1", "shop.web.2": "h2", "shop.web.3": "h3"}
        wait_for(lambda: placed(h2) == want, timeout=30, what="a share on every host")
        # each host's own subnet; the lb of every host balances over all three
        r = h3.cli("hosts", "--json")
        subnets = {row["name"]: ipaddress.ip_network(row["subnets"][0])
                   for row in json.loads(r.stdout)}
        for host, _pid, address in where(h3).values():
            assert ipaddress.ip_address(address) in subnets[host], (address, subnets)
        for h in (h1, h2, h3):
            assert served_by(h, set(want)) == set(want), h.name
        # logs and top asked on any host show every host's instances, each with its host
        for h in (h2, h3):
            r = h.cli("logs", "shop", "--json")
            assert r.returncode == 0, r.stderr
            said = {(x["instance"], x["host"]) for x in map(json.loads, r.stdout.splitlines())
                    if "serving on port" in x["message"]}
            assert said == {(i, host) for i, host in want.items()}, r.stdout
        r = h3.cli("logs", "shop", "--host", "h2")
        assert r.returncode == 0 and "shop.web.2@h2 | shop.web.2 serving" in r.stdout, r.stdout
        assert "@h1" not in r.stdout and "@h3" not in r.stdout, r.stdout
        r = h1.cli("top", "shop", "--once", "--json")
        assert r.returncode == 0, r.stderr
        assert {(row["instance"], row["host"]) for row in json.loads(r.stdout)
                if "pid" in row} == set(want.items()), r.stdout
        # the placements are the home's records; the shares hold only their hosts' records
        assert {k.rsplit("/", 1)[1]: v["owner"] for k, v in records(h1, "placement").items()
                } == {"h2": "shop@h1", "h3": "shop@h1"}
        assert records(h1, "app")["/corral/v1/r/app/shop"]["owner"] == "shop@h1"

        # scaled from h3 (run by the home): web.4 dealt to h1
        r = h3.cli("scale", "shop", "web=4", timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        wait_for(lambda: placed(h2) == {**want, "shop.web.4": "h1"}, timeout=30,
                 what="web.4 on h1")

        # restarted from h2: every share's instances replaced, not only the home's; `logs
        # -f` on h3 (running since before) shows the new instances of every host
        before = {i: v[1] for i, v in where(h1).items()}
        follow = subprocess.Popen(
            h3.enter([sys.executable, "-m", "corral.cli", "logs", "shop", "-f", "--since",
                      datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")]),
            env=h3.kernel.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            time.sleep(1.5)  # its history printed, its first poll made
            r = h2.cli("restart", "shop", timeout=120)
            assert r.returncode == 0, r.stdout + r.stderr
            seen = followed_lines(follow, {f"{i}@{h}" for i, h in placed(h1).items()})
        finally:
            follow.kill()
        assert {f"{i}@{h}" for i, h in placed(h1).items()} <= seen, seen

        def all_replaced() -> bool:
            now = where(h1)
            return set(now) == set(before) and all(now[i][1] != before[i] for i in now)

        wait_for(all_replaced, timeout=30, what="every instance replaced")

        # down from h3: nothing of shop left anywhere
        r = h3.cli("down", "shop", timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        wait_for(lambda: not where(h1), timeout=30, what="no instance left")
        for kind in ("placement", "satellite", "instance", "app", "backend"):
            left = [k for k in records(h1, kind) if "shop" in k]
            assert not left, (kind, left)


def test_a_lost_hosts_share_goes_to_the_others_and_comes_back_with_it() -> None:
    require_multihost()
    with multihost(3) as c:
        h1, h2, h3 = three(c)
        deploy(c, h1, instances=6)
        want = {f"shop.web.{i}": f"h{(i - 1) % 3 + 1}" for i in range(1, 7)}
        wait_for(lambda: placed(h1) == want, timeout=30, what="two instances per host")
        kept = {i: v for i, v in where(h1).items() if v[0] != "h3"}

        h3.kill9()
        lost = time.monotonic()
        # timed on the ledger's instance records (a `corral ps` asked while h3's lease
        # lives waits up to 5 s for h3's answer)
        wait_for(lambda: len({i for i, h in ready_in_ledger(h1) if h != "h3"}) == 6,
                 timeout=c.ttl_s + 30, step=0.05, what="h3's share dealt to h1 and h2")
        took = time.monotonic() - lost
        wait_for(lambda: len(placed(h1)) == 6 and "h3" not in placed(h1).values(),
                 timeout=30, what="`corral ps`: h3's share on h1 and h2")
        print(f"ttl_s {c.ttl_s}; h3's share running on h1 and h2 {took:.2f} s after the kill")
        now = where(h1)
        assert all(now[i] == v for i, v in kept.items()), (kept, now)  # nothing else moved
        assert served_by(h2, set(want)) == set(want)

        # h3 comes back: its place was kept, its share goes back to it
        h3.start_kernel(keyed=True, drivers=DRIVERS)
        wait_for(lambda: placed(h1) == want, timeout=60, what="h3's share back on h3")
        now = where(h1)
        assert all(now[i] == v for i, v in kept.items()), (kept, now)

        # h3 drained, asked on h1: its share dealt to h1 and h2 by the home, nothing on h3
        r = h1.cli("hosts", "drain", "h3", timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "shop: its share here dealt to other hosts by its home, host h1" in r.stdout
        assert len(placed(h1)) == 6 and "h3" not in placed(h1).values(), where(h1)
        assert "ready (drained)" in h1.cli("hosts").stdout
        assert served_by(h3, set(want)) == set(want)  # its lb still serves the app


def test_a_host_that_joins_later_gets_a_share() -> None:
    """Spread unset, deployed while two hosts were up: a third host that starts later is
    dealt a share (from its copy of the release, made after it joined); of the four
    instances only the one it takes moves (a round-robin deal over three hosts would move
    two: 3 to h3 and 4 to h1), and its lb serves every instance."""
    require_multihost()
    with multihost(3) as c:
        h1, h2, h3 = c.host(1), c.host(2), c.host(3)
        for h in (h1, h2):
            h.start_kernel(keyed=True, drivers=DRIVERS)
        deploy(c, h1, spread=None, instances=4)
        before = {"shop.web.1": "h1", "shop.web.2": "h2", "shop.web.3": "h1",
                  "shop.web.4": "h2"}
        wait_for(lambda: placed(h1) == before, timeout=30, what="shop on h1 and h2")
        kept = {i: v for i, v in where(h1).items() if i != "shop.web.4"}

        h3.start_kernel(keyed=True, drivers=DRIVERS)
        joined = time.monotonic()
        want = {**before, "shop.web.4": "h3"}
        wait_for(lambda: placed(h1) == want, timeout=60, what="a share on h3")
        print(f"h3's share running {time.monotonic() - joined:.2f} s after its kernel started")
        now = where(h1)
        assert all(now[i] == v for i, v in kept.items()), (kept, now)  # nothing else moved
        assert records(h1, "app")["/corral/v1/r/app/shop"]["value"]["spread"] == \
            ["h1", "h2", "h3"]
        assert served_by(h3, set(want)) == set(want)


def test_a_lost_home_is_adopted_by_a_host_running_a_share() -> None:
    require_multihost()
    with multihost(3) as c:
        h1, h2, h3 = three(c)
        deploy(c, h1)
        wait_for(lambda: len(placed(h2)) == 3, timeout=30, what="a share on every host")
        h1.kill9()
        wait_for(lambda: len(placed(h2)) == 3 and "h1" not in placed(h2).values(),
                 timeout=c.ttl_s + 30, what="shop whole again on h2 and h3")
        owner = records(h2, "app")["/corral/v1/r/app/shop"]["owner"]
        home = owner.split("@")[1]
        assert home in {"h2", "h3"}
        other = "h3" if home == "h2" else "h2"
        assert {k.rsplit("/", 1)[1] for k in records(h2, "placement")} == {other}
        ids = set(placed(h2))
        for h in (h2, h3):
            assert served_by(h, ids) == ids
