"""The cron driver through the real kernel: jobs of apps deployed with `corral up`.

corrald runs with the cron, log and fs drivers, so a run is what a user gets: spawned by the
kernel (instance.spawn) in the app's sandbox, as the app's uid, its exit status collected by
the kernel (instance.wait). Scheduled fires happen for real: the driver's wall clock is
shifted with `[drivers.cron] config = { clock_offset_s = ... }` (docs/drivers/cron.md) so
that the next minute boundary is a few seconds after the deploy.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import textwrap
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psutil
import pytest

from corral.testing import KernelProcess, wait_for

pytestmark = pytest.mark.root

SLOW_MARK = "61.25"  # the job's `sleep`, found by its argument



def drivers(k: KernelProcess) -> dict[str, dict[str, Any]]:
    r = k.cli("drivers", "--json")
    assert r.returncode == 0, r.stderr
    return {d["name"]: d for d in json.loads(r.stdout)}


def all_running(k: KernelProcess) -> bool:
    found = drivers(k)
    return all(found.get(n, {}).get("state") == "running" for n in ("cron", "log", "fs"))


def cli_json(k: KernelProcess, *argv: str) -> Any:
    r = k.cli(*argv, "--json")
    assert r.returncode == 0, f"corral {' '.join(argv)}: {r.stderr}"
    return json.loads(r.stdout)


def runs(k: KernelProcess, job: str) -> list[dict[str, Any]]:
    return list(cli_json(k, "cron", "runs", job)["runs"])


def finished(k: KernelProcess, job: str, run_id: int) -> dict[str, Any] | None:
    row = next((r for r in runs(k, job) if r["id"] == run_id), None)
    return row if row and row["state"] not in ("running", "claimed", "queued") else None


def host_config(lead_s: float) -> tuple[str, datetime]:
    """Host config whose cron clock reaches a minute boundary ``lead_s`` seconds from now;
    that boundary (the slot of the first scheduled run), in UTC."""
    fire_at = time.time() + lead_s  # real time of the fire
    boundary = math.ceil(fire_at / 60) * 60
    offset = boundary - fire_at  # the cron clock reads `boundary` at `fire_at`
    return ("[drivers.log]\nconfig = { metrics = false }\n[drivers.fs]\n"
            f"[drivers.cron]\nconfig = {{ clock_offset_s = {offset:.3f} }}\n",
            datetime.fromtimestamp(boundary, UTC))


def iso(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%S.000Z")


REPORT = ('echo "$(id -u) $(pwd) $CORRAL_APP $CORRAL_CRON_REASON $CORRAL_CRON_SLOT" '
          '> "$CORRAL_PATH_DATA/run-$CORRAL_CRON_RUN"; echo ran')


def cron_app(d: Path, name: str) -> Path:
    d.mkdir(parents=True)
    data = d / "data"
    data.mkdir()
    data.chmod(0o1777)  # the app's uid is chosen at deploy
    slow = f"trap '' TERM; sleep {SLOW_MARK} & echo started; wait; echo not-reached"
    (d / "corral.toml").write_text(textwrap.dedent(f'''
        [app]
        name = "{name}"
        [processes]
        idle = {{ command = "sleep 3600", ready = "started" }}
        [paths]
        data = {{ path = "data", mode = "rw" }}
        [cron.tick]
        schedule = "* * * * *"
        command = {json.dumps(REPORT)}
        [cron.fail]
        schedule = "0 3 * * *"
        command = "echo failing; exit 3"
        [cron.slow]
        schedule = "0 3 * * *"
        command = {json.dumps(slow)}
        timeout = "2s"
        kill_grace = "1s"
        [cron.dst]
        schedule = "30 2 * * *"
        timezone = "America/New_York"
        command = "true"
    '''))
    d.chmod(0o755)
    return d


def start_kernel(base: Path, lead_s: float) -> tuple[KernelProcess, datetime]:
    toml, slot = host_config(lead_s)
    base.mkdir()
    k = KernelProcess(base, toml)
    k.start()
    wait_for(lambda: all_running(k))
    return k, slot


@pytest.fixture
def scheduled(public_dir: Path) -> Iterator[tuple[KernelProcess, datetime, Path]]:
    """A kernel whose cron clock hits a minute boundary ~20 s from now, and a deployed app
    (the manual runs and views of the test come before it)."""
    k, slot = start_kernel(public_dir / "k", lead_s=20.0)
    try:
        app = cron_app(public_dir / "app", "crony")
        r = k.cli("up", str(app))
        assert r.returncode == 0, r.stderr
        yield k, slot, app
    finally:
        k.teardown()


def slow_procs() -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline", "name"]):
        cmd = p.info["cmdline"] or []
        if SLOW_MARK in " ".join(cmd) and p.status() != psutil.STATUS_ZOMBIE:
            found.append(p)
    return found


def test_runs_in_the_sandbox_with_exit_status_timeout_and_views(
    scheduled: tuple[KernelProcess, datetime, Path],
) -> None:
    """Manual and scheduled runs happen in the app's sandbox (its uid, its directory, its
    env), are recorded with their reason and real exit code; a timeout kills the job's whole
    process group; ls/next/show say what will happen."""
    k, slot, app = scheduled
    data = app / "data"

    # manual run
    manual = cli_json(k, "cron", "run", "crony.tick")["run"]
    row = wait_for(lambda: finished(k, "crony.tick", manual))
    assert (row["state"], row["reason"], row["exit_code"], row["slot"]) == (
        "succeeded", "manual", 0, None), row
    uid, cwd, app_env, reason, slot_env = (data / f"run-{manual}").read_text().split(" ")
    assert int(uid) >= 61000, "a cron run must not run as root"
    # a run works in the app's live release (its files, as deployed)
    release = k.home / "apps" / "crony" / "releases" / "v1"
    assert (cwd, app_env, reason, slot_env) == (str(release), "crony", "manual", "\n")
    assert int(uid) == psutil.Process(cli_json(k, "ps")[0]["instances"][0]["pid"]).uids().real

    # a failing job: its real exit code, through the kernel's instance.wait
    failing = cli_json(k, "cron", "run", "crony.fail")["run"]
    row = wait_for(lambda: finished(k, "crony.fail", failing))
    assert (row["state"], row["exit_code"], row["signal"]) == ("failed", 3, None), row

    # a job past its timeout: the shell ignores SIGTERM, its child too; both die at SIGKILL
    slow = cli_json(k, "cron", "run", "crony.slow")["run"]
    # until the shell's child has exec'd sleep (before that, the forked child is still "sh")
    def slept() -> list[psutil.Process] | None:
        ps = slow_procs()
        return ps if any(p.info["name"] == "sleep" for p in ps) else None

    procs = wait_for(slept, timeout=5)
    assert len(procs) >= 2, procs
    row = wait_for(lambda: finished(k, "crony.slow", slow), timeout=15)
    assert (row["state"], row["signal"]) == ("timeout", 9), row
    assert 2000 <= row["duration_ms"] < 6000, row
    assert "timed out after 2s" in row["note"]
    wait_for(lambda: not slow_procs(), timeout=5)
    for p in procs:
        assert not p.is_running() or p.status() == psutil.STATUS_ZOMBIE

    # ls: the next run in the job's zone and in UTC
    ls = k.cli("cron", "ls")
    assert ls.returncode == 0, ls.stderr
    line = next(x for x in ls.stdout.splitlines() if x.startswith("crony.dst "))
    assert re.search(r"America/New_York\s+20\d\d-\d\d-\d\dT0[23]:30:00-0[45]:00\s+"
                     r"20\d\d-\d\d-\d\dT0[67]:30:00\.000Z", line), line
    tick = next(j for j in cli_json(k, "cron", "ls")["jobs"] if j["job"] == "crony.tick")
    assert tick["next_utc"] == iso(slot)

    # next: the DST gap of 2026-03-08 in New York, and what happens to the 02:30 run
    nxt = k.cli("cron", "next", "crony.dst", "-n", "3", "--from", "2026-03-08T06:00:00Z")
    assert nxt.returncode == 0, nxt.stderr
    assert re.search(r"^  2026-03-08T03:00:00-04:00 +2026-03-08T07:00:00.000Z$", nxt.stdout, re.M)
    assert re.search(r"warning: DST change on 2026-03-08 \(America/New_York\).*02:30 does not "
                     r"exist.*03:00", nxt.stdout), nxt.stdout

    # show: where it runs
    show = cli_json(k, "cron", "show", "crony.tick")
    assert show["uid"] == int(uid) and show["cwd"] == str(release)
    text = k.cli("cron", "show", "crony.tick").stdout
    assert re.search(rf"^uid\s+{uid}$", text, re.M) and re.search(rf"^cwd\s+{release}$", text,
                                                                   re.M)

    # the scheduled fire at the minute boundary of the cron clock
    assert not [r for r in runs(k, "crony.tick") if r["reason"] == "scheduled"], \
        "the scheduled fire came before the manual checks: raise lead_s"
    row = wait_for(lambda: next((r for r in runs(k, "crony.tick")
                                 if r["reason"] == "scheduled" and r["state"] == "succeeded"),
                                None), timeout=30)
    assert row["slot"] == iso(slot) and row["exit_code"] == 0, row
    assert 0 <= row["delay_ms"] < 2000, row
    uid2, cwd2, app2, reason2, slot2 = (data / f"run-{row['id']}").read_text().split()
    assert (uid2, cwd2, app2, reason2) == (uid, str(release), "crony", "scheduled")
    assert slot2 == iso(slot)


def test_history_survives_kill9_of_the_cron_driver_and_of_the_kernel(public_dir: Path) -> None:
    """kill -9 of the cron driver, then of corrald, between runs: the history is intact, the
    slot that ran is not run again, and the next slot runs once."""
    k, slot = start_kernel(public_dir / "k", lead_s=8.0)
    try:
        app = cron_app(public_dir / "app", "keep")
        r = k.cli("up", str(app))
        assert r.returncode == 0, r.stderr
        manual = cli_json(k, "cron", "run", "keep.fail")["run"]
        wait_for(lambda: finished(k, "keep.fail", manual))
        first = wait_for(lambda: next((r for r in runs(k, "keep.tick")
                                       if r["slot"] == iso(slot) and r["state"] == "succeeded"),
                                      None), timeout=30)
        before = {"keep.tick": runs(k, "keep.tick"), "keep.fail": runs(k, "keep.fail")}

        old = drivers(k)["cron"]
        os.kill(old["pid"], signal.SIGKILL)
        wait_for(lambda: (lambda d: d["state"] == "running" and d["pid"] != old["pid"])(
            drivers(k)["cron"]))
        wait_for(lambda: k.cli("cron", "ls").returncode == 0)
        assert runs(k, "keep.tick") == before["keep.tick"]
        assert runs(k, "keep.fail") == before["keep.fail"]

        k.kill9()
        k.start()
        wait_for(lambda: all_running(k))
        wait_for(lambda: k.cli("cron", "runs", "keep.tick").returncode == 0)
        assert runs(k, "keep.tick") == before["keep.tick"]
        assert runs(k, "keep.fail") == before["keep.fail"]

        # the scheduler still works after both restarts, and the next slot runs exactly once
        nxt = slot + timedelta(minutes=1)
        try:
            wait_for(lambda: next((r for r in runs(k, "keep.tick")
                                   if r["slot"] == iso(nxt) and r["state"] == "succeeded"),
                                  None), timeout=75, step=0.5)
        except AssertionError:
            print("runs:", json.dumps(runs(k, "keep.tick"), indent=1))
            print("\n".join(ln for ln in k.log_path.read_text().splitlines()
                            if "BYE" not in ln and "peer said" not in ln))
            for name in ("cron", "fs", "log"):
                log = k.home / "drivers" / f"{name}.log"
                if log.exists():
                    print(f"--- {name}\n{log.read_text()[-3000:]}")
            raise
        # a manual run through the restarted kernel still reports the real exit code
        again = cli_json(k, "cron", "run", "keep.fail")["run"]
        row = wait_for(lambda: finished(k, "keep.fail", again))
        assert row["exit_code"] == 3, row
        slots = Counter(r["slot"] for r in runs(k, "keep.tick") if r["slot"])
        assert slots[iso(slot)] == 1 and slots[iso(nxt)] == 1, slots
        assert all(n == 1 for n in slots.values()), slots
        assert next(r for r in runs(k, "keep.tick") if r["id"] == first["id"]) == first
    finally:
        k.teardown()
