"""The scheduler (R5, R6, R7, R9, R10, R12): one heap of fire times, no polling loop.

The loop sleeps on the monotonic clock until the earliest entry (a job's next slot plus its
jitter, a heartbeat, a no-success deadline), re-reads the wall clock on waking, and decides
every slot from the job's persisted cursor: a slot is decided exactly once (run, queued or
skipped with a reason), in the same transaction that advances the cursor.

With ``slots`` (a ``SlotLedger``: the kernel's ledger when several hosts share it), a slot is
also claimed in the cluster before its run starts, so that it starts at most once in the
cluster: a slot another host claimed is recorded as skipped, naming the holder, and a job
that arrives on this host with claims of its own elsewhere (an app adopted from a lost host)
goes on from the newest slot claimed there: the slots missed meanwhile are decided by its
``missed`` policy, as after a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import signal as signals
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from itertools import count, islice
from typing import Any, Protocol

import structlog

from corral.errors import ConflictError, NotFoundError
from corral_cron._alerts import Alert, AlertSink, run_alert_command
from corral_cron._clock import Clock
from corral_cron._duration import format_duration
from corral_cron._job import MAX_GRACE, CronJob
from corral_cron._launcher import ExitStatus, JobLauncher, JobProcess, LaunchRequest
from corral_cron._slots import iter_slots, next_slots
from corral_cron._store import CronStore, iso

log = structlog.get_logger("corral.cron")

HEARTBEAT_EVERY = 30.0  # seconds between check-ins (also bounds forward-jump detection)
MAX_SLEEP = 60.0
CLOCK_JUMP = 1.0  # wall and monotonic elapsed differing by more than this is a clock jump
MISSED_LISTED = 1000  # missed slots recorded one by one; beyond, one summary record
ON_TIME = timedelta(seconds=60)  # a late wake-up is still "on time" within min(this, 1/2 period)


class SlotLedger(Protocol):
    """Slots claimed for the whole cluster (``corral_cron.ClusterSlots``)."""

    async def claim(self, job: CronJob, slot: datetime) -> str | None:
        """Claim ``slot`` of ``job`` for this host: None when it is this host's now (or was
        already), else who holds it, in words. Raises when the claim cannot be decided."""
        ...

    async def newest(self, job: CronJob) -> datetime | None:
        """The newest slot of ``job`` (same schedule) claimed for the app, on any host."""
        ...


@dataclass(frozen=True)
class AppContext:
    """Where an app's jobs run: its directory and the environment of its processes."""

    app: str
    directory: str
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class _Run:
    run_id: int
    slot: datetime | None
    reason: str
    process: JobProcess | None = None
    timed_out: bool = False
    replaced: bool = False
    done: asyncio.Event = field(default_factory=asyncio.Event)
    status: ExitStatus | None = None


@dataclass
class _JobState:
    job: CronJob
    ctx: AppContext
    cursor: datetime
    generation: int = 0
    running: dict[int, _Run] = field(default_factory=dict)
    waiting: tuple[int, datetime | None, str] | None = None
    backlog: deque[tuple[int, datetime, str]] = field(default_factory=deque)
    next_slot: datetime | None = None


