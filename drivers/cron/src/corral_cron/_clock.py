"""Clocks (R12): wall time to know which slot is due, monotonic time to sleep and to time out."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Protocol


class Clock(Protocol):
    """What the scheduler reads time from; tests inject corral_cron.testing.FakeClock."""

    def now(self) -> datetime:
        """Wall time, aware, UTC. May jump (NTP step, admin, suspend)."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never jumps; only differences are meaningful."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Sleep ``seconds`` of monotonic time (cancellable)."""
        ...


class SystemClock:
    """The host's clocks; ``offset`` shifts the wall time (benches and real-time tests only)."""

    def __init__(self, offset: timedelta = timedelta(0)) -> None:
        self.offset = offset

    def now(self) -> datetime:
        """Wall time plus the offset, aware UTC."""
        return datetime.now(UTC) + self.offset

    def monotonic(self) -> float:
        """time.monotonic(), the clock asyncio's timers run on."""
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        """asyncio.sleep on the event loop's monotonic clock."""
        await asyncio.sleep(max(0.0, seconds))
