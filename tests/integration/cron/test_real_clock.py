"""Real clock, real processes: a job overruns its timeout and its whole process group dies."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psutil

from conftest import require
from corral_cron import AppContext, CronStore, LocalLauncher, Scheduler, SystemClock, load_jobs


def _gone(pid: int) -> bool:
    """Dead, or a zombie waiting for a reaper that is not us (PID 1 of this container)."""
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def _clock_near_minute(lead: float = 1.5) -> SystemClock:
    """A wall clock shifted so that the next minute boundary is ``lead`` seconds away."""
    now = datetime.now(UTC)
    boundary = now.replace(second=0, microsecond=0) + timedelta(minutes=1)
    return SystemClock(offset=boundary - now - timedelta(seconds=lead))


async def _run(tmp_path: Path, table: dict[str, dict[str, object]], wait: float
               ) -> tuple[CronStore, Scheduler]:
    store = CronStore(tmp_path / "cron.sqlite3")
    scheduler = Scheduler(store, LocalLauncher(), _clock_near_minute())
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    await scheduler.set_app(AppContext("shop", str(tmp_path), env), load_jobs("shop", table))
    task = asyncio.ensure_future(scheduler.run())
    await asyncio.sleep(wait)
    scheduler.stop()
    await task
    return store, scheduler


def test_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    """A shell ignoring SIGTERM and its child `sleep` are both gone after timeout + grace."""
    require(shutil.which("sleep") is not None, "needs sleep(1)")
    script = ("trap '' TERM; sleep 60 & echo $! > child.pid; echo $$ > shell.pid; "
              "echo started; wait; echo not-reached")
    table: dict[str, dict[str, object]] = {"j": {
        "schedule": "* * * * *", "command": script, "timeout": "1s", "kill_grace": "1s"}}
    store, _ = asyncio.run(_run(tmp_path, table, wait=5.0))
    (row,) = store.runs("shop.j")
    assert row["state"] == "timeout" and row["signal"] == 9, row
    assert row["output_tail"] == "started\n"
    shell, child = (int((tmp_path / f).read_text()) for f in ("shell.pid", "child.pid"))
    deadline = time.monotonic() + 2
    while not (_gone(shell) and _gone(child)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(shell), f"shell {shell} survived"
    assert _gone(child), f"child sleep {child} survived: the group was not killed"
    assert 0 <= row["delay_ms"] < 200
    assert 1900 <= row["duration_ms"] < 3000  # 1 s timeout + 1 s grace


def test_on_time_run_records_history(tmp_path: Path) -> None:
    """A real run starts within milliseconds of its slot and its output tail is kept."""
    table: dict[str, dict[str, object]] = {"j": {"schedule": "* * * * *",
                   "command": "echo $CORRAL_CRON_JOB $CORRAL_CRON_REASON; exit 4"}}
    store, _ = asyncio.run(_run(tmp_path, table, wait=3.0))
    (row,) = store.runs("shop.j")
    assert row["state"] == "failed" and row["exit_code"] == 4
    assert row["output_tail"] == "j scheduled\n"
    assert 0 <= row["delay_ms"] < 100
