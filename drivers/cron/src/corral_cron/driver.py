"""The cron driver process: CDP/1 operations over the scheduler (app.attach ... query.cron.*)."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any

import structlog

from corral.errors import CorralError, ErrorCode, NotFoundError
from corral.protocol import AppAttach, AppDetach, AppSpec, StateSync, Welcome
from corral.sdk import Driver, op, run
from corral_cron import DRIVER
from corral_cron._alerts import Alert, check_heartbeat
from corral_cron._clock import SystemClock
from corral_cron._duration import format_duration
from corral_cron._job import CronJob, load_jobs
from corral_cron._kernel_launcher import KernelLauncher
from corral_cron._launcher import JobLauncher, LocalLauncher
from corral_cron._preview import preview, warnings
from corral_cron._scheduler import AppContext, Scheduler
from corral_cron._store import CronStore, iso

log = structlog.get_logger("corral.cron")


def clock_offset(config: dict[str, Any]) -> timedelta:
    """``clock_offset_s`` of the host config: shifts the scheduler's wall clock (tests, ops)."""
    raw = config.get("clock_offset_s", 0)
    try:
        return timedelta(seconds=float(raw))
    except (TypeError, ValueError):
        raise CorralError(f"[drivers.cron] clock_offset_s: expected seconds, got {raw!r}",
                          code=ErrorCode.INVALID) from None


def parse_instant(text: str, zone: tzinfo) -> datetime:
    """An ISO 8601 time for ``cron next --from``: with 'Z' or an offset it is that instant;
    without one it is a wall-clock time in ``zone``, the job's zone (the zone the preview
    shows first). A wall-clock time that happens twice (the hour a DST change repeats) is the
    first of the two; one that never happens (the hour skipped) is read with the offset in
    force before the change, so it lands just after it. Returned in UTC."""
    try:
        value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise CorralError(f"from: {text!r} is not an ISO 8601 time (e.g. 2026-03-08T06:00:00, "
                          "read in the job's zone, or 2026-03-08T06:00:00Z)",
                          code=ErrorCode.INVALID) from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=zone, fold=0)
    return value.astimezone(UTC)


