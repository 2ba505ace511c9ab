"""kill -9 of corrald while a release is being made, through the real kernel and drivers.

During a build (``[build] command`` sleeping) and during the switch (the ``[release]``
command sleeping, after the build and before any new instance): after a restart the old or
the new release serves, the release list says which one consistently with what serves,
nothing is left ``building`` nor running for the cut-short step, and a rerun of
``corral up`` completes and serves the new version.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from corral.testing import KernelProcess, drivers_running, free_port, running_kernel, wait_for
from e2e.test_lb_deployed import (
    DRIVERS,
    WEB,
    driver_logs,
    http_get,
    new_net_host,
    require_net,
    web_app,
)

pytestmark = pytest.mark.root

# WEB answering "<instance id> <VERSION file of its cwd, the release directory> <CORRAL_RELEASE>"
_VERSION_FROM_ENV = 'version = os.environ.get("VERSION", "1")'
assert _VERSION_FROM_ENV in WEB and 'f"{iid} {version}\\n"' in WEB
VERSIONED_WEB = WEB.replace(
    _VERSION_FROM_ENV,
    'version = open("VERSION").read().strip()\n'
    'release = os.environ.get("CORRAL_RELEASE", "-")').replace(
    'f"{iid} {version}\\n"', 'f"{iid} {version} {release}\\n"')


@pytest.fixture
def kernel(public_dir: Path) -> Iterator[KernelProcess]:
    """A real kernel with the net, fs, lb and log drivers. A test that leaves it dead (a
    kernel that did not start again) gets it started once more for the teardown, or else
    its drivers stopped, so nothing of it outlives the test."""
    require_net()
    with running_kernel(public_dir / "k", new_net_host().host_toml(DRIVERS),
                        drivers=DRIVERS) as k:
        pids = [d["pid"] for d in k.call("drivers.list")["drivers"]]
        try:
            yield k
        finally:
            if k.proc is not None and k.proc.poll() is not None:
                revive(k, pids)


def revive(k: KernelProcess, driver_pids: list[int]) -> None:
    """A kernel left dead: free the sandbox roots of builds it never ended (they keep their
    release directory busy), start it again so the teardown takes the apps down; failing
    that, stop its drivers."""
    for root in (k.runtime / "roots").glob("*_build.*"):
        subprocess.run(["umount", "--recursive", "--lazy", str(root)], check=False,
                       capture_output=True)
    try:
        k.start()
        wait_for(lambda: drivers_running(k, DRIVERS), 20, what="drivers back for the teardown")
    except (RuntimeError, AssertionError):
        for pid in driver_pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError:
                pass


def release_app(d: Path, name: str, extra: str = "", *, script: str = VERSIONED_WEB
                ) -> tuple[int, str, Path]:
    """One instance of ``script`` behind the HTTP proxy, VERSION 1: (frontend, lb name, dir)."""
    front = free_port()
    lb_name = f"{name}.test"
    web_app(d, name, free_port(), f'''
        name = "{lb_name}"
        frontend = {front}
        health = {{ http = "/healthz", interval = "0.5s", rise = 1 }}
        plane = "proxy"
        mode = "http"
    ''', instances=1, script=script, extra=textwrap.dedent(extra))
    set_version(d, "1")
    return front, lb_name, d


def set_version(d: Path, version: str) -> None:
    (d / "VERSION").write_text(version + "\n")
    (d / "VERSION").chmod(0o644)


def set_section(d: Path, section: str, command: str) -> None:
    """Replace (or add) ``[section] command = ...`` in the app's corral.toml."""
    toml = d / "corral.toml"
    lines = toml.read_text().splitlines()
    if f"[{section}]" in lines:
        i = lines.index(f"[{section}]")
        del lines[i:i + 2]
    lines += [f"[{section}]", f"command = {json.dumps(command)}"]
    toml.write_text("\n".join(lines) + "\n")


def served(front: int, lb_name: str) -> tuple[str, str]:
    """(VERSION, release) the app answers with through its frontend."""
    _, version, release = http_get("127.0.0.1", front, lb_name, timeout=10).split()
    return version, release


def releases(k: KernelProcess, app: str) -> list[dict[str, Any]]:
    r = k.cli("releases", app, "--json")
    assert r.returncode == 0, r.stderr
    out: list[dict[str, Any]] = json.loads(r.stdout)["releases"]
    return out


