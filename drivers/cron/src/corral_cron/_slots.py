"""Slot computation with corral's DST policy (R1, R2); croniter only proposes wall times.

croniter iterates naive local wall time (pure calendar arithmetic, no zone); this module maps
each proposed wall time to UTC with zoneinfo's fold rules and applies the policy:

* fixed-time jobs: a wall time in a spring-forward gap runs at the first instant after the gap
  (several such times collapse into that one run); a wall time in a repeated hour runs on its
  first pass only. So each listed wall time runs once per local date.
* interval jobs: run whenever the wall clock actually shows a matching time. In a repeated
  hour the clock shows each time twice, so the job runs on both passes (real elapsed time);
  times inside a gap are never shown, so they do not run.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Protocol
from zoneinfo import ZoneInfo

from croniter import croniter

from corral_cron._schedule import JobKind, Schedule


class Scheduled(Protocol):
    """Anything with a schedule and a zone (a CronJob, or a bare pair in tests)."""

    @property
    def schedule(self) -> Schedule: ...

    @property
    def zone(self) -> ZoneInfo: ...


def next_slots(job: Scheduled, after_utc: datetime, n: int) -> list[datetime]:
    """The next ``n`` slots strictly after ``after_utc``, as aware UTC datetimes, in order."""
    out: list[datetime] = []
    if n <= 0:
        return out
    for slot in iter_slots(job.schedule, job.zone, after_utc):
        out.append(slot)
        if len(out) >= n:
            break
    return out


def iter_slots(schedule: Schedule, zone: ZoneInfo, after_utc: datetime) -> Iterator[datetime]:
    """Every slot strictly after ``after_utc`` (aware UTC), forever, in increasing order."""
    if schedule.fire_dates() == "never":
        return iter(())
    if after_utc.tzinfo is None:
        raise ValueError("after_utc must be timezone-aware")
    after = after_utc.astimezone(UTC)
    if schedule.kind is JobKind.FIXED:
        return _fixed(schedule, zone, after)
    return _interval(schedule, zone, after)


def wall_time(instant: datetime, zone: ZoneInfo) -> datetime:
    """The naive wall-clock reading of ``instant`` in ``zone``."""
    return instant.astimezone(zone).replace(tzinfo=None)


class _Wall:
    """How one naive wall time exists in a zone: once, never (gap) or twice (repeat)."""

    __slots__ = ("first", "second", "transition")

    def __init__(self, wall: datetime, zone: ZoneInfo) -> None:
        u0 = wall.replace(tzinfo=zone, fold=0).astimezone(UTC)
        u1 = wall.replace(tzinfo=zone, fold=1).astimezone(UTC)
        self.transition: datetime | None = None
        if u0 == u1:
            self.first: datetime | None = u0
            self.second: datetime | None = None
        elif wall_time(u0, zone) != wall:  # in a gap: neither fold reads back as this wall time
            self.first = self.second = None
            self.transition = _transition(zone, min(u0, u1), max(u0, u1))
        else:
            self.first, self.second = min(u0, u1), max(u0, u1)
            self.transition = _transition(zone, self.first, self.second)


def _transition(zone: ZoneInfo, lo: datetime, hi: datetime) -> datetime:
    """The first instant in (lo, hi] whose UTC offset is that of ``hi`` (zone rules: seconds)."""
    target = hi.astimezone(zone).utcoffset()
    low, high = int(lo.timestamp()), int(hi.timestamp())
    while high - low > 1:
        mid = (low + high) // 2
        if datetime.fromtimestamp(mid, UTC).astimezone(zone).utcoffset() == target:
            high = mid
        else:
            low = mid
    return datetime.fromtimestamp(high, UTC)


def _walls(schedule: Schedule, start: datetime) -> Iterator[datetime]:
    """Naive wall times matching the schedule, from ``start`` (inclusive) onwards."""
    it = croniter(schedule.cron, start - timedelta(seconds=1))
    while True:
        yield it.get_next(datetime)


def _fixed(schedule: Schedule, zone: ZoneInfo, after: datetime) -> Iterator[datetime]:
    last: datetime | None = None
    for wall in _walls(schedule, wall_time(after, zone)):
        where = _Wall(wall, zone)
        slot = where.first if where.first is not None else where.transition
        assert slot is not None
        if slot <= after or (last is not None and slot <= last):
            continue  # already past, or collapsed into the end of the same gap
        last = slot
        yield slot


def _interval(schedule: Schedule, zone: ZoneInfo, after: datetime) -> Iterator[datetime]:
    start = wall_time(after, zone)
    here = _Wall(start, zone)
    if here.second is not None and after < here.second and here.transition is not None:
        # ``after`` is on the first pass of a repeat: second-pass times before ``start``
        # still lie ahead, so start at the beginning of the repeated wall range.
        start = wall_time(here.transition, zone)
    walls = _walls(schedule, start)
    held: datetime | None = None
    while True:
        wall = held if held is not None else next(walls)
        held = None
        where = _Wall(wall, zone)
        if where.first is None:
            continue  # inside a gap: the clock never shows this time
        if where.second is None:
            if where.first > after:
                yield where.first
            continue
        # A repeat: run every matching time of the repeated range on the first pass, then
        # again on the second pass, in real-time order.
        assert where.transition is not None
        end = wall_time(where.transition - timedelta(microseconds=1), zone)
        block = [where]
        for nxt in walls:
            if nxt > end:
                held = nxt
                break
            block.append(_Wall(nxt, zone))
        for pass_ in ("first", "second"):
            for item in block:
                slot = getattr(item, pass_)
                if slot is not None and slot > after:
                    yield slot