class CronDriver(Driver):
    """Schedules every attached app's [cron.NAME] jobs; history in <home>/cron.sqlite3."""

    name = "cron"
    capability = "cron"
    description = DRIVER  # its [section]s, checked by manifest.check
    version = "0.1.0"

    def __init__(self) -> None:
        super().__init__()
        self.store: CronStore | None = None
        self.scheduler: Scheduler | None = None
        self._loop: asyncio.Task[None] | None = None
        self._apps: dict[str, AppSpec] = {}

    async def start(self) -> None:
        """Begin now if the config was given before start (embedding, tests); under the SDK
        the kernel hands it over later, in WELCOME (see ``welcomed``)."""
        if self.config and self.scheduler is None:
            self._begin()

    def welcomed(self, welcome: Welcome) -> None:
        """Take the kernel's config; on the first welcome, open the state and start the
        scheduler (``start()`` runs before the kernel handed over home and config)."""
        super().welcomed(welcome)
        if self.scheduler is None:
            self._begin()

    def _begin(self) -> None:
        self.store = CronStore(self.home / "cron.sqlite3")
        launcher: JobLauncher = (LocalLauncher() if self.config.get("launcher") == "local"
                                 else KernelLauncher(self.kernel))
        self.scheduler = Scheduler(self.store, launcher, SystemClock(clock_offset(self.config)),
                                   alert=self._publish)
        self._loop = asyncio.ensure_future(self._serve(self.scheduler))

    async def _serve(self, scheduler: Scheduler) -> None:
        """Schedule the apps saved by the last run at once (a restart must not wait for the
        kernel's state.sync, which corrects the list when it comes), then run. On a ledger
        several hosts share, slots are claimed there first (``ClusterSlots``)."""
        assert self.store is not None
        if self.config.get("launcher") != "local" and await self._shared_ledger():
            from corral_cron._cluster import ClusterSlots

            scheduler.slots = ClusterSlots(self.kernel)
        for raw in self.store.saved_apps():
            try:
                await self._apply(AppSpec.model_validate(raw))
            except Exception as exc:  # a saved app that no longer loads: state.sync decides
                log.warning("saved app not rescheduled", app=raw.get("name"), error=str(exc))
        await scheduler.run()

    async def _shared_ledger(self) -> bool:
        """Whether the kernel's ledger is shared by several hosts (asked once, at start)."""
        try:
            status = await self.kernel.call("kernel.status")
        except CorralError as exc:
            log.warning("kernel status not read; slots claimed on this host only",
                        error=exc.reason)
            return False
        return bool(status.get("shared_ledger"))

    async def stop(self) -> None:
        """Stop the loop (runs in progress keep going: they belong to the kernel)."""
        if self.scheduler is not None:
            self.scheduler.stop()
        if self._loop is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop
        if self.store is not None:
            self.store.close()

    async def _publish(self, alert: Alert) -> None:
        app = alert.job.split(".", 1)[0] if alert.job else "_"
        await self.publish(f"cron.{app}.{alert.event}", alert.as_json())

    @property
    def _sched(self) -> Scheduler:
        if self.scheduler is None:
            raise CorralError("cron driver not started", code=ErrorCode.UNAVAILABLE)
        return self.scheduler

    # ---- lifecycle -------------------------------------------------------------------------
    @op("app.attach")
    async def attach(self, args: AppAttach) -> dict[str, Any]:
        """Schedule the app's jobs (ManifestError lists every bad cron.NAME.field)."""
        return await self._apply(args.app)

    async def _apply(self, app: AppSpec) -> dict[str, Any]:
        jobs = load_jobs(app.name, app.manifest.get("cron"))
        await self._sched.set_app(AppContext(app.name, app.directory), jobs)
        self._apps[app.name] = app
        assert self.store is not None
        self.store.save_app(app.name, app.model_dump(mode="json"))
        now = self._sched.clock.now()
        return {"jobs": [j.key for j in jobs],
                "warnings": {j.key: w for j in jobs if (w := warnings(j, now))}}

    @op("app.detach")
    async def detach(self, args: AppDetach) -> dict[str, Any]:
        """Unschedule the app's jobs and forget their state and history."""
        self._apps.pop(args.app, None)
        return {"removed": await self._sched.remove_app(args.app)}

    @op("state.sync")
    async def sync(self, args: StateSync) -> dict[str, Any]:
        """Re-apply every app's jobs; drop jobs of apps that are gone."""
        live = {a.name for a in args.apps}
        for app in args.apps:
            await self._apply(app)
        assert self.store is not None
        gone = {key.split(".", 1)[0] for key in self.store.jobs()} - live
        gone |= {j.app for j in self._sched.jobs()} - live
        gone |= {str(a.get("name")) for a in self.store.saved_apps()} - live
        for name in gone:
            await self._sched.remove_app(name)
            self._apps.pop(name, None)
        return {"apps": sorted(live), "removed": sorted(gone)}

    # ---- queries ---------------------------------------------------------------------------
    def _job(self, args: dict[str, Any]) -> CronJob:
        name = str(args.get("job", ""))
        if "." in name:
            return self._sched.job(name)
        matches = [j for j in self._sched.jobs() if j.name == name]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise NotFoundError(f"no cron job {name!r}")
        raise CorralError(f"cron job {name!r} exists in several apps: "
                          f"{', '.join(j.key for j in matches)}; write <app>.<job>",
                          code=ErrorCode.INVALID)

    @op("query.cron.ls")
    async def ls(self, args: dict[str, Any]) -> dict[str, Any]:
        """Every job: schedule, zone, next run (zone and UTC), last result."""
        assert self.store is not None
        out = []
        for job in self._sched.jobs():
            nxt = self._sched.next_slot(job.key)
            last = next((r for r in self.store.runs(job.key, 20)
                         if r["state"] not in ("queued", "claimed")), None)
            out.append({
                "job": job.key, "schedule": job.schedule.expression, "timezone": job.zone.key,
                "next_local": nxt.astimezone(job.zone).isoformat() if nxt else None,
                "next_utc": iso(nxt) if nxt else None,
                "last": {k: last[k] for k in ("slot", "state", "started_at", "exit_code",
                                              "signal", "note")} if last else None,
                "running": self._sched.running(job.key),
            })
        alert = check_heartbeat(self.store, self._sched.clock.now())
        return {"jobs": out, "scheduler": alert.as_json() if alert else "ok"}

    @op("query.cron.next")
    async def next(self, args: dict[str, Any]) -> dict[str, Any]:
        """{job, n=10, from?}: the next runs in the job's zone and UTC, with warnings."""
        job = self._job(args)
        start = (parse_instant(str(args["from"]), job.zone) if args.get("from")
                 else self._sched.clock.now())
        return preview(job, start, int(args.get("n", 10)))

    @op("query.cron.runs")
    async def runs(self, args: dict[str, Any]) -> dict[str, Any]:
        """{job, limit=50}: the run history, newest first."""
        assert self.store is not None
        job = self._job(args)
        return {"job": job.key, "runs": self.store.runs(job.key, int(args.get("limit", 50)))}

    @op("query.cron.run")
    async def run_now(self, args: dict[str, Any]) -> dict[str, Any]:
        """{job}: start a manual run now (recorded with reason 'manual')."""
        job = self._job(args)
        return {"job": job.key, "run": await self._sched.run_now(job.key)}

    @op("query.cron.show")
    async def show(self, args: dict[str, Any]) -> dict[str, Any]:
        """{job}: the job's settings and where it runs (the app's sandbox, user, dir, env)."""
        job = self._job(args)
        app = self._apps.get(job.app)
        return {
            "job": job.key, "command": job.command, "argv": ["/bin/sh", "-c", job.command],
            "schedule": job.schedule.expression, "kind": job.schedule.kind.value,
            "timezone": job.zone.key, "overlap": job.overlap, "missed": job.missed,
            "backfill": job.backfill, "timeout": format_duration(job.timeout),
            "timeout_is_default": job.timeout_is_default,
            "kill_grace": format_duration(job.kill_grace),
            "jitter": format_duration(job.jitter),
            "sandbox": "the app's: same mount and network namespaces, cgroup, user and "
                       "environment as its processes (started by the kernel, instance.spawn)"
                       if self.config.get("launcher") != "local"
                       else "none: launcher = 'local' runs jobs as the driver's user",
            "cwd": app.directory if app else None,
            "uid": app.uid if app else None, "gid": app.gid if app else None,
            "env_added": ["CORRAL_CRON_JOB", "CORRAL_CRON_RUN", "CORRAL_CRON_REASON",
                          "CORRAL_CRON_SLOT"],
            "now": iso(self._sched.clock.now()),
            "clock_offset_s": clock_offset(self.config).total_seconds(),
        }


def main() -> None:
    """``python -m corral_cron``."""
    run(CronDriver)
