"""R3/R11: the preview shows runs in the zone and UTC, jitter, and every warning it owes."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from corral_cron import load_jobs, preview


def _preview(expr: str, zone: str = "UTC", **kw: object) -> dict[str, Any]:
    (job,) = load_jobs("shop", {"j": {"schedule": expr, "command": "x", "timezone": zone, **kw}})
    return preview(job, datetime(2026, 1, 1, tzinfo=UTC), 3)


def test_runs_in_zone_and_utc() -> None:
    """Each run shows the local time with its offset and the UTC instant."""
    p = _preview("30 9 * * *", "Europe/London")
    assert p["runs"][0] == {
        "slot": "2026-01-01T09:30:00.000Z", "local": "2026-01-01T09:30:00+00:00",
        "utc": "2026-01-01T09:30:00.000Z", "starts": "2026-01-01T09:30:00.000Z"}
    assert p["timezone"] == "Europe/London"


def test_dst_warnings_only_when_the_change_touches_the_job() -> None:
    """A 01:30 job is warned about the autumn repeat only; a 09:00 job about nothing."""
    warnings = _preview("30 1 * * *", "America/New_York")["warnings"]
    assert warnings == ["DST change on 2026-11-01 (America/New_York): 01:00-02:00 repeats; "
                        "01:30 happens twice; the job runs on the first pass only"]
    assert _preview("0 9 * * *", "America/New_York")["warnings"] == []
    gap = _preview("15 2 * * *", "Australia/Lord_Howe")["warnings"]
    assert gap == ["DST change on 2026-10-04 (Australia/Lord_Howe): 02:00-02:30 is skipped; "
                   "02:15 does not exist; that run starts at 02:30, the first instant after "
                   "the gap"]
    both = _preview("*/10 * * * *", "Europe/Dublin")["warnings"]
    assert len(both) == 2 and "both passes" in both[1]


def test_or_rule_never_and_leap_warnings() -> None:
    """dom+dow both restricted, an impossible date, a leap-day-only date are all warned."""
    assert any("EITHER" in w for w in _preview("0 0 13 * 5")["warnings"])
    never = _preview("0 0 30 2 *")
    assert never["runs"] == [] and never["warnings"][0].startswith("never fires")
    assert _preview("0 0 29 2 *")["warnings"] == ["fires only in leap years (29 February)"]


def test_jitter_is_shown() -> None:
    """With jitter on, each run's start is the slot plus the fixed offset, and it is said."""
    p = _preview("0 * * * *", jitter="1m")
    run = p["runs"][0]
    assert run["starts"] != run["slot"] and p["jitter"] != "0s"
    assert any(w.startswith("jitter: every run starts") for w in p["warnings"])
