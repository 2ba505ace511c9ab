"""The manifest's ``[cron.NAME]`` tables: their one schema (the cron's job spec), defaults and
checks, schedules included.

Cheap to import (pydantic, ``corral.sdk.sections``, the standard library): the
``corral.drivers`` entry point's description names ``CRON`` here, so ``corral check`` refuses a
schedule the cron would refuse, without starting the cron driver.
"""

from __future__ import annotations

import re
import zoneinfo
from functools import cache
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, BeforeValidator, Field

from corral.errors import ManifestError
from corral.protocol import ManifestCheck
from corral.sdk.sections import (
    PositiveDuration,
    Report,
    Section,
    SectionModel,
    Text,
    count,
    fail,
    json_schema,
)
from corral.units import DURATION_EXPECTED, UnitError, parse_duration

Overlap = Literal["forbid", "queue", "replace", "allow"]
Missed = Literal["skip", "once", "all"]
AlertEvent = Literal["failure", "timeout", "missed", "no-success"]
ALERT_EVENTS: tuple[AlertEvent, ...] = ("failure", "timeout", "missed", "no-success")
JOB_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")


def _job_name(value: object) -> str:
    if not isinstance(value, str) or not JOB_NAME.fullmatch(value):
        fail("a job name of lowercase letters, digits, '-' and '_' (at most 63)", value)
    return value


@cache
def _zones() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones())


def _timezone(value: object) -> str:
    expected = 'an IANA timezone name such as "UTC", "Europe/Paris" or "America/New_York"'
    if not isinstance(value, str) or value == "localtime" or value.startswith(("posix/", "right/")):
        fail(expected, value)
    if value not in _zones():
        fail(expected, value)
    return value


def _jitter(value: object) -> bool | float | None:
    if value is None or isinstance(value, bool):
        return value
    try:
        return parse_duration(value)
    except UnitError:
        fail(f"true, false or {DURATION_EXPECTED}", value)


def _all_events() -> list[AlertEvent]:
    return list(ALERT_EVENTS)


JobName = Annotated[str, BeforeValidator(_job_name),
                    json_schema(type="string", pattern=JOB_NAME.pattern)]
Timezone = Annotated[str, BeforeValidator(_timezone), json_schema(type="string", default="UTC")]
Jitter = Annotated[
    bool | float | None, BeforeValidator(_jitter),
    json_schema(anyOf=[{"type": "boolean"}, {"type": "number"}, {"type": "string"}]),
]
Backfill = Annotated[int, BeforeValidator(count(1, 100)),
                     json_schema(type="integer", minimum=1, maximum=100)]


class AlertsSpec(SectionModel):
    """``[cron.NAME.alerts]`` (or ``alert``): who hears about failures, timeouts, missed slots
    and a lack of success; every event is published on the bus either way."""

    command: Text | None = Field(default=None, description="run with /bin/sh -c on each alert")
    on: list[AlertEvent] = Field(default_factory=_all_events,
                                 description="the events that run command; default all four")
    no_success: PositiveDuration | None = Field(
        default=None, description="alert when no run succeeded in this long",
        validation_alias=AliasChoices("no_success", "no_success_within"))


def _alerts(value: object) -> object:
    return {} if value is None else value  # a resolved manifest of an older kernel: null


class CronJobSpec(SectionModel):
    """``[cron.NAME]``: a scheduled command, run in the app's sandbox."""

    schedule: Text = Field(description="five cron fields or @hourly/@daily/@weekly/@monthly/"
                           "@yearly (@annually, @midnight)")
    command: Text
    timezone: Timezone = "UTC"
    overlap: Overlap = "forbid"
    missed: Missed = "once"
    backfill: Backfill = Field(default=3, description="missed = all: at most this many runs")
    timeout: PositiveDuration | None = Field(
        default=None, description="default: 90% of the shortest interval, at most 1 h")
    kill_grace: PositiveDuration = Field(
        default=10.0, description="after timeout: SIGTERM, then SIGKILL after this long")
    jitter: Jitter = Field(
        default=None, description="opt-in: maximum delay (true: a tenth of the shortest "
        "interval, at most 1 min), fixed per job")
    alerts: Annotated[AlertsSpec, BeforeValidator(_alerts)] = Field(
        default_factory=AlertsSpec, validation_alias=AliasChoices("alerts", "alert"))


CronTable = dict[JobName, CronJobSpec]


def _written(raw: Any, *keys: str) -> str:
    """The first of ``keys`` present in the table ``raw`` (so problems name what was written)."""
    return next((k for k in keys if isinstance(raw, dict) and k in raw), keys[0])


def check(jobs: dict[str, CronJobSpec], context: ManifestCheck, report: Report
          ) -> dict[str, CronJobSpec]:
    """Every job as the cron schedules it (schedule, zone, jitter within the interval) and the
    alert rules across fields."""
    from corral_cron._job import load_job  # the scheduler's own validation, nothing else

    written = context.sections.get("cron") or {}
    for name, spec in jobs.items():
        raw = written.get(name) if isinstance(written, dict) else None
        alert = _written(raw, "alerts", "alert")
        raw_alert = raw.get(alert) if isinstance(raw, dict) else None
        window = _written(raw_alert, "no_success", "no_success_within")
        if "no-success" in spec.alerts.on and spec.alerts.no_success is None \
                and "on" in spec.alerts.model_fields_set:
            report.problem((name, alert, "on"),
                           f'expected {window} = "<duration>" alongside "no-success"')
        if spec.alerts.no_success is not None and "no-success" not in spec.alerts.on:
            report.problem((name, alert, window), f'expected "no-success" in {alert}.on for '
                           f"{window} to take effect")
        try:
            load_job(context.app, name, spec.model_dump())
        except ManifestError as exc:
            prefix = f"cron.{name}."
            for problem in exc.problems:
                where, _, message = problem.partition(": ")
                field = where.removeprefix(prefix).split(".")[0] if where.startswith(prefix) \
                    else ""
                field = alert if field == "alerts" else field
                report.problem((name, field) if field else (name,), message or problem)
    return jobs


CRON = Section("cron", CronTable, check, doc="scheduled jobs, run in the app's sandbox")
