"""Preview (R3, R11): the next runs in the job's zone and in UTC, with the warnings that matter."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from croniter import croniter

from corral_cron._duration import format_duration
from corral_cron._job import CronJob
from corral_cron._schedule import JobKind
from corral_cron._slots import _transition, next_slots, wall_time
from corral_cron._store import iso


def preview(job: CronJob, after: datetime, n: int = 10) -> dict[str, Any]:
    """``corral cron next JOB -n N``: runs (local, UTC, start with jitter) and warnings."""
    runs = []
    for slot in next_slots(job, after, n):
        runs.append({
            "slot": iso(slot),
            "local": slot.astimezone(job.zone).isoformat(),
            "utc": iso(slot),
            "starts": iso(slot + job.jitter),
        })
    return {
        "job": job.key,
        "schedule": job.schedule.expression,
        "timezone": job.zone.key,
        "kind": job.schedule.kind.value,
        "jitter": format_duration(job.jitter),
        "runs": runs,
        "warnings": warnings(job, after),
    }


def warnings(job: CronJob, after: datetime) -> list[str]:
    """Everything surprising about this job within a year of ``after``."""
    out: list[str] = []
    schedule = job.schedule
    fires = schedule.fire_dates()
    if fires == "never":
        out.append(f"never fires: no date matches {schedule.expression!r} "
                   "(e.g. 30 February or 31 April); this job will not run")
    elif fires == "leap-years":
        out.append("fires only in leap years (29 February)")
    if schedule.day_or_weekday:
        out.append("day-of-month and day-of-week are both restricted: the job runs on days "
                   "matching EITHER field (cron's OR rule), not only days matching both")
    if job.jitter:
        out.append(f"jitter: every run starts {format_duration(job.jitter)} after its slot "
                   f"(fixed for this job, derived from its name; maximum "
                   f"{format_duration(job.jitter_max)})")
    if fires != "never":
        out.extend(dst_warnings(job, after, timedelta(days=366)))
    return out


def dst_warnings(job: CronJob, after: datetime, within: timedelta) -> list[str]:
    """One warning per DST change in ``within`` whose gap or repeat holds a time of the job."""
    out = []
    for change in transitions(job.zone, after, after + within):
        before = (change - timedelta(seconds=1)).astimezone(job.zone).utcoffset()
        later = change.astimezone(job.zone).utcoffset()
        assert before is not None and later is not None
        shift = later - before
        start = (change + min(before, later)).replace(tzinfo=None)
        end = start + abs(shift)
        hit = croniter(job.schedule.cron, start - timedelta(seconds=1)).get_next(datetime)
        if hit >= end:
            continue
        day = wall_time(change, job.zone).date().isoformat()
        span = f"{start:%H:%M}-{end:%H:%M}"
        if shift > timedelta(0):
            if job.schedule.kind is JobKind.FIXED:
                what = (f"{hit:%H:%M} does not exist; that run starts at {end:%H:%M}, "
                        "the first instant after the gap")
            else:
                what = "matching times in the gap are not on the clock and do not run"
            out.append(f"DST change on {day} ({job.zone.key}): {span} is skipped; {what}")
        else:
            if job.schedule.kind is JobKind.FIXED:
                what = f"{hit:%H:%M} happens twice; the job runs on the first pass only"
            else:
                what = "this interval job runs on both passes (real elapsed time)"
            out.append(f"DST change on {day} ({job.zone.key}): {span} repeats; {what}")
    return out


def transitions(zone: ZoneInfo, start: datetime, end: datetime) -> list[datetime]:
    """Instants in [start, end) where the zone's UTC offset changes (daily scan, then bisect)."""
    out = []
    step = timedelta(hours=12)
    t = start.astimezone(UTC)
    offset = t.astimezone(zone).utcoffset()
    while t < end:
        nxt = t + step
        o = nxt.astimezone(zone).utcoffset()
        if o != offset:
            out.append(_transition(zone, t, nxt))
            offset = o
        t = nxt
    return out
