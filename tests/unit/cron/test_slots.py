"""R1/R2: slots around the DST changes of five zones, computed with corral's policy."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral_cron import Schedule, next_slots, parse_schedule


@dataclass(frozen=True)
class _Job:
    schedule: Schedule
    zone: ZoneInfo


def slots(expr: str, zone: str, after: str, n: int) -> list[str]:
    job = _Job(parse_schedule(expr), ZoneInfo(zone))
    start = datetime.fromisoformat(after.replace("Z", "+00:00"))
    return [s.strftime("%Y-%m-%dT%H:%MZ") for s in next_slots(job, start, n)]


CASES = [
    # (zone, expression, after, expected UTC slots, what it shows)
    ("America/New_York", "30 2 * * *", "2026-03-07T12:00Z",
     ["2026-03-08T07:00Z", "2026-03-09T06:30Z"], "gap: runs at 03:00 EDT, the end of the gap"),
    ("America/New_York", "30 1 * * *", "2026-10-31T12:00Z",
     ["2026-11-01T05:30Z", "2026-11-02T06:30Z"], "repeat: first pass (EDT) only"),
    ("America/New_York", "*/30 * * * *", "2026-11-01T04:10Z",
     ["2026-11-01T04:30Z", "2026-11-01T05:00Z", "2026-11-01T05:30Z", "2026-11-01T06:00Z",
      "2026-11-01T06:30Z", "2026-11-01T07:00Z"], "interval: both passes, every 30 real min"),
    ("America/New_York", "*/30 * * * *", "2026-03-08T06:10Z",
     ["2026-03-08T06:30Z", "2026-03-08T07:00Z", "2026-03-08T07:30Z"],
     "interval: the gap is not on the clock, still 30 real minutes apart"),
    ("America/New_York", "0,30 2 * * *", "2026-03-07T12:00Z",
     ["2026-03-08T07:00Z", "2026-03-09T06:00Z"], "two times in one gap collapse into one run"),
    ("Europe/London", "30 1 * * *", "2026-03-28T12:00Z",
     ["2026-03-29T01:00Z", "2026-03-30T00:30Z"], "gap 01:00-02:00 GMT: runs at 02:00 BST"),
    ("Europe/London", "30 1 * * *", "2026-10-24T12:00Z",
     ["2026-10-25T00:30Z", "2026-10-26T01:30Z"], "repeat: 01:30 BST only"),
    ("Europe/London", "*/20 * * * *", "2026-10-25T00:10Z",
     ["2026-10-25T00:20Z", "2026-10-25T00:40Z", "2026-10-25T01:00Z", "2026-10-25T01:20Z",
      "2026-10-25T01:40Z", "2026-10-25T02:00Z"], "interval through both passes"),
    ("Australia/Lord_Howe", "45 1 * * *", "2026-04-04T12:00Z",
     ["2026-04-04T14:45Z", "2026-04-05T15:15Z"], "30-min repeat 01:30-02:00: first pass"),
    ("Australia/Lord_Howe", "15 2 * * *", "2026-10-03T12:00Z",
     ["2026-10-03T15:30Z", "2026-10-04T15:15Z"], "30-min gap 02:00-02:30: runs at 02:30"),
    ("Australia/Lord_Howe", "*/15 * * * *", "2026-04-04T14:10Z",
     ["2026-04-04T14:15Z", "2026-04-04T14:30Z", "2026-04-04T14:45Z", "2026-04-04T15:00Z",
      "2026-04-04T15:15Z", "2026-04-04T15:30Z"], "interval: 01:30 and 01:45 run twice"),
    ("Europe/Dublin", "15 1 * * *", "2026-10-24T12:00Z",
     ["2026-10-25T00:15Z", "2026-10-26T01:15Z"], "negative DST: repeat, first pass (IST)"),
    ("Europe/Dublin", "15 1 * * *", "2026-03-28T12:00Z",
     ["2026-03-29T01:00Z", "2026-03-30T00:15Z"], "negative DST: gap, runs at 02:00 IST"),
    ("Europe/Dublin", "*/30 * * * *", "2026-10-25T00:10Z",
     ["2026-10-25T00:30Z", "2026-10-25T01:00Z", "2026-10-25T01:30Z", "2026-10-25T02:00Z"],
     "negative DST: interval through both passes"),
    ("Pacific/Apia", "0 9 * * *", "2011-12-28T12:00Z",
     ["2011-12-28T19:00Z", "2011-12-29T19:00Z", "2011-12-30T10:00Z", "2011-12-30T19:00Z"],
     "skipped day 2011-12-30: its 09:00 runs at 00:00 on the 31st, then 09:00 on the 31st"),
    ("Pacific/Apia", "0 * * * *", "2011-12-30T08:30Z",
     ["2011-12-30T09:00Z", "2011-12-30T10:00Z", "2011-12-30T11:00Z"],
     "skipped day: hourly job stays one real hour apart"),
    ("Pacific/Apia", "0 9 30 12 *", "2011-12-01T00:00Z",
     ["2011-12-30T10:00Z", "2012-12-29T19:00Z"], "a date that never happened runs after it"),
    ("UTC", "0 0 29 2 *", "2026-01-01T00:00Z", ["2028-02-29T00:00Z"], "leap years only"),
    ("UTC", "0 0 1,15 * 1", "2026-05-31T12:00Z",
     ["2026-06-01T00:00Z", "2026-06-08T00:00Z", "2026-06-15T00:00Z"],
     "dom/dow OR rule"),
]


@pytest.mark.parametrize(("zone", "expr", "after", "expected", "why"), CASES,
                         ids=[f"{c[0]}:{c[1]}:{c[2][:10]}" for c in CASES])
def test_slots_follow_the_policy(zone: str, expr: str, after: str, expected: list[str],
                                 why: str) -> None:
    """Each case states the rule it checks in ``why``."""
    assert slots(expr, zone, after, len(expected)) == expected, why


def test_never_fires_gives_no_slots() -> None:
    """30 February has no slots (and does not spin for 50 years)."""
    assert slots("0 0 30 2 *", "UTC", "2026-01-01T00:00Z", 3) == []


def test_after_is_exclusive_and_works_inside_a_repeat() -> None:
    """Starting inside either pass of a repeated hour gives exactly the remaining slots."""
    first_pass = slots("*/30 * * * *", "America/New_York", "2026-11-01T05:10Z", 3)
    assert first_pass == ["2026-11-01T05:30Z", "2026-11-01T06:00Z", "2026-11-01T06:30Z"]
    second_pass = slots("*/30 * * * *", "America/New_York", "2026-11-01T06:00Z", 2)
    assert second_pass == ["2026-11-01T06:30Z", "2026-11-01T07:00Z"]
    assert slots("30 1 * * *", "America/New_York", "2026-11-01T06:10Z", 1) == [
        "2026-11-02T06:30Z"]


ZONES = ["America/New_York", "Europe/London", "Australia/Lord_Howe", "Europe/Dublin"]


@settings(max_examples=40, deadline=None)
@given(minute=st.integers(0, 59), hour=st.integers(0, 23), zone=st.sampled_from(ZONES))
def test_fixed_daily_job_runs_once_per_local_date(minute: int, hour: int, zone: str) -> None:
    """Over a year with two DST changes, a daily job runs exactly once on every local date."""
    tz = ZoneInfo(zone)
    job = _Job(parse_schedule(f"{minute} {hour} * * *"), tz)
    start = datetime(2026, 1, 1, tzinfo=tz).astimezone(UTC)
    got = next_slots(job, start - timedelta(seconds=1), 365)
    dates = [s.astimezone(tz).date() for s in got]
    assert dates == [date(2026, 1, 1) + timedelta(days=i) for i in range(365)]
    assert got == sorted(set(got))


@settings(max_examples=30, deadline=None)
@given(step=st.sampled_from([1, 5, 10, 15, 30]), zone=st.sampled_from(ZONES))
def test_interval_job_keeps_real_time_spacing(step: int, zone: str) -> None:
    """Interval jobs whose step divides the DST shift (30 min in Lord_Howe, 60 elsewhere) stay
    exactly ``step`` real minutes apart through every change of 2026."""
    job = _Job(parse_schedule(f"*/{step} * * * *"), ZoneInfo(zone))
    for change in ("2026-03-08", "2026-03-29", "2026-04-05", "2026-10-04", "2026-10-25",
                   "2026-11-01"):
        start = datetime.fromisoformat(change).replace(tzinfo=UTC) - timedelta(hours=14)
        got = next_slots(job, start, 48 * 60 // step)
        assert {b - a for a, b in itertools.pairwise(got)} == {timedelta(minutes=step)}
