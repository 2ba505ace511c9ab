"""Idle CPU of the cron scheduler holding 10,000 jobs (goal: no measurable CPU, R12).

The jobs are daily at times that do not fall in the measurement window. CPU is this process's
user+system time (psutil) over CRON_BENCH_IDLE_SECONDS (default 30).
"""

from __future__ import annotations

import asyncio
import os
import random
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import psutil

from corral_cron import AppContext, CronStore, LocalLauncher, Scheduler, SystemClock, load_jobs


async def main() -> None:
    seconds = float(os.environ.get("CRON_BENCH_IDLE_SECONDS", "30"))
    count = int(os.environ.get("CRON_BENCH_JOBS", "10000"))
    hour = (datetime.now(UTC).hour + 2) % 24  # keeps every job out of the window
    rng = random.Random(1)
    table = {f"j{i}": {"schedule": f"{rng.randrange(60)} {(hour + rng.randrange(20)) % 24} * * *",
                       "command": "true"} for i in range(count)}
    me = psutil.Process()
    with tempfile.TemporaryDirectory() as home:
        store = CronStore(Path(home) / "cron.sqlite3")
        scheduler = Scheduler(store, LocalLauncher(), SystemClock())
        t0 = time.perf_counter()
        await scheduler.set_app(AppContext("bench", home, {}), load_jobs("bench", table))
        task = asyncio.ensure_future(scheduler.run())
        await asyncio.sleep(2)  # the first pass decides every job once
        setup = time.perf_counter() - t0
        wakeups = scheduler.wakeups
        before, wall0 = me.cpu_times(), time.monotonic()
        await asyncio.sleep(seconds)
        after, wall1 = me.cpu_times(), time.monotonic()
        scheduler.stop()
        await task
        store.close()
    cpu = (after.user - before.user) + (after.system - before.system)
    print(f"cron_idle_jobs: {count}")
    print(f"cron_idle_setup: {setup:.1f} s to schedule them")
    print(f"cron_idle_cpu: {100 * cpu / (wall1 - wall0):.3f} % of one core over {seconds:g} s "
          f"(goal: no measurable CPU)")
    print(f"cron_idle_wakeups: {scheduler.wakeups - wakeups} in {seconds:g} s "
          "(heartbeat every 30 s)")
    print(f"cron_idle_rss: {me.memory_info().rss / 2**20:.0f} MiB")


if __name__ == "__main__":
    asyncio.run(main())
