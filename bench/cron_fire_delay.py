"""Cron fire delay: how late after its instant the scheduler starts a run (goal p99 <= 20 ms).

Real clock, real processes (`true` through /bin/sh in a new session). N jobs fire every minute,
each with its own fixed jitter, so that runs are spread over the minute and each fire is
measured on its own. CRON_BENCH_MINUTES (default 3) sets the length, CRON_BENCH_JOBS (20) N.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
from pathlib import Path

from corral_cron import AppContext, CronStore, LocalLauncher, Scheduler, SystemClock, load_jobs


async def main() -> None:
    minutes = float(os.environ.get("CRON_BENCH_MINUTES", "3"))
    jobs = int(os.environ.get("CRON_BENCH_JOBS", "20"))
    with tempfile.TemporaryDirectory() as home:
        store = CronStore(Path(home) / "cron.sqlite3")
        scheduler = Scheduler(store, LocalLauncher(), SystemClock())
        table = {f"j{i}": {"schedule": "* * * * *", "command": "true", "jitter": "55s"}
                 for i in range(jobs)}
        await scheduler.set_app(AppContext("bench", home, {"PATH": "/usr/bin:/bin"}),
                                load_jobs("bench", table))
        task = asyncio.ensure_future(scheduler.run())
        await asyncio.sleep(minutes * 60)
        scheduler.stop()
        await task
        delays = sorted(r["delay_ms"] for i in range(jobs) for r in store.runs(f"bench.j{i}")
                        if r["delay_ms"] is not None)
        store.close()
    if not delays:
        print("cron_fire_delay: no runs (run for at least 1 minute)")
        return
    p50 = statistics.median(delays)
    p99 = delays[min(len(delays) - 1, int(len(delays) * 0.99))]
    print(f"cron_fire_delay_samples: {len(delays)} runs ({jobs} jobs x {minutes:g} min)")
    print(f"cron_fire_delay_p50: {p50:.0f} ms (goal: p99 <= 20 ms)")
    print(f"cron_fire_delay_p99: {p99:.0f} ms (goal <= 20 ms)")
    print(f"cron_fire_delay_max: {delays[-1]:.0f} ms")


if __name__ == "__main__":
    asyncio.run(main())
