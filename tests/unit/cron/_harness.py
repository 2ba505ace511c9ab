"""A scheduler on a FakeClock with a RecordingLauncher and a real SQLite store."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from corral_cron import Alert, AppContext, CronStore, Scheduler, load_jobs
from corral_cron.testing import FakeClock, RecordingLauncher, settle


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


class Harness:
    """One scheduler process; ``restart`` replaces it by a new one on the same database."""

    def __init__(self, home: Path, clock: FakeClock, launcher: RecordingLauncher) -> None:
        self.home = home
        self.clock = clock
        self.launcher = launcher
        self.alerts: list[Alert] = []
        self.store = CronStore(home / "cron.sqlite3")
        self.scheduler = self._new()
        self.task: asyncio.Task[None] | None = None

    def _new(self) -> Scheduler:
        async def sink(alert: Alert) -> None:
            self.alerts.append(alert)
        return Scheduler(self.store, self.launcher, self.clock, alert=sink)

    async def start(self, jobs: dict[str, dict[str, Any]] | None = None) -> None:
        if jobs is not None:
            await self.scheduler.set_app(AppContext("shop", str(self.home), {"PATH": "/bin"}),
                                         load_jobs("shop", jobs))
        self.task = asyncio.ensure_future(self.scheduler.run())
        await settle()

    async def crash(self) -> None:
        """The scheduler process dies: its loop stops, its state in memory is lost."""
        assert self.task is not None
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        self.store.close()
        self.store = CronStore(self.home / "cron.sqlite3")
        self.scheduler = self._new()

    async def stop(self) -> None:
        self.scheduler.stop()
        if self.task is not None:
            await self.task

    def runs(self, job: str = "shop.j") -> list[dict[str, Any]]:
        return list(reversed(self.store.runs(job, 10_000)))


def scenario(start: str, *, duration: float | None = 1.0, exit_code: int = 0,
             ignores_term: bool = False
             ) -> Callable[[Callable[[Harness], Awaitable[None]]], Callable[[Path], None]]:
    """Decorate ``async def test(h)``: runs it on a fresh harness at ``start`` (UTC)."""

    def wrap(fn: Callable[[Harness], Awaitable[None]]) -> Callable[[Path], None]:
        def test(tmp_path: Path) -> None:
            async def main() -> None:
                clock = FakeClock(utc(start))
                h = Harness(tmp_path, clock, RecordingLauncher(
                    clock, duration=duration, exit_code=exit_code, ignores_term=ignores_term))
                try:
                    await fn(h)
                finally:
                    if h.task is not None and not h.task.done():
                        h.task.cancel()
                        await asyncio.gather(h.task, return_exceptions=True)
                    h.store.close()
            asyncio.run(main())
        test.__name__ = fn.__name__
        test.__doc__ = fn.__doc__
        return test
    return wrap
