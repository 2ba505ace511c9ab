"""Cron jobs as declared in an app's manifest ([cron.NAME]) and validated for scheduling."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import ValidationError

from corral.errors import ManifestError
from corral.sdk.sections import describe, format_path
from corral_cron._duration import format_duration, parse_duration
from corral_cron._schedule import Schedule, ScheduleError, parse_schedule
from corral_cron.sections import (
    ALERT_EVENTS,
    AlertEvent,
    AlertsSpec,
    CronJobSpec,
    Missed,
    Overlap,
)

__all__ = [
    "ALERT_EVENTS", "AlertEvent", "AlertsSpec", "CronJob", "CronJobSpec", "Missed", "Overlap",
    "default_timeout", "jitter_offset", "load_job", "load_jobs", "shortest_interval",
]

MAX_DEFAULT_TIMEOUT = timedelta(hours=1)
MAX_GRACE = timedelta(hours=1)
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


@dataclass(frozen=True)
class CronJob:
    """One schedulable job: validated spec plus everything derived from it."""

    app: str
    name: str
    schedule: Schedule
    zone: ZoneInfo
    command: str
    overlap: Overlap
    missed: Missed
    backfill: int
    timeout: timedelta
    timeout_is_default: bool
    kill_grace: timedelta
    jitter: timedelta  # the fixed offset of this job (zero when jitter is off)
    jitter_max: timedelta
    alerts: AlertsSpec
    no_success: timedelta | None
    shortest_interval: timedelta
    spec: dict[str, Any] = field(compare=False)

    @property
    def key(self) -> str:
        """Job identity across the host: '<app>.<name>'."""
        return f"{self.app}.{self.name}"

    @property
    def fingerprint(self) -> str:
        """Changes when anything that decides the slots changes (schedule, zone)."""
        raw = json.dumps([self.schedule.cron, self.zone.key], separators=(",", ":"))
        return hashlib.sha256(raw.encode()).hexdigest()[:16]


def load_jobs(app: str, table: dict[str, Any] | None) -> list[CronJob]:
    """Validate an app's ``cron`` table; raise ManifestError listing every problem located."""
    jobs: list[CronJob] = []
    problems: list[str] = []
    for name, raw in sorted((table or {}).items()):
        try:
            jobs.append(load_job(app, name, raw))
        except ManifestError as exc:
            problems.extend(exc.problems)
    if problems:
        raise ManifestError(problems)
    return jobs


def load_job(app: str, name: str, raw: Any) -> CronJob:
    """Validate one ``[cron.NAME]`` table; raise ManifestError naming ``cron.NAME.field``."""
    where = f"cron.{name}"
    if not _NAME.match(name):
        raise ManifestError([f"{where}: job name must match {_NAME.pattern}"])
    if not isinstance(raw, dict):
        raise ManifestError([f"{where}: expected a table, got {type(raw).__name__}"])
    try:
        spec = CronJobSpec.model_validate(raw)
    except ValidationError as exc:
        found = []
        for err in exc.errors():
            path, message = describe(err, raw, CronJobSpec)
            found.append(f"{format_path(('cron', name, *path))}: {message}")
        if isinstance(raw.get("schedule"), str):  # a bad schedule is said along with the rest
            try:
                parse_schedule(raw["schedule"])
            except ScheduleError as schedule_error:
                found.append(f"{where}.schedule: {schedule_error}")
        raise ManifestError(found) from None
    problems: list[str] = []

    def duration(field_name: str, text: str | float | None) -> timedelta | None:
        if text is None:
            return None
        try:
            value = (timedelta(seconds=float(text)) if isinstance(text, int | float)
                     else parse_duration(text))
        except ValueError as exc:
            problems.append(f"{where}.{field_name}: {exc}")
            return None
        if value <= timedelta(0) and field_name != "jitter":
            problems.append(f"{where}.{field_name}: must be longer than zero, got {text!r}")
            return None
        return value

    schedule: Schedule | None = None
    try:
        schedule = parse_schedule(spec.schedule)
    except ScheduleError as exc:
        problems.append(f"{where}.schedule: {exc}")
    zone: ZoneInfo | None = None
    try:
        zone = ZoneInfo(spec.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        problems.append(f"{where}.timezone: {spec.timezone!r} is not an IANA zone name "
                        "(e.g. 'Europe/Paris', 'America/New_York', 'UTC')")
    timeout = duration("timeout", spec.timeout)
    kill_grace = duration("kill_grace", spec.kill_grace)
    jitter_max = (timedelta(0) if spec.jitter is True or spec.jitter is False
                  else duration("jitter", spec.jitter) or timedelta(0))
    no_success = duration("alerts.no_success", spec.alerts.no_success)
    if schedule is None or zone is None or problems:
        raise ManifestError(problems or [f"{where}: invalid"])
    shortest = shortest_interval(schedule)
    if spec.jitter is True:
        jitter_max = min(shortest / 10, timedelta(minutes=1))
    if jitter_max >= shortest:
        problems.append(f"{where}.jitter: {format_duration(jitter_max)} must be shorter than the "
                        "shortest interval"
                        f" between runs ({format_duration(shortest)})")
    if problems:
        raise ManifestError(problems)
    assert kill_grace is not None
    return CronJob(
        app=app,
        name=name,
        schedule=schedule,
        zone=zone,
        command=spec.command,
        overlap=spec.overlap,
        missed=spec.missed,
        backfill=spec.backfill,
        timeout=timeout or default_timeout(shortest),
        timeout_is_default=timeout is None,
        kill_grace=kill_grace,
        jitter=jitter_offset(app, name, jitter_max),
        jitter_max=jitter_max,
        alerts=spec.alerts,
        no_success=no_success,
        shortest_interval=shortest,
        spec=spec.model_dump(),
    )


def shortest_interval(schedule: Schedule) -> timedelta:
    """A lower bound of the time between two runs, from the fields (exact below one day)."""
    times = sorted(h * 60 + m for h in schedule.hours for m in schedule.minutes)
    if len(times) == 1:
        return timedelta(days=1)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    gaps.append(1440 - times[-1] + times[0])
    return timedelta(minutes=min(gaps))


def default_timeout(shortest: timedelta) -> timedelta:
    """R7: 90 % of the shortest interval between runs, at most one hour."""
    return min(shortest * 0.9, MAX_DEFAULT_TIMEOUT)


def jitter_offset(app: str, name: str, maximum: timedelta) -> timedelta:
    """R11: a fixed offset in [0, maximum), from SHA-256 of '<app>.<name>' (millisecond steps)."""
    span = int(maximum.total_seconds() * 1000)
    if span <= 0:
        return timedelta(0)
    digest = int.from_bytes(hashlib.sha256(f"{app}.{name}".encode()).digest()[:8], "big")
    return timedelta(milliseconds=digest % span)
