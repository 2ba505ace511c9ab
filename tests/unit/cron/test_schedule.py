"""R4: what a schedule may say, and the errors that explain what it may not."""

from __future__ import annotations

import pytest

from corral.errors import CorralError, ManifestError
from corral_cron import JobKind, ScheduleError, load_jobs, parse_schedule


@pytest.mark.parametrize(
    ("macro", "cron"),
    [("@hourly", "0 * * * *"), ("@daily", "0 0 * * *"), ("@weekly", "0 0 * * 0"),
     ("@monthly", "0 0 1 * *"), ("@yearly", "0 0 1 1 *"), ("@DAILY", "0 0 * * *")],
)
def test_macros(macro: str, cron: str) -> None:
    """The five macros expand to their five-field meaning."""
    assert parse_schedule(macro).cron == cron


@pytest.mark.parametrize("expr", ["*/30 * * * * *", "0 0 1 1 * 2030", "0 0 12 * * ? 2030"])
def test_six_and_seven_fields_are_refused_with_the_reason(expr: str) -> None:
    """Six/seven fields are refused, naming the seconds/year ambiguity."""
    with pytest.raises(ScheduleError) as info:
        parse_schedule(expr)
    assert isinstance(info.value, CorralError)
    assert "exactly 5" in str(info.value)
    assert "seconds" in str(info.value) and "year" in str(info.value)


def test_reboot_is_refused_with_the_on_deploy_hint() -> None:
    """@reboot points at an on-deploy trigger."""
    with pytest.raises(ScheduleError, match="on-deploy trigger"):
        parse_schedule("@reboot")


@pytest.mark.parametrize(
    ("expr", "field", "words"),
    [("61 * * * *", "minute", "out of range 0-59"),
     ("0 24 * * *", "hour", "out of range 0-23"),
     ("0 0 0 * *", "day-of-month", "out of range 1-31"),
     ("0 0 * 13 *", "month", "out of range 1-12"),
     ("0 0 * * 8", "day-of-week", "out of range 0-7"),
     ("0 0 L * *", "day-of-month", "extension"),
     ("0 0 * * 5#2", "day-of-week", "extension"),
     ("H * * * *", "minute", "jitter"),
     ("0 0 ? * *", "day-of-month", "'?'"),
     ("5/10 * * * *", "minute", "range explicitly"),
     ("0 10-2 * * *", "hour", "backwards"),
     ("*/0 * * * *", "minute", "step 0"),
     ("0 0 * * funday", "day-of-week", "not a number")],
)
def test_field_errors_name_the_field(expr: str, field: str, words: str) -> None:
    """Each invalid field is named, with what is wrong with it."""
    with pytest.raises(ScheduleError) as info:
        parse_schedule(expr)
    assert info.value.field == field
    assert f"{field} field" in str(info.value) and words in str(info.value)


@pytest.mark.parametrize("expr", ["@midnight", "@annually", "@every 5m"])
def test_other_macros_are_refused(expr: str) -> None:
    """Only the five macros are accepted; aliases name the accepted spelling."""
    with pytest.raises(ScheduleError):
        parse_schedule(expr)


@pytest.mark.parametrize(
    ("expr", "kind"),
    [("0 9 * * *", JobKind.FIXED), ("0 9,17 * * *", JobKind.FIXED),
     ("30 1-3 * * *", JobKind.FIXED), ("@daily", JobKind.FIXED),
     ("*/15 * * * *", JobKind.INTERVAL), ("0 * * * *", JobKind.INTERVAL),
     ("0 */2 * * *", JobKind.INTERVAL), ("@hourly", JobKind.INTERVAL),
     ("0-59/5 1 * * *", JobKind.INTERVAL)],
)
def test_job_kind(expr: str, kind: JobKind) -> None:
    """Fixed = literal minute and hour; interval = '*' or a step in either (R2)."""
    assert parse_schedule(expr).kind is kind


def test_fire_dates() -> None:
    """Expressions that never fire, or only in leap years, are recognised (R3)."""
    assert parse_schedule("0 0 30 2 *").fire_dates() == "never"
    assert parse_schedule("0 0 31 4,6,9,11 *").fire_dates() == "never"
    assert parse_schedule("0 0 29 2 *").fire_dates() == "leap-years"
    assert parse_schedule("0 0 30 2 1").fire_dates() == "always"  # OR rule: every Monday
    assert parse_schedule("0 0 1,15 * 1").day_or_weekday


def test_manifest_errors_name_the_job_and_field() -> None:
    """Manifest problems are all listed, each as cron.NAME.field."""
    with pytest.raises(ManifestError) as info:
        load_jobs("shop", {
            "a": {"schedule": "*/5 * * * * *", "command": "x", "timezone": "Mars/Base"},
            "b": {"schedule": "@reboot", "command": "x", "overlap": "sometimes"},
            "c": {"schedule": "* * * * *", "command": "x", "timeout": "soon", "extra": 1},
            "d": {"schedule": "*/15 * * * *", "command": "x", "jitter": "20m"},
        })
    text = str(info.value)
    for where in ("cron.a.schedule", "cron.a.timezone", "cron.b.overlap", "cron.c.extra",
                  "cron.d.jitter"):
        assert where in text, where


def test_defaults() -> None:
    """Defaults: UTC, overlap forbid, missed once, timeout shorter than the period (R7)."""
    (job,) = load_jobs("shop", {"j": {"schedule": "*/15 * * * *", "command": "true"}})
    assert job.zone.key == "UTC" and job.overlap == "forbid" and job.missed == "once"
    assert job.timeout.total_seconds() == 0.9 * 15 * 60 and job.timeout_is_default
    (daily,) = load_jobs("shop", {"j": {"schedule": "0 3 * * *", "command": "true"}})
    assert daily.timeout.total_seconds() == 3600
    (each,) = load_jobs("shop", {"j": {"schedule": "0 9,10 * * *", "command": "true"}})
    assert each.timeout.total_seconds() == 0.9 * 3600


def test_jitter_is_fixed_per_job_name() -> None:
    """R11: the offset comes from the job's name: stable, below the maximum, differs by name."""
    table = {n: {"schedule": "0 * * * *", "command": "x", "jitter": "5m"} for n in "abcdef"}
    first = {j.name: j.jitter for j in load_jobs("shop", table)}
    again = {j.name: j.jitter for j in load_jobs("shop", table)}
    assert first == again
    assert all(0 <= v.total_seconds() < 300 for v in first.values())
    assert len(set(first.values())) > 1
    (off,) = load_jobs("shop", {"a": {"schedule": "0 * * * *", "command": "x"}})
    assert off.jitter.total_seconds() == 0