class Scheduler:
    """Runs the jobs of every attached app on ``clock`` through ``launcher``."""

    def __init__(self, store: CronStore, launcher: JobLauncher, clock: Clock,
                 alert: AlertSink | None = None, slots: SlotLedger | None = None) -> None:
        self.slots = slots
        self.store = store
        self.launcher = launcher
        self.clock = clock
        self.alert_sink = alert
        self._jobs: dict[str, _JobState] = {}
        self._heap: list[tuple[datetime, int, str, str, int]] = []
        self._seq = count()
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._tasks: set[asyncio.Task[object]] = set()
        self._beat_gen = 0
        self.wakeups = 0  # times the loop woke from sleep, for tests and the idle bench

    # ---- jobs ------------------------------------------------------------------------------
    async def set_app(self, ctx: AppContext, jobs: list[CronJob]) -> None:
        """Schedule exactly ``jobs`` for ``ctx.app`` (attach / redeploy / sync)."""
        now = self.clock.now()
        keys = {j.key for j in jobs}
        for key in [k for k, st in self._jobs.items() if st.job.app == ctx.app and k not in keys]:
            await self._drop(key)
            self.store.forget_job(key)
        known = set(self.store.jobs(ctx.app))
        for stale in known - keys:
            self.store.forget_job(stale)
        for job in jobs:
            cursor = self.store.attach(job.key, job.app, job.fingerprint, job.spec, now)
            if job.key not in known and self.slots is not None:
                # new here: claimed elsewhere already (adopted)? go on from there
                newest = await self.slots.newest(job)
                if newest is not None and newest < cursor:
                    cursor = newest
                    self.store.set_cursor(job.key, newest)
            st = self._jobs.get(job.key)
            if st is None:
                st = self._jobs[job.key] = _JobState(job, ctx, cursor)
            else:
                st.job, st.ctx, st.cursor = job, ctx, max(cursor, st.cursor)
            st.generation += 1
            upcoming = next_slots(job, st.cursor, 1)
            st.next_slot = upcoming[0] if upcoming else None
            self._push(now, "slot", job.key, st.generation)  # decide what is due, then arm
            if job.no_success is not None:
                base = self.store.last_success(job.key) or self.store.attached_at(job.key) or now
                self._push(base + job.no_success, "no-success", job.key, st.generation)
        self._wake.set()

    async def remove_app(self, app: str) -> list[str]:
        """Unschedule an app's jobs, stop their runs, forget their state and history."""
        keys = [k for k, st in self._jobs.items() if st.job.app == app]
        for key in keys:
            await self._drop(key)
        return self.store.forget_app(app) or keys

    async def _drop(self, key: str) -> None:
        st = self._jobs.pop(key)
        st.generation += 1
        for run in list(st.running.values()):
            self._terminate(st, run)
        await asyncio.gather(*(r.done.wait() for r in list(st.running.values())))

    def job(self, key: str) -> CronJob:
        """The scheduled job ``key`` ('<app>.<name>'); NotFoundError names the known ones."""
        st = self._jobs.get(key)
        if st is None:
            raise NotFoundError(f"no cron job {key!r} (known: {', '.join(sorted(self._jobs))})")
        return st.job

    def jobs(self) -> list[CronJob]:
        """Every scheduled job, by key."""
        return [self._jobs[k].job for k in sorted(self._jobs)]

    def context(self, key: str) -> AppContext:
        """The app context a job runs in."""
        self.job(key)
        return self._jobs[key].ctx

    def next_slot(self, key: str) -> datetime | None:
        """The next undecided slot of a job (UTC)."""
        self.job(key)
        return self._jobs[key].next_slot

    def running(self, key: str) -> list[int]:
        """Run ids of the job's runs in progress."""
        self.job(key)
        return sorted(self._jobs[key].running)

    async def wait_run(self, run_id: int) -> None:
        """Wait until run ``run_id`` has ended (tests, manual runs)."""
        for st in list(self._jobs.values()):
            run = st.running.get(run_id)
            if run is not None:
                await run.done.wait()
                return

    # ---- the loop --------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask the loop to return (runs in progress are left to finish on their own)."""
        self._stop.set()
        self._wake.set()

    async def run(self) -> None:
        """Serve until ``stop()``: sleep until the earliest entry, decide what is due."""
        now = self.clock.now()
        for rec in self.store.recover(now):
            log.warning("run interrupted by a scheduler restart", job=rec["job"], run=rec["id"])
        last_wall, last_mono = now, self.clock.monotonic()
        self._push(now, "heartbeat", "", self._beat_gen)
        while not self._stop.is_set():
            now, mono = self.clock.now(), self.clock.monotonic()
            jump = (now - last_wall).total_seconds() - (mono - last_mono)
            last_wall, last_mono = now, mono
            if abs(jump) > CLOCK_JUMP:
                self._clock_jumped(jump, now)
            due = []
            while self._heap and self._heap[0][0] <= now:
                due.append(heapq.heappop(self._heap))
            for at, _, kind, key, gen in due:
                await self._handle(kind, key, gen, at, now)
            if due:
                continue
            delay = (self._heap[0][0] - now).total_seconds() if self._heap else MAX_SLEEP
            await self._sleep(min(delay, MAX_SLEEP))
            self.wakeups += 1

    async def _sleep(self, seconds: float) -> None:
        self._wake.clear()
        sleeper = asyncio.ensure_future(self.clock.sleep(seconds))
        waker = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            waker.cancel()

    def _push(self, at: datetime, kind: str, key: str, gen: int) -> None:
        heapq.heappush(self._heap, (at, next(self._seq), kind, key, gen))

    def _clock_jumped(self, jump: float, now: datetime) -> None:
        # Slot entries are wall times decided from persisted cursors, so they stay right: a
        # forward jump makes them due (and the missed policy applies), a backward jump never
        # re-runs a decided slot. Only the heartbeat is re-armed on the new wall clock.
        log.warning("wall clock jumped", seconds=round(jump, 3))
        self._beat_gen += 1
        self._push(now, "heartbeat", "", self._beat_gen)

    async def _handle(self, kind: str, key: str, gen: int, at: datetime, now: datetime) -> None:
        if kind == "heartbeat":
            if gen == self._beat_gen:
                nxt = now + timedelta(seconds=HEARTBEAT_EVERY)
                self._push(nxt, "heartbeat", "", gen)
                self.store.beat(now, min(self._heap[0][0], nxt))
            return
        st = self._jobs.get(key)
        if st is None or st.generation != gen:
            return
        if kind == "slot":
            await self._decide(st, now)
        elif kind == "no-success":
            self._check_success(st, now)

    # ---- deciding slots (R5) ---------------------------------------------------------------
    async def _decide(self, st: _JobState, now: datetime) -> None:
        job = st.job
        due, unlisted = self._due(st, now)
        to_fire: list[tuple[datetime, str]] = []
        skipped: list[tuple[datetime | None, str, str]] = []
        if unlisted is not None:
            skipped.append(unlisted)
        missed = due
        if due:
            tolerance = min(ON_TIME, job.shortest_interval / 2)
            if now - (due[-1] + job.jitter) <= tolerance:
                to_fire.append((due[-1], "scheduled"))
                missed = due[:-1]
        backlog: list[datetime] = []
        if missed:
            if job.missed == "skip":
                skipped += [(s, "missed", "missed: the scheduler was not running at this time"
                             " (missed=skip)") for s in missed]
            elif job.missed == "once":
                newest = missed[-1]
                following = next_slots(job, newest, 1)
                period = (following[0] - newest) if following else MAX_GRACE
                grace = min(period, MAX_GRACE)
                late = now - (newest + job.jitter)
                if to_fire:
                    why = "a newer slot runs on time"
                    skipped += [(s, "missed", f"missed; {why} (missed=once)") for s in missed]
                elif late <= grace:
                    to_fire.append((newest, "catch-up"))
                    skipped += [(s, "missed", f"missed; only the newest missed slot "
                                 f"({iso(newest)}) runs (missed=once)") for s in missed[:-1]]
                else:
                    note = (f"missed; the newest missed slot ({iso(newest)}) was "
                            f"{format_duration(late)} late, beyond the grace window of "
                            f"{format_duration(grace)} (missed=once)")
                    skipped += [(s, "missed", note) for s in missed]
            else:
                backlog = missed[-job.backfill:]
                skipped += [(s, "missed", f"missed; beyond the backfill cap of {job.backfill} "
                             "(missed=all)") for s in missed[:-job.backfill]]
        if skipped:
            self.store.skip_many(job.key, skipped, now)
            newest_skip = max((s for s, _, _ in skipped if s is not None), default=None)
            await self._alert(st, "missed", now, f"{len(skipped)} slot(s) skipped"
                              + (f", newest {iso(newest_skip)}" if newest_skip else "")
                              + f": {skipped[-1][2]}")
        for slot in backlog:
            run_id = self.store.claim(job.key, slot, "catch-up", "queued", now,
                                      note="catch-up (missed=all): runs one after another")
            if run_id is not None:
                st.backlog.append((run_id, slot, "catch-up"))
        for slot, reason in to_fire:
            if st.backlog:  # behind the catch-up runs: one after another, oldest first
                run_id = self.store.claim(job.key, slot, reason, "queued", now)
                if run_id is not None:
                    st.backlog.append((run_id, slot, reason))
                continue
            await self._fire(st, slot, reason, now)
        if due:
            st.cursor = max(st.cursor, due[-1])
        self._pump(st)
        self._arm(st)

    def _due(self, st: _JobState, now: datetime
             ) -> tuple[list[datetime], tuple[datetime | None, str, str] | None]:
        job = st.job
        due: list[datetime] = []
        for slot in iter_slots(job.schedule, job.zone, st.cursor):
            if slot + job.jitter > now:
                return due, None
            due.append(slot)
            if len(due) >= MISSED_LISTED:
                break
        # Too many to list one by one (down for a long time): one summary record, then list
        # only the recent ones, enough for the missed policy (grace <= 1 h, backfill cap).
        window = max(timedelta(hours=2), job.shortest_interval * 2 * job.backfill)
        tail_from = max(now - window, due[-1])
        st.cursor = tail_from  # the summarised range counts as decided
        self.store.set_cursor(job.key, tail_from)
        tail = [s for s in islice(iter_slots(job.schedule, job.zone, tail_from), MISSED_LISTED)
                if s + job.jitter <= now]
        note = (f"missed: more than {MISSED_LISTED} slots from {iso(due[0])} to "
                f"{iso(tail_from)} while the scheduler was not running; not listed one by one")
        return tail, (None, "missed", note)

    def _arm(self, st: _JobState) -> None:
        nxt = next_slots(st.job, st.cursor, 1)
        st.next_slot = nxt[0] if nxt else None
        if st.next_slot is not None:
            self._push(st.next_slot + st.job.jitter, "slot", st.job.key, st.generation)

    # ---- overlap (R6) ----------------------------------------------------------------------
    async def _fire(self, st: _JobState, slot: datetime | None, reason: str,
                    now: datetime) -> int | None:
        job = st.job
        busy = list(st.running.values())
        if busy and job.overlap == "forbid":
            note = (f"overlap=forbid: run {busy[0].run_id} "
                    f"({iso(busy[0].slot) if busy[0].slot else 'manual'}) is still running")
            if slot is not None:
                self.store.skip_many(job.key, [(slot, reason, note)], now)
                await self._alert(st, "missed", now, f"slot {iso(slot)} skipped: {note}")
            return None
        if busy and job.overlap == "queue" and (st.waiting or st.backlog):
            note = "overlap=queue: one run is already waiting"
            if slot is not None:
                self.store.skip_many(job.key, [(slot, reason, note)], now)
                await self._alert(st, "missed", now, f"slot {iso(slot)} skipped: {note}")
            return None
        start_now = not busy or job.overlap == "allow"
        run_id = self.store.claim(job.key, slot, reason, "queued" if not start_now else "claimed",
                                  now)
        if run_id is None:
            log.info("slot already claimed, not starting it again", job=job.key,
                     slot=iso(slot) if slot else None)
            return None
        if start_now:
            self._start(st, run_id, slot, reason)
            return run_id
        if st.waiting is not None:  # replace: a newer slot supersedes the one waiting
            self.store.finished(st.waiting[0], "skipped", now,
                                note="overlap=replace: superseded by a newer slot")
        st.waiting = (run_id, slot, reason)
        if job.overlap == "replace":
            for run in busy:
                self._terminate(st, run)
        return run_id

    def _pump(self, st: _JobState) -> None:
        if st.running:
            return
        if st.waiting is not None:
            run_id, slot, reason = st.waiting
            st.waiting = None
            self._start(st, run_id, slot, reason)
        elif st.backlog:
            run_id, slot, reason = st.backlog.popleft()
            self._start(st, run_id, slot, reason)

    def _terminate(self, st: _JobState, run: _Run) -> None:
        run.replaced = True
        if run.process is not None:
            self._spawn(self._kill_group(run.process, st.job.kill_grace))

    async def _kill_group(self, process: JobProcess, grace: timedelta) -> None:
        process.signal(signals.SIGTERM)
        await self.clock.sleep(grace.total_seconds())
        process.signal(signals.SIGKILL)

    # ---- manual runs -----------------------------------------------------------------------
    async def run_now(self, key: str) -> int:
        """Start a manual run (recorded as reason 'manual'); overlap policy applies."""
        self.job(key)
        st = self._jobs[key]
        if st.running and st.job.overlap in ("forbid", "queue"):
            run_id = min(st.running)
            raise ConflictError(
                f"cron job {key!r} is running (run {run_id}) and its overlap policy is "
                f"{st.job.overlap!r}", kind="cron-run", key=key, holder=f"run {run_id}")
        started = await self._fire(st, None, "manual", self.clock.now())
        assert started is not None
        return started

    # ---- running (R7, R9) ------------------------------------------------------------------
    def _start(self, st: _JobState, run_id: int, slot: datetime | None, reason: str) -> None:
        run = _Run(run_id, slot, reason)
        st.running[run_id] = run
        self._spawn(self._execute(st, run))

    def _spawn(self, coro: Coroutine[Any, Any, object]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _execute(self, st: _JobState, run: _Run) -> None:
        job, ctx = st.job, st.ctx
        env = dict(ctx.env)
        env.update({
            "CORRAL_APP": job.app,
            "CORRAL_CRON_JOB": job.name,
            "CORRAL_CRON_RUN": str(run.run_id),
            "CORRAL_CRON_REASON": run.reason,
            "CORRAL_CRON_SLOT": iso(run.slot) if run.slot else "",
        })
        request = LaunchRequest(job.key, job.app, job.name, run.run_id, job.command, env,
                                ctx.directory)
        started = self.clock.now()
        try:
            if run.slot is not None and self.slots is not None:
                holder = await self._claim_in_cluster(st, run)
                if holder is not None:
                    self.store.finished(run.run_id, "skipped", self.clock.now(), note=holder)
                    return
            try:
                process = await self.launcher.start(request)
            except Exception as exc:
                self.store.finished(run.run_id, "failed", self.clock.now(),
                                    note=f"could not start: {exc}")
                await self._alert(st, "failure", self.clock.now(),
                                  f"run {run.run_id} could not start: {exc}", run.run_id)
                return
            run.process = process
            delay = None if run.slot is None else round(
                (started - (run.slot + job.jitter)).total_seconds() * 1000)
            self.store.started(run.run_id, started, delay, process.pid)
            t0 = self.clock.monotonic()
            if run.replaced:
                self._spawn(self._kill_group(process, job.kill_grace))
            watchdog = asyncio.ensure_future(self._watchdog(run, process, job))
            try:
                status = await process.wait()
            finally:
                watchdog.cancel()
            run.status = status
            ended = self.clock.now()
            duration = round((self.clock.monotonic() - t0) * 1000)
            if run.timed_out:
                state = "timeout"
            elif run.replaced:
                state = "replaced"
            else:
                state = "succeeded" if status.succeeded else "failed"
            note = status.note
            if run.timed_out:
                note = f"timed out after {format_duration(job.timeout)}" + (
                    " (default timeout)" if job.timeout_is_default else "")
            self.store.finished(run.run_id, state, ended, duration_ms=duration,
                                exit_code=status.exit_code, signal=status.signal,
                                output_tail=status.output_tail, note=note)
            if state == "timeout":
                await self._alert(st, "timeout", ended, f"run {run.run_id}: {note}", run.run_id)
            elif state == "failed":
                how = (f"exit code {status.exit_code}" if status.exit_code is not None
                       else f"signal {status.signal}")
                await self._alert(st, "failure", ended, f"run {run.run_id} failed: {how}",
                                  run.run_id)
        finally:
            st.running.pop(run.run_id, None)
            run.done.set()
            if self._jobs.get(job.key) is st:
                self._pump(st)

    async def _claim_in_cluster(self, st: _JobState, run: _Run) -> str | None:
        """Claim the run's slot in the cluster; why not to start it, or None to start it."""
        assert self.slots is not None and run.slot is not None
        try:
            holder = await self.slots.claim(st.job, run.slot)
        except Exception as exc:  # at most once: a slot nobody can vouch for does not run
            note = (f"not started: the cluster's ledger did not record the slot ({exc}); "
                    "at most once, so it is skipped")
            await self._alert(st, "missed", self.clock.now(),
                              f"slot {iso(run.slot)} skipped: {note}")
            return note
        if holder is None:
            return None
        log.info("slot claimed on another host, not started here", job=st.job.key,
                 slot=iso(run.slot), holder=holder)
        return f"not started here: the slot was claimed in the cluster ({holder})"

    async def _watchdog(self, run: _Run, process: JobProcess, job: CronJob) -> None:
        await self.clock.sleep(job.timeout.total_seconds())
        run.timed_out = True
        await self._kill_group(process, job.kill_grace)

    # ---- alerts (R10) ----------------------------------------------------------------------
    def _check_success(self, st: _JobState, now: datetime) -> None:
        job = st.job
        assert job.no_success is not None
        last = self.store.last_success(job.key)
        if last is not None and now - last < job.no_success:
            self._push(last + job.no_success, "no-success", job.key, st.generation)
            return
        since = f"since {iso(last)}" if last else "since it was scheduled"
        self._spawn(self._alert(st, "no-success", now,
                                f"no successful run in {format_duration(job.no_success)} "
                                f"({since})"))
        self._push(now + job.no_success, "no-success", job.key, st.generation)

    async def _alert(self, st: _JobState, event: str, now: datetime, detail: str,
                     run_id: int | None = None) -> None:
        job = st.job
        if event not in job.alerts.on:
            return
        alert = Alert(event, job.key, now, detail, run_id)
        log.warning("cron alert", alert=alert.event, job=alert.job, detail=alert.detail)
        if self.alert_sink is not None:
            with contextlib.suppress(Exception):
                await self.alert_sink(alert)
        if job.alerts.command:
            self._spawn(run_alert_command(job.alerts.command, alert, dict(st.ctx.env)))
