"""corral cron driver: runs an app's [cron.NAME] jobs with no surprises (docs/drivers/cron.md).

``DRIVER`` is what the ``corral.drivers`` entry point names; it is cheap to import. The public
names below are re-exported lazily so that loading the description imports nothing else.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from corral.protocol import DriverDescription

if TYPE_CHECKING:  # type checkers see the real names; at run time they load on first use
    from corral_cron._alerts import Alert, check_heartbeat
    from corral_cron._clock import Clock, SystemClock
    from corral_cron._cluster import ClusterSlots
    from corral_cron._job import CronJob, load_job, load_jobs
    from corral_cron._kernel_launcher import KernelLauncher
    from corral_cron._launcher import (
        ExitStatus,
        JobLauncher,
        JobProcess,
        LaunchRequest,
        LocalLauncher,
    )
    from corral_cron._preview import preview
    from corral_cron._schedule import JobKind, Schedule, ScheduleError, parse_schedule
    from corral_cron._scheduler import AppContext, Scheduler
    from corral_cron._slots import iter_slots, next_slots
    from corral_cron._store import CronStore

DRIVER = DriverDescription(
    name="cron",
    capability="cron",
    version="0.1.0",
    module="corral_cron",
    doc="cron jobs of apps: DST-safe schedules, missed-run and overlap policies, history",
    sections={"cron": "corral_cron.sections:CRON"},
)

_EXPORTS = {
    "Alert": "_alerts", "check_heartbeat": "_alerts",
    "Clock": "_clock", "SystemClock": "_clock",
    "CronJob": "_job", "load_job": "_job", "load_jobs": "_job",
    "ExitStatus": "_launcher", "JobLauncher": "_launcher", "JobProcess": "_launcher",
    "LaunchRequest": "_launcher", "LocalLauncher": "_launcher",
    "KernelLauncher": "_kernel_launcher",
    "preview": "_preview",
    "JobKind": "_schedule", "Schedule": "_schedule", "ScheduleError": "_schedule",
    "parse_schedule": "_schedule",
    "AppContext": "_scheduler", "Scheduler": "_scheduler",
    "iter_slots": "_slots", "next_slots": "_slots",
    "CronStore": "_store",
    "ClusterSlots": "_cluster",
}

__all__ = [
    "DRIVER", "Alert", "AppContext", "Clock", "ClusterSlots", "CronJob", "CronStore",
    "ExitStatus", "JobKind", "JobLauncher", "JobProcess", "KernelLauncher", "LaunchRequest",
    "LocalLauncher", "Schedule",
    "ScheduleError", "Scheduler", "SystemClock", "check_heartbeat", "iter_slots", "load_job",
    "load_jobs", "next_slots", "parse_schedule", "preview",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'corral_cron' has no attribute {name!r}")
    return getattr(import_module(f"corral_cron.{module}"), name)
