"""Test doubles shipped for users of corral_cron: a controlled clock and a recording launcher."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import signal as signals
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from corral_cron._launcher import ExitStatus, JobProcess, LaunchRequest


async def settle(rounds: int = 50) -> None:
    """Let every ready task run until the loop is idle (no real I/O involved)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


class FakeClock:
    """A Clock whose wall and monotonic time only move when the test says so.

    ``advance`` moves both clocks together, waking sleepers in deadline order (each at its
    own deadline); ``jump`` steps the wall clock alone, like an NTP step or a manual change.
    """

    def __init__(self, start: datetime) -> None:
        if start.tzinfo is None:
            raise ValueError("FakeClock needs an aware start time")
        self._wall = start
        self._mono = 1000.0
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def now(self) -> datetime:
        """Controlled wall time."""
        return self._wall

    def monotonic(self) -> float:
        """Controlled monotonic time."""
        return self._mono

    async def sleep(self, seconds: float) -> None:
        """Sleep until ``advance`` has moved monotonic time by ``seconds``."""
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._mono + seconds, next(self._seq), future))
        await future

    async def advance(self, seconds: float) -> None:
        """Move both clocks forward, waking each sleeper at its deadline, then settle."""
        target = self._mono + seconds
        await settle()
        while self._sleepers and self._sleepers[0][0] <= target:
            deadline, _, future = heapq.heappop(self._sleepers)
            if future.done():
                continue
            self._step(deadline - self._mono)
            future.set_result(None)
            await settle()
        self._step(target - self._mono)
        await settle()

    async def advance_to(self, instant: datetime) -> None:
        """``advance`` until the wall clock reads ``instant``."""
        await self.advance((instant - self._wall).total_seconds())

    def jump(self, seconds: float) -> None:
        """Step the wall clock alone (monotonic time does not move)."""
        self._wall += timedelta(seconds=seconds)

    def _step(self, seconds: float) -> None:
        if seconds > 0:
            self._mono += seconds
            self._wall += timedelta(seconds=seconds)


@dataclass
class FakeProcess:
    """A pretend run: ends when ``finish`` is called, after ``duration``, or on a signal."""

    request: LaunchRequest
    pid: int
    started_at: datetime
    ignores_term: bool = False
    signals: list[int] = field(default_factory=list)
    _done: asyncio.Future[ExitStatus] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())

    async def wait(self) -> ExitStatus:
        """Wait for the pretend exit."""
        return await asyncio.shield(self._done)

    def signal(self, sig: int) -> None:
        """Record the signal; SIGKILL (and SIGTERM unless ignored) ends the process."""
        if self._done.done():
            return
        self.signals.append(sig)
        if sig == signals.SIGKILL or (sig == signals.SIGTERM and not self.ignores_term):
            self._done.set_result(ExitStatus(None, sig, "killed\n"))

    def finish(self, exit_code: int = 0, output: str = "") -> None:
        """End the process with ``exit_code``."""
        if not self._done.done():
            self._done.set_result(ExitStatus(exit_code, None, output))

    @property
    def running(self) -> bool:
        """Not ended yet."""
        return not self._done.done()


class RecordingLauncher:
    """A JobLauncher that records each start (with the clock's time) and starts nothing.

    ``duration`` makes every run end by itself with ``exit_code`` after that many seconds of
    the clock; ``None`` leaves runs going until the test calls ``finish`` or they are killed.
    """

    def __init__(self, clock: FakeClock, *, duration: float | None = 1.0, exit_code: int = 0,
                 ignores_term: bool = False) -> None:
        self.clock = clock
        self.duration = duration
        self.exit_code = exit_code
        self.ignores_term = ignores_term
        self.started: list[FakeProcess] = []
        self._pids = itertools.count(10_000)
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, request: LaunchRequest) -> JobProcess:
        """Record the start; schedule the pretend exit."""
        proc = FakeProcess(request, next(self._pids), self.clock.now(),
                           ignores_term=self.ignores_term)
        self.started.append(proc)
        if self.duration is not None:
            task = asyncio.ensure_future(self._end(proc, self.duration))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return proc

    async def _end(self, proc: FakeProcess, after: float) -> None:
        await self.clock.sleep(after)
        proc.finish(self.exit_code, "done\n")

    def slots(self) -> list[str]:
        """CORRAL_CRON_SLOT of every start, in order."""
        return [p.request.env["CORRAL_CRON_SLOT"] for p in self.started]
