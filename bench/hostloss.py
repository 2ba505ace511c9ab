"""A host lost -> its app serving again on another host (goal: <= lease TTL + 2 s).

Three hosts on this machine, built by the tests' harness (``tests/multihost.py``: a network
namespace, a mount namespace and an etcd member each, joined by a bridge), each kernel with
the cluster key (releases copied between hosts, a lost host's apps re-placed by the leader).
Each round deploys a new app (a small HTTP server) on h2, waits until its release is copied
to h1 and h3, then kills h2's kernel and app with SIGKILL and times, from the kill:

- **detection**: h2's lease record (``host-alive/h2``) gone from etcd: the lease expires a TTL
  after h2's last renewal (renewed five times per TTL, so between 0.8 and 1 TTL after the
  kill), and etcd's own expiry check runs every 500 ms;
- **placement**: the app's name held by another host (the leader saw the lease go, asked a
  live host to adopt the app, and that host's transaction moved the app's records);
- **start**: the app answering HTTP on that host's address (the adopting host started the
  current release from its copy).

Between rounds h2's kernel is started again (it rejoins empty: its app was adopted).

Then the same for a **share** of a spread app (``[placement] spread = 3``, one ``web``
instance per host, homed on h1): h3 killed -9, and from the kill:

- **detection**: ``host-alive/h3`` gone;
- **placement**: the home dealt h3's instance again (h3's placement record gone);
- **start**: the web instance h3 ran ready on h1 or h2 (its ledger instance record says so).

h3 is then started again and gets its share back before the next round. Timing is done from
the root namespace by polling etcd and HTTP every 10 ms (so each figure is late by up to
10 ms). Prints each round on stderr, then the medians and the goal line.
``BENCH_ROUNDS`` (default 5) and ``BENCH_TTL`` (default 3 s, the harness's) set the run.
Needs root, iproute2, nftables, util-linux and etcd-server (as the tests do).
"""

from __future__ import annotations

import os
import statistics
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from _kernel import exit_on_sigterm

from corral.ledger import open_ledger
from multihost import DRIVERS, Cluster, Host, multihost

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
TTL_S = float(os.environ.get("BENCH_TTL", "3"))
POLL_S = 0.01
TOML = """[app]
name = "{name}"

[processes]
web = {{ command = "python3 server.py {port}", instances = 1, port = "http" }}

[ports]
http = {port}
"""


class CannotMeasure(Exception):
    pass


def serving(h: Host, port: int) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://{h.address}:{port}/", timeout=0.2) as r:
            return bool(r.status == 200 and r.read() == b"? -\n")
    except OSError:
        return False


def app_dir(c: Cluster, name: str, port: int) -> Path:
    return Path(c.env_echo_app(name, TOML.format(name=name, port=port)))


