"""Health-gated rollouts through the real kernel, net, fs, lb and log drivers, under load.

A new release joins only when the lb reports every new instance healthy; until then the old
instances serve, untouched. A release that never turns healthy fails the deploy with the last
health result, its instances are stopped, and the ledger and manifest are as before; a slow
one (healthy after 20 s) is rolled in while `corral up` follows it; a kill -9 of the lb
driver in the middle of a rollout is waited out; Ctrl-C leaves the deploy running.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from corral.testing import KernelProcess, wait_for
from e2e.apps import free_port
from e2e.test_lb_deployed import (
    WEB,
    Load,
    driver_logs,
    http_get,
    lb_backends,
    ps,
    up,
    web_app,
)

pytestmark = pytest.mark.root

T = TypeVar("T")

# WEB whose /healthz answers 500 until HEALTHY_AFTER seconds after it listens ("never": always)
_OLD = '''    def do_GET(self):
        body = (f"{iid} {version}\\n" if self.path != "/healthz" else "ok\\n").encode()
        self.send_response(200)'''
_NEW = '''    def do_GET(self):
        after = os.environ.get("HEALTHY_AFTER", "0")
        sick = self.path == "/healthz" and (after == "never"
                                            or time.time() - t_up < float(after))
        ok = "sick\\n" if sick else "ok\\n"
        body = (f"{iid} {version}\\n" if self.path != "/healthz" else ok).encode()
        self.send_response(500 if sick else 200)'''
assert _OLD in WEB and "\nsrv = S((" in WEB
GATED_WEB = WEB.replace(_OLD, _NEW).replace("\nsrv = S((", "\nt_up = time.time()\nsrv = S((")


def gated_app(public_dir: Path, name: str) -> tuple[int, str, Path]:
    """Two instances of GATED_WEB behind the HTTP proxy: (frontend, lb name, directory)."""
    front = free_port()
    lb_name = f"{name}.test"
    d = web_app(public_dir / name, name, free_port(), f'''
        name = "{lb_name}"
        frontend = {front}
        health = {{ http = "/healthz", interval = "0.5s", rise = 1 }}
        plane = "proxy"
        mode = "http"
    ''', script=GATED_WEB)
    return front, lb_name, d


def during_load(front: int, lb_name: str, action: Callable[[], T]) -> tuple[T, float, Load]:
    """``action()`` while keep-alive clients hammer the frontend (from 100 answers in, until
    200 more after it): its result, how long it took, and the load's record."""
    load = Load(front, lb_name).start()
    try:
        wait_for(lambda: load.ok > 100, 20, what="load running")
        t0 = time.monotonic()
        result = action()
        took = time.monotonic() - t0
        ok_after = load.ok
        wait_for(lambda: load.ok > ok_after + 200, 20, what="load after it")
    finally:
        load.stop()
    return result, took, load


def held(k: KernelProcess, app: str) -> dict[tuple[str, str], Any]:
    """What the app holds in the ledger besides its instance records (which move)."""
    return {(r["kind"], r["key"]): r["value"] for r in k.call("ledger.list", {"owner": app})[
        "records"] if r["kind"] != "instance"}


def instances(k: KernelProcess, app: str) -> dict[str, int]:
    apps = {a["app"]: a for a in ps(k)}
    return {i["id"]: i["pid"] for i in apps[app]["instances"]}


def answers(front: int, lb_name: str, n: int = 20) -> set[str]:
    return set(Counter(http_get("127.0.0.1", front, lb_name).strip() for _ in range(n)))


def test_a_release_that_never_turns_healthy_keeps_the_running_one(
        kernel: KernelProcess, public_dir: Path) -> None:
    """The broken redeploy of the issue: new code answers 500 on its health path. `corral up`
    fails after --wait with the last health result; the old instances never stop serving
    (zero failed requests), keep their pids, and the ledger and manifest are as before."""
    k = kernel
    front, lb_name, d = gated_app(public_dir, "keep")
    up(k, d, "--env", "VERSION=1")
    before = instances(k, "keep")
    ledger_before = held(k, "keep")
    manifest = k.home / "apps" / "keep" / "manifest.json"
    manifest_before = manifest.read_text()
    r, took, load = during_load(front, lb_name, lambda: k.cli(
        "up", str(d), "--env", "VERSION=2", "--env", "HEALTHY_AFTER=never", "--wait", "6",
        timeout=120))
    print(f"\nbroken redeploy refused in {took:.1f}s; {load.ok} requests, "
          f"{len(load.failures)} failed; answers {dict(load.bodies)}")
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "did not turn healthy within 6s" in r.stderr, r.stderr
    assert "last health check: http 500" in r.stderr and "running release was kept" in r.stderr
    assert "keep.web.1-g2  started" in r.stderr and "unhealthy (lb: http 500)" in r.stderr
    assert took < 60, took
    assert load.failures == [], load.failures[:10]
    assert {b.split()[1] for b in load.bodies} == {"1"}, load.bodies
    assert instances(k, "keep") == before
    assert all(Path(f"/proc/{pid}").exists() for pid in before.values())
    assert lb_backends(k, "keep") == {iid: "healthy" for iid in before}
    assert held(k, "keep") == ledger_before
    assert manifest.read_text() == manifest_before
    assert answers(front, lb_name) == {f"{iid} 1" for iid in before}


