"""Alerts (R10): failure, timeout, missed slot, no success in X, scheduler stopped checking in."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

import structlog

from corral_cron._store import CronStore, iso

log = structlog.get_logger("corral.cron")

ALERT_COMMAND_TIMEOUT = 30.0


@dataclass(frozen=True)
class Alert:
    """Something a person should hear about."""

    event: str  # failure | timeout | missed | no-success | scheduler-stopped
    job: str | None
    at: datetime
    detail: str
    run_id: int | None = None

    def as_json(self) -> dict[str, Any]:
        """Plain JSON body (bus event, hook environment)."""
        body = asdict(self)
        body["at"] = iso(self.at)
        return body


AlertSink = Callable[[Alert], Awaitable[None]]
"""Where alerts go: the driver publishes them on the bus; tests collect them."""


async def run_alert_command(command: str, alert: Alert, env: dict[str, str]) -> int | None:
    """Run a job's alert hook with /bin/sh -c; CORRAL_ALERT_* describe the alert."""
    full = dict(env)
    full.update({
        "CORRAL_ALERT_EVENT": alert.event,
        "CORRAL_ALERT_JOB": alert.job or "",
        "CORRAL_ALERT_AT": iso(alert.at),
        "CORRAL_ALERT_DETAIL": alert.detail,
        "CORRAL_ALERT_RUN": "" if alert.run_id is None else str(alert.run_id),
    })
    proc = await asyncio.create_subprocess_exec(
        "/bin/sh", "-c", command, env=full, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True)
    try:
        return await asyncio.wait_for(proc.wait(), ALERT_COMMAND_TIMEOUT)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        log.warning("alert hook timed out", command=command, event=alert.event)
        return None


def check_heartbeat(store: CronStore, now: datetime,
                    max_age: timedelta = timedelta(seconds=90)) -> Alert | None:
    """For the kernel/CLI: an alert if the scheduler has not checked in within ``max_age``."""
    beat = store.heartbeat()
    if beat is None:
        return Alert("scheduler-stopped", None, now, "the cron scheduler has never checked in")
    age = now - beat.beat_at
    if age > max_age:
        return Alert("scheduler-stopped", None, now,
                     f"the cron scheduler (pid {beat.pid}) last checked in at {iso(beat.beat_at)}"
                     f", {int(age.total_seconds())}s ago")
    return None