def release_records(k: KernelProcess, app: str) -> dict[int, dict[str, Any]]:
    recs = k.call("ledger.list", {"kind": "release"})["records"]
    return {int(r["value"]["number"]): r["value"] for r in recs
            if r["owner"] == f"releases:{app}"}


def release_dirs(k: KernelProcess, app: str) -> set[str]:
    root = k.home / "apps" / app / "releases"
    return {p.name for p in root.iterdir() if p.name != "logs"} if root.is_dir() else set()


def app_uid(k: KernelProcess, app: str) -> int:
    [rec] = k.call("ledger.list", {"owner": app, "kind": "uid"})["records"]
    return int(rec["key"])


def sleepers(uid: int) -> list[psutil.Process]:
    """Live `sleep` processes of ``uid`` (the app's build, release phase)."""
    found = []
    for p in psutil.process_iter(["uids", "cmdline", "status"]):
        try:
            cmd = p.info["cmdline"] or []
            if (p.info["uids"] is not None and p.info["uids"].real == uid and cmd
                    and os.path.basename(cmd[0]) == "sleep"
                    and p.info["status"] != psutil.STATUS_ZOMBIE):
                found.append(p)
        except psutil.Error:
            continue
    return found


def up_in_background(k: KernelProcess, d: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "corral.cli", "up", str(d)], env=k.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def crash_and_restart(k: KernelProcess, cli: subprocess.Popen[str]) -> str:
    """kill -9 of corrald (drivers and apps live on), then a new kernel; what the CLI said."""
    k.kill9()
    try:
        _, err = cli.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        cli.kill()
        _, err = cli.communicate()
    failure = None
    try:
        k.start()
    except RuntimeError as exc:
        failure = str(exc)[-1500:]
    if failure is not None:
        pytest.fail(f"corrald did not start again after the kill -9: {failure}", pytrace=False)
    wait_for(lambda: drivers_running(k, DRIVERS), 20, what="drivers back after the restart")
    return err


def up_ok(k: KernelProcess, d: Path) -> dict[str, Any]:
    r = k.cli("up", str(d), "--json", timeout=120)
    assert r.returncode == 0, f"{r.stderr}\n{k.log()}\n{driver_logs(k)}"
    out: dict[str, Any] = json.loads(r.stdout)
    return out


def assert_consistent(k: KernelProcess, app: str, front: int, lb_name: str) -> dict[str, Any]:
    """Numbers increasing, nothing building, exactly one live, and it is what serves (and
    what `corral ps` runs); the live release."""
    rels = releases(k, app)
    listed = [(f"v{r['release']}", r["status"], "live" if r["live"] else "") for r in rels]
    numbers = [r["release"] for r in rels]
    assert numbers == sorted(set(numbers)), listed
    assert not [r for r in rels if r["status"] == "building"], listed
    live = [r for r in rels if r["live"]]
    assert len(live) == 1, listed
    _, release = served(front, lb_name)
    assert release == f"v{live[0]['release']}", (
        f"{release} serves, but `corral releases` says {listed}")
    [ps_app] = [a for a in json.loads(k.cli("ps", "--json").stdout) if a["app"] == app]
    assert ps_app["release"] == live[0]["release"], ps_app
    return live[0]