def wait(cond: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise CannotMeasure(f"{what}: not within {timeout:g} s")
        time.sleep(0.05)


def one_round(c: Cluster, i: int) -> dict[str, float]:
    h1, h2, h3 = c.host(1), c.host(2), c.host(3)
    name, port = f"lost{i}", 8100 + i
    r = h2.cli("up", str(app_dir(c, name, port)), timeout=120)
    if r.returncode != 0:
        raise CannotMeasure(f"deploy on h2 failed: {r.stderr[-1000:]}")
    wait(lambda: serving(h2, port), 20, f"{name} serving on h2")
    wait(lambda: all((h.kernel.home / "replicas" / name / "v1").is_dir() for h in (h1, h3)),
         30, f"{name}'s release copied to h1 and h3")
    ledger = open_ledger(c.url, c.base)
    marks: dict[str, float] = {}
    done = threading.Event()

    def watch(started: float) -> None:
        while not done.is_set() and time.monotonic() - started < 60:
            now = time.monotonic()
            if "detection" not in marks and ledger.get("host-alive", "h2") is None:
                marks["detection"] = now - started
            if "placement" not in marks:
                rec = ledger.get("app", name)
                if rec is not None and not rec.owner.endswith("@h2"):
                    marks["placement"] = now - started
                    marks["host"] = float(rec.owner.rpartition("@h")[2])
            if "placement" in marks and any(serving(h, port) for h in (h1, h3)):
                marks["serving"] = time.monotonic() - started
                return
            time.sleep(POLL_S)

    killed = time.monotonic()
    h2.kill9()
    watch(killed)
    done.set()
    ledger.close()
    if "serving" not in marks:
        raise CannotMeasure(f"{name} not serving again within 60 s: {marks}")
    h2.start_kernel(keyed=True)  # it rejoins empty
    return marks


def share_round(c: Cluster, i: int) -> dict[str, float]:
    """One round of a spread app's share lost with its host (see the module)."""
    h1, h3 = c.host(1), c.host(3)
    name, port = f"wide{i}", 8200 + i
    toml = TOML.format(name=name, port=port).replace("instances = 1", "instances = 3")
    r = h1.cli("up", str(c.env_echo_app(name, toml + "\n[placement]\nspread = 3\n")),
               timeout=120)
    if r.returncode != 0:
        raise CannotMeasure(f"deploy on h1 failed: {r.stderr[-1000:]}")
    ledger = open_ledger(c.url, c.base)

    def ready_on() -> dict[str, str]:
        """web instance slot -> host of those whose record says ready (not h3's)."""
        out = {}
        for rec in ledger.list(kind="instance"):
            host = rec.owner.rpartition("@")[2]
            state = (rec.value.get("record") or {}).get("state")
            slot = rec.key.rpartition("/")[2]
            if slot.startswith(f"{name}.") and state == "ready" and host != "h3":
                out[slot.partition("-g")[0]] = host
        return out

    def on_h3() -> str | None:
        """The slot of the web instance h3 runs (the home deals by load: any of the three)."""
        mine = [r.key.rpartition("/")[2] for r in ledger.list(kind="instance")
                if r.key.startswith(f"@h3/{name}.")]
        return mine[0].partition("-g")[0] if mine else None

    try:
        wait(lambda: on_h3() is not None and len(ready_on()) == 2, 30,
             f"{name}: a share on each host")
        slot = on_h3()
        marks: dict[str, float] = {}
        killed = time.monotonic()
        h3.kill9()
        while time.monotonic() - killed < 60:
            now = time.monotonic() - killed
            if "detection" not in marks and ledger.get("host-alive", "h3") is None:
                marks["detection"] = now
            if "detection" in marks and "placement" not in marks and \
                    ledger.get("placement", f"{name}/h3") is None:
                marks["placement"] = now
            if "placement" in marks and slot in ready_on():
                marks["serving"] = time.monotonic() - killed
                marks["host"] = float(ready_on()[str(slot)][1:])
                break
            time.sleep(POLL_S)
        if "serving" not in marks:
            raise CannotMeasure(f"{slot} not running again within 60 s: {marks}")
        h3.start_kernel(keyed=True, drivers=DRIVERS)  # it rejoins, gets its share back
        wait(lambda: on_h3() is not None, 60, f"{name}: h3's share back")
    finally:
        ledger.close()
    return marks


def report(what: str, rows: list[dict[str, float]]) -> None:
    """The medians of ``rows`` and the goal line, each figure named ``hostloss_<what>...``."""

    def med(key: str) -> float:
        return statistics.median(r[key] for r in rows)

    detection = med("detection")
    placement = statistics.median(r["placement"] - r["detection"] for r in rows)
    start = statistics.median(r["serving"] - r["placement"] for r in rows)
    total = med("serving")
    worst = max(r["serving"] for r in rows)
    print(f"hostloss{what}_lease_ttl: {TTL_S:g} s")
    print(f"hostloss{what}_detection_median: {detection:.2f} s (the lease expiring after the "
          "kill)")
    print(f"hostloss{what}_placement_median: {placement:.2f} s (after detection: "
          f"{'leader, adoption' if not what else 'the home dealing the share again'})")
    print(f"hostloss{what}_start_median: {start:.2f} s (after placement: "
          f"{'the app answering' if not what else 'the instance ready'})")
    print(f"hostloss{what}_serving_again_median: {total:.2f} s, max {worst:.2f} s "
          f"(goal <= {TTL_S + 2:g} s, TTL + 2 s; {len(rows)} rounds)")


def main() -> int:
    exit_on_sigterm()
    if os.geteuid() != 0:
        print("hostloss: needs root (network namespaces, nftables)", file=sys.stderr)
        return 2
    rows: list[dict[str, float]] = []
    shares: list[dict[str, float]] = []
    # apps: kernels without drivers; shares: every driver (two web instances on one host
    # need instance addresses, the net driver's)
    for kind, run, into, drivers in (("app", one_round, rows, ()),
                                     ("share", share_round, shares, DRIVERS)):
        with multihost(3, ttl_s=TTL_S) as c:
            for h in c.hosts:
                h.start_kernel(keyed=True, drivers=drivers)
            for i in range(1, ROUNDS + 1):
                m = run(c, i)
                into.append(m)
                print(f"{kind} round {i}: detection {m['detection']:.2f} s, placement +"
                      f"{m['placement'] - m['detection']:.2f} s, start +"
                      f"{m['serving'] - m['placement']:.2f} s, serving again after "
                      f"{m['serving']:.2f} s (on h{int(m['host'])})", file=sys.stderr,
                      flush=True)
    report("", rows)
    report("_share", shares)
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except CannotMeasure as exc:
        print(f"hostloss: cannot measure: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