def test_a_release_healthy_after_20s_is_rolled_in(kernel: KernelProcess,
                                                  public_dir: Path) -> None:
    """New instances that need 20 s to turn healthy: `corral up` follows the rollout (a line
    per step) without giving up, the old instances serve until the new ones are healthy,
    then are drained; zero failed requests."""
    k = kernel
    front, lb_name, d = gated_app(public_dir, "slow")
    up(k, d, "--env", "VERSION=1")
    old = instances(k, "slow")
    r, took, load = during_load(front, lb_name, lambda: k.cli(
        "up", str(d), "--env", "VERSION=2", "--env", "HEALTHY_AFTER=20", timeout=180))
    print(f"\nslow release rolled in {took:.1f}s; {load.ok} requests, "
          f"{len(load.failures)} failed; answers {dict(load.bodies)}")
    assert r.returncode == 0, r.stderr + k.log() + driver_logs(k)
    assert took >= 20, took
    for new in ("slow.web.1-g2", "slow.web.2-g2"):
        assert f"{new}  healthy" in r.stderr, r.stderr
    for gone in old:
        assert f"{gone}  draining" in r.stderr and f"{gone}  stopped" in r.stderr, r.stderr
    assert "generation 2 is live" in r.stderr
    assert load.failures == [], load.failures[:10]
    assert {b.split()[1] for b in load.bodies} == {"1", "2"}
    assert set(instances(k, "slow")) == {"slow.web.1-g2", "slow.web.2-g2"}
    assert answers(front, lb_name) == {"slow.web.1-g2 2", "slow.web.2-g2 2"}


def test_lb_driver_killed_during_a_rollout(kernel: KernelProcess, public_dir: Path) -> None:
    """kill -9 of the lb driver while the new instances are joining: the kernel waits for the
    driver to come back and asks again; the rollout completes, the old instances go, and the
    only failed requests are those the dead proxy process could not answer while it was
    down."""
    k = kernel
    front, lb_name, d = gated_app(public_dir, "lbkill")
    up(k, d, "--env", "VERSION=1")
    old = instances(k, "lbkill")
    load = Load(front, lb_name).start()
    try:
        wait_for(lambda: load.ok > 100, 20, what="load running")
        cli = subprocess.Popen(
            [sys.executable, "-m", "corral.cli", "up", str(d), "--env", "VERSION=2",
             "--env", "HEALTHY_AFTER=4"], env=k.env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        wait_for(lambda: len(instances(k, "lbkill")) == 4, 20, what="new instances started")
        lb = next(x for x in json.loads(k.cli("drivers", "--json").stdout)
                  if x["name"] == "lb")
        killed_at = time.time()
        os.kill(lb["pid"], signal.SIGKILL)
        _, err = cli.communicate(timeout=120)
        ok_after = load.ok
        wait_for(lambda: load.ok > ok_after + 200, 30, what="load after the rollout")
    finally:
        load.stop()
    print(f"\nrollout with the lb killed: {load.ok} requests, {len(load.failures)} failed "
          f"(the proxy's restart): {load.failures[:3]}")
    assert cli.returncode == 0, err + k.log() + driver_logs(k)
    assert "driver lost during a rollout" in k.log() or "lbkill.web.1-g2  healthy" in err
    assert set(instances(k, "lbkill")) == {"lbkill.web.1-g2", "lbkill.web.2-g2"}
    assert not any(Path(f"/proc/{pid}").exists() for pid in old.values())
    assert answers(front, lb_name) == {"lbkill.web.1-g2 2", "lbkill.web.2-g2 2"}
    # failures only while the proxy process was down (it is the lb driver itself)
    late = [f for f in load.failures if float(f.split()[0]) > killed_at + 5]
    assert late == [], late[:5]


def test_ctrl_c_leaves_the_deploy_running(kernel: KernelProcess, public_dir: Path) -> None:
    """SIGINT to `corral up` ends the CLI (130) with how to follow the deploy; the kernel
    carries on and the new release goes live."""
    k = kernel
    front, lb_name, d = gated_app(public_dir, "intr")
    up(k, d, "--env", "VERSION=1")
    cli = subprocess.Popen(
        [sys.executable, "-m", "corral.cli", "up", str(d), "--env", "VERSION=2", "--env",
         "HEALTHY_AFTER=3"], env=k.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    wait_for(lambda: len(instances(k, "intr")) == 4, 20, what="new instances started")
    cli.send_signal(signal.SIGINT)
    _, err = cli.communicate(timeout=20)
    assert cli.returncode == 130, err
    assert "goes on in the kernel" in err and "corral events intr" in err, err
    assert "Traceback" not in err, err
    wait_for(lambda: set(instances(k, "intr")) == {"intr.web.1-g2", "intr.web.2-g2"}, 60,
             what="the deploy finished without the CLI")
    assert answers(front, lb_name) == {"intr.web.1-g2 2", "intr.web.2-g2 2"}


def test_restart_under_load_replaces_every_instance_without_a_failed_request(
        kernel: KernelProcess, public_dir: Path) -> None:
    """`corral restart APP`: fresh instances of the same release start beside the old ones,
    join once healthy, then the old ones are drained: new pids, zero failed requests.
    `corral restart APP nope` is refused and changes nothing."""
    k = kernel
    front, lb_name, d = gated_app(public_dir, "again")
    first = up(k, d, "--env", "VERSION=1")
    old = {i["pid"] for i in first["instances"]}
    r = k.cli("restart", "again", "nope")
    assert r.returncode == 1 and "has no process 'nope'" in r.stderr, r.stderr
    assert set(instances(k, "again").values()) == old
    r, _, load = during_load(front, lb_name, lambda: k.cli(
        "restart", "again", "web", "--json", timeout=120))
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert sorted(i["id"] for i in res["instances"]) == ["again.web.1-g2", "again.web.2-g2"]
    assert not {i["pid"] for i in res["instances"]} & old
    assert load.failures == [], load.failures[:10]
    assert answers(front, lb_name) == {"again.web.1-g2 1", "again.web.2-g2 1"}