def test_kill9_during_a_build_keeps_the_old_release_and_a_rerun_completes(
        kernel: KernelProcess, public_dir: Path) -> None:
    """kill -9 of corrald while `[build] command = "sleep 30"` runs for v2: after a restart v1
    serves its old VERSION, the cut-short release is gone (no record left building, no
    directory, no builder process), and `corral up` with a quick build makes and serves the
    new version, the release list consistent with what serves."""
    k = kernel
    front, lb_name, d = release_app(public_dir / "bk", "bk")
    up_ok(k, d)
    assert served(front, lb_name) == ("1", "v1")
    uid = app_uid(k, "bk")

    set_version(d, "2")
    set_section(d, "build", "sleep 30")
    cli = up_in_background(k, d)
    building = wait_for(lambda: next((v for n, v in release_records(k, "bk").items()
                                      if v["status"] == "building" and v.get("builder")
                                      and n > 1), None), 30, 0.1,
                        what="v2 building with its builder started")
    builder = psutil.Process(int(building["builder"]["pid"]))
    number = int(building["number"])
    wait_for(lambda: sleepers(uid), 10, 0.1, what="the build's sleep running")
    t0 = time.monotonic()
    err = crash_and_restart(k, cli)
    print(f"\nkernel restarted in {time.monotonic() - t0:.1f}s; the CLI said: {err[-300:]!r}")

    assert served(front, lb_name) == ("1", "v1")
    wait_for(lambda: number not in release_records(k, "bk")
             and release_dirs(k, "bk") == {"v1"}, 10, 0.1,
             what=f"v{number} gone (record and directory)")
    records = release_records(k, "bk")
    assert not [v for v in records.values() if v["status"] == "building"], records
    wait_for(lambda: not builder.is_running() or builder.status() == psutil.STATUS_ZOMBIE,
             5, 0.1, what="the builder process ended")
    wait_for(lambda: not sleepers(uid), 5, 0.1, what="no build process left")
    assert_consistent(k, "bk", front, lb_name)

    set_section(d, "build", "echo built > BUILT")
    res = up_ok(k, d)
    assert served(front, lb_name) == ("2", f"v{res['release']}")
    live = assert_consistent(k, "bk", front, lb_name)
    assert live["release"] == res["release"] > 1
    assert (k.home / "apps" / "bk" / "releases" / f"v{res['release']}" / "BUILT").is_file()
    assert [r["release"] for r in releases(k, "bk")] == [1, res["release"]]


RELEASE_PHASE = ('echo "$CORRAL_RELEASE start" >> "$CORRAL_PATH_DATA/phase.log"; '
                 'sleep "$(cat "$CORRAL_PATH_DATA/delay" 2>/dev/null || echo 0)"; '
                 'echo "$CORRAL_RELEASE done" >> "$CORRAL_PATH_DATA/phase.log"')


def test_kill9_during_the_release_phase_serves_one_release_and_a_rerun_completes(
        kernel: KernelProcess, public_dir: Path) -> None:
    """kill -9 of corrald while v2's `[release] command` sleeps (after its build, before
    any new instance): after a restart the old or the new release serves and `corral
    releases` says which, nothing is building and the release phase is not left running;
    a rerun of `corral up` completes, runs the release phase again (it never passed), and
    serves the new version."""
    k = kernel
    front, lb_name, d = release_app(public_dir / "rp", "rp", '''
        [paths]
        data = { path = "data", mode = "rw", create = true }
    ''')
    set_section(d, "release", RELEASE_PHASE)
    up_ok(k, d)
    assert served(front, lb_name) == ("1", "v1")
    data = d / "data"
    phase_log = data / "phase.log"
    assert phase_log.read_text().split("\n") == ["v1 start", "v1 done", ""]
    uid = app_uid(k, "rp")

    (data / "delay").write_text("30\n")
    (data / "delay").chmod(0o644)
    set_version(d, "2")
    cli = up_in_background(k, d)
    wait_for(lambda: "v2 start" in phase_log.read_text(), 30, 0.1,
             what="v2's release phase started")
    phase = wait_for(lambda: sleepers(uid), 10, 0.1, what="the release phase's sleep")
    [ps_app] = [a for a in json.loads(k.cli("ps", "--json").stdout) if a["app"] == "rp"]
    assert [i["id"] for i in ps_app["instances"]] == ["rp.web.1"], ps_app  # none new yet
    err = crash_and_restart(k, cli)
    print(f"\nthe CLI said: {err[-300:]!r}")

    version, release = served(front, lb_name)
    assert (version, release) in (("1", "v1"), ("2", "v2")), (version, release)
    assert not [v for v in release_records(k, "rp").values() if v["status"] == "building"]
    live = assert_consistent(k, "rp", front, lb_name)
    print(f"after the restart: {release} serves, live {live['release']}")
    # the release phase died with the kernel's deploy (or is ended by the new kernel)
    wait_for(lambda: not [p for p in phase if p.is_running()
                          and p.status() != psutil.STATUS_ZOMBIE], 5, 0.1,
             what="the cut-short release phase ended")

    (data / "delay").write_text("0\n")
    res = up_ok(k, d)
    assert served(front, lb_name) == ("2", f"v{res['release']}")
    live = assert_consistent(k, "rp", front, lb_name)
    assert live["release"] == res["release"]
    lines = phase_log.read_text().split("\n")
    # the live release's phase passed, after the crash (v2's never did before it)
    assert f"v{res['release']} done" in lines, lines
    assert (live.get("release_phase") or {}).get("exit") == 0, live
    assert lines.count("v2 done") <= 1, lines
