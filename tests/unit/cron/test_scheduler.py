"""R2, R5-R7, R9-R12 on a controlled clock: what the scheduler starts, skips and records."""

from __future__ import annotations

import itertools
import signal
from datetime import timedelta

import pytest

from corral.errors import ConflictError
from corral_cron import AppContext, CronJob, check_heartbeat, load_jobs
from corral_cron._store import iso
from unit.cron._harness import Harness, scenario, utc


def job(schedule: str, **kw: object) -> dict[str, dict[str, object]]:
    return {"j": {"schedule": schedule, "command": "true", **kw}}


def z(text: str) -> str:
    return iso(utc(text))


DST_RUNS = [
    ("America/New_York", "30 1 * * *", "2026-10-31T12:00Z", 2,
     ["2026-11-01T05:30Z", "2026-11-02T06:30Z"]),
    ("America/New_York", "30 2 * * *", "2026-03-07T12:00Z", 2,
     ["2026-03-08T07:00Z", "2026-03-09T06:30Z"]),
    ("Europe/London", "*/30 * * * *", "2026-10-25T00:10Z", 4,
     ["2026-10-25T00:30Z", "2026-10-25T01:00Z", "2026-10-25T01:30Z", "2026-10-25T02:00Z"]),
    ("Australia/Lord_Howe", "45 1 * * *", "2026-04-04T12:00Z", 2,
     ["2026-04-04T14:45Z", "2026-04-05T15:15Z"]),
    ("Europe/Dublin", "15 1 * * *", "2026-03-28T12:00Z", 2,
     ["2026-03-29T01:00Z", "2026-03-30T00:15Z"]),
    ("Pacific/Apia", "0 9 * * *", "2011-12-29T12:00Z", 3,
     ["2011-12-29T19:00Z", "2011-12-30T10:00Z", "2011-12-30T19:00Z"]),
]


@pytest.mark.parametrize(("zone", "expr", "start", "days", "expected"), DST_RUNS,
                         ids=[f"{c[0]}:{c[1]}" for c in DST_RUNS])
def test_scheduler_runs_the_dst_policy(tmp_path, zone, expr, start, days, expected) -> None:  # type: ignore[no-untyped-def]
    """Driven through a DST change on the clock, the scheduler starts exactly these slots."""

    @scenario(start)
    async def body(h: Harness) -> None:
        await h.start(job(expr, timezone=zone))
        await h.clock.advance(days * 86400 / 2 if "*/" in expr else days * 86400)
        assert h.launcher.slots()[: len(expected)] == [z(e) for e in expected]
        starts = [p.started_at for p in h.launcher.started[: len(expected)]]
        assert starts == [utc(e) for e in expected]  # on time, not merely in order

    body(tmp_path)


@scenario("2026-06-01T10:05Z")
async def test_missed_once_runs_newest_within_grace(h: Harness) -> None:
    """R5 once: after downtime, only the newest missed slot runs (catch-up); others recorded."""
    await h.start(job("*/15 * * * *"))
    await h.clock.advance(15 * 60)  # 10:15 runs
    await h.crash()
    await h.clock.advance(42 * 60)  # down 10:20 .. 11:02: 10:30, 10:45, 11:00 missed
    await h.start()
    await h.scheduler.set_app(_ctx(h), _jobs(job("*/15 * * * *")))
    await h.clock.advance(1)
    rows = h.runs()
    assert [(r["slot"], r["reason"], r["state"]) for r in rows] == [
        (z("2026-06-01T10:15Z"), "scheduled", "succeeded"),
        (z("2026-06-01T10:30Z"), "missed", "skipped"),
        (z("2026-06-01T10:45Z"), "missed", "skipped"),
        (z("2026-06-01T11:00Z"), "catch-up", "succeeded"),
    ]
    assert "only the newest missed slot" in rows[1]["note"]
    assert [a.event for a in h.alerts] == ["missed"]


def _ctx(h: Harness) -> AppContext:
    return AppContext("shop", str(h.home), {"PATH": "/bin"})


def _jobs(table: dict[str, dict[str, object]]) -> list[CronJob]:
    return load_jobs("shop", table)


@scenario("2026-06-01T02:30Z")
async def test_missed_once_beyond_grace_skips_everything(h: Harness) -> None:
    """R5 once: a daily slot missed by 2 h (grace = min(period, 1 h)) is skipped, visibly."""
    await h.start(job("0 3 * * *"))
    await h.crash()
    await h.clock.advance(2 * 86400 + 2 * 3600)  # 3 daily slots missed, newest 2 h ago
    await h.start()
    await h.scheduler.set_app(_ctx(h), _jobs(job("0 3 * * *")))
    await h.clock.advance(1)
    rows = h.runs()
    assert [r["state"] for r in rows] == ["skipped"] * 3
    assert "beyond the grace window of 1h" in rows[-1]["note"]
    assert h.launcher.started == []


@scenario("2026-06-01T10:05Z")
async def test_missed_skip(h: Harness) -> None:
    """R5 skip: every missed slot is recorded as skipped, none runs."""
    await h.start(job("*/15 * * * *", missed="skip"))
    await h.crash()
    await h.clock.advance(31 * 60)
    await h.start()
    await h.scheduler.set_app(_ctx(h), _jobs(job("*/15 * * * *", missed="skip")))
    await h.clock.advance(1)
    assert [(r["reason"], r["state"]) for r in h.runs()] == [("missed", "skipped")] * 2
    assert h.launcher.started == []


@scenario("2026-06-01T10:05Z", duration=120)
async def test_missed_all_backfills_capped_one_after_another(h: Harness) -> None:
    """R5 all: the newest ``backfill`` missed slots run oldest first, never two at once."""
    spec = job("*/15 * * * *", missed="all", backfill=3, timeout="10m")
    await h.start(spec)
    await h.crash()
    await h.clock.advance(102 * 60)  # 10:15 .. 11:45 = 7 slots missed
    await h.start()
    await h.scheduler.set_app(_ctx(h), _jobs(spec))
    await h.clock.advance(1)
    assert len(h.launcher.started) == 1
    await h.clock.advance(600)
    rows = h.runs()
    assert [r["state"] for r in rows[:4]] == ["skipped"] * 4
    assert "backfill cap of 3" in rows[0]["note"]
    assert h.launcher.slots() == [z("2026-06-01T11:15Z"), z("2026-06-01T11:30Z"),
                                  z("2026-06-01T11:45Z")]
    starts = [p.started_at for p in h.launcher.started]
    assert all(b - a >= timedelta(seconds=120) for a, b in itertools.pairwise(starts))


@scenario("2026-06-01T10:00:30Z", duration=150)
async def test_overlap_forbid_skips_and_records(h: Harness) -> None:
    """R6 forbid: a slot due while the previous run goes on is skipped, with the reason."""
    await h.start(job("* * * * *", timeout="5m"))
    await h.clock.advance(5 * 60)
    rows = h.runs()
    assert [r["state"] for r in rows[:3]] == ["succeeded", "skipped", "skipped"]
    assert rows[1]["note"].startswith("overlap=forbid: run")
    assert rows[3]["state"] in ("succeeded", "running")


@scenario("2026-06-01T10:00:30Z", duration=150)
async def test_overlap_queue_keeps_at_most_one_waiting(h: Harness) -> None:
    """R6 queue: one slot waits and starts when the run ends; a further one is skipped."""
    await h.start(job("* * * * *", overlap="queue", timeout="5m"))
    await h.clock.advance(3 * 60)  # runs 10:01 (150 s); 10:02 waits; 10:03 skipped
    rows = h.runs()
    assert [(r["slot"], r["state"]) for r in rows[:3]] == [
        (z("2026-06-01T10:01Z"), "succeeded"), (z("2026-06-01T10:02Z"), "running"),
        (z("2026-06-01T10:03Z"), "skipped")]
    assert "already waiting" in rows[2]["note"]
    assert h.launcher.started[1].started_at == utc("2026-06-01T10:03:30Z")


@scenario("2026-06-01T10:00:30Z", duration=None, ignores_term=True)
async def test_overlap_replace_stops_the_running_one(h: Harness) -> None:
    """R6 replace: TERM to the running group, KILL after the grace, then the new slot starts."""
    await h.start(job("* * * * *", overlap="replace", kill_grace="5s", timeout="10m"))
    await h.clock.advance(30)
    first = h.launcher.started[0]
    await h.clock.advance(60)
    assert first.signals == [signal.SIGTERM]
    assert len(h.launcher.started) == 1  # the new run waits for the old one to be gone
    await h.clock.advance(5)
    assert first.signals == [signal.SIGTERM, signal.SIGKILL]
    assert len(h.launcher.started) == 2
    rows = h.runs()
    assert [r["state"] for r in rows] == ["replaced", "running"]


@scenario("2026-06-01T10:00:30Z", duration=150)
async def test_overlap_allow_runs_concurrently(h: Harness) -> None:
    """R6 allow: every slot starts on time even while others run."""
    await h.start(job("* * * * *", overlap="allow", timeout="5m"))
    await h.clock.advance(3 * 60)
    assert [p.started_at for p in h.launcher.started] == [
        utc("2026-06-01T10:01Z"), utc("2026-06-01T10:02Z"), utc("2026-06-01T10:03Z")]
    assert sum(p.running for p in h.launcher.started) == 2


@scenario("2026-06-01T10:00:30Z", duration=None, ignores_term=True)
async def test_default_timeout_terms_then_kills(h: Harness) -> None:
    """R7: the default timeout (90 % of 15 min) sends TERM to the group, KILL after grace."""
    await h.start(job("*/15 * * * *", kill_grace="10s"))
    await h.clock.advance(14 * 60 + 30)  # starts at 10:15:00
    proc = h.launcher.started[0]
    await h.clock.advance(13 * 60 + 29)
    assert proc.signals == []
    await h.clock.advance(1)  # 13.5 min after the start
    assert proc.signals == [signal.SIGTERM]
    await h.clock.advance(10)
    assert proc.signals == [signal.SIGTERM, signal.SIGKILL]
    (row,) = [r for r in h.runs() if r["state"] != "running"]
    assert row["state"] == "timeout" and row["signal"] == signal.SIGKILL
    assert "timed out after 13m30s (default timeout)" in row["note"]
    assert [a.event for a in h.alerts] == ["timeout"]


@scenario("2026-06-01T10:00:30Z", exit_code=3)
async def test_history_and_failure_alert(h: Harness) -> None:
    """R9/R10: a run records slot, start, delay, duration, exit code; failure alerts."""
    await h.start(job("* * * * *"))
    await h.clock.advance(62)
    (row,) = h.runs()
    assert row["slot"] == z("2026-06-01T10:01Z") and row["reason"] == "scheduled"
    assert row["started_at"] == z("2026-06-01T10:01Z") and row["delay_ms"] == 0
    assert row["state"] == "failed" and row["exit_code"] == 3 and row["duration_ms"] == 1000
    assert row["output_tail"] == "done\n"
    assert [a.event for a in h.alerts] == ["failure"]


@scenario("2026-06-01T10:00:30Z")
async def test_slot_starts_at_most_once_across_restart(h: Harness) -> None:
    """R6: a new scheduler on the same database never starts a slot the old one claimed."""
    await h.start(job("* * * * *"))
    await h.clock.advance(30)  # 10:01 claimed and started
    assert len(h.launcher.started) == 1
    await h.crash()
    await h.start()
    await h.scheduler.set_app(_ctx(h), _jobs(job("* * * * *")))
    await h.clock.advance(10)
    assert len(h.launcher.started) == 1
    # Even with the cursor rewound (as another host would see it), UNIQUE(job, slot) holds.
    await h.crash()
    h.store._db.execute("UPDATE jobs SET cursor=? WHERE job='shop.j'",
                        (z("2026-06-01T10:00:30Z"),))
    await h.start()
    await h.scheduler.set_app(_ctx(h), _jobs(job("* * * * *")))
    await h.clock.advance(10)
    assert h.launcher.slots() == [z("2026-06-01T10:01Z")]
    assert [r["state"] for r in h.runs()] == ["interrupted"]


@scenario("2026-06-01T10:07Z")
async def test_clock_jump_forward_never_bursts(h: Harness) -> None:
    """R12: the wall clock jumps 3 h ahead: one catch-up run, the rest recorded as missed."""
    await h.start(job("*/15 * * * *"))
    await h.clock.advance(8 * 60)  # 10:15 runs
    h.clock.jump(3 * 3600)
    await h.clock.advance(60)  # the loop wakes at most MAX_SLEEP later
    assert h.launcher.slots() == [z("2026-06-01T10:15Z"), z("2026-06-01T13:15Z")]
    assert sum(r["state"] == "skipped" for r in h.runs()) == 11


@scenario("2026-06-01T10:07Z")
async def test_clock_jump_backward_never_reruns(h: Harness) -> None:
    """R12: after the wall clock steps back 1 h, decided slots do not run again."""
    await h.start(job("*/15 * * * *"))
    await h.clock.advance(30 * 60)  # 10:15, 10:30 run
    h.clock.jump(-3600)
    await h.clock.advance(80 * 60)
    assert h.launcher.slots() == [z("2026-06-01T10:15Z"), z("2026-06-01T10:30Z"),
                                  z("2026-06-01T10:45Z")]
    assert h.launcher.started[-1].started_at == utc("2026-06-01T10:45Z")


@scenario("2026-06-01T10:00Z")
async def test_heartbeat_and_stopped_scheduler(h: Harness) -> None:
    """R10: the scheduler checks in; when it stops, check_heartbeat raises the alert."""
    await h.start(job("0 3 * * *"))
    await h.clock.advance(95)
    beat = h.store.heartbeat()
    assert beat is not None and beat.beat_at == utc("2026-06-01T10:01:30Z")
    assert check_heartbeat(h.store, h.clock.now()) is None
    await h.stop()
    await h.clock.advance(120)
    alert = check_heartbeat(h.store, h.clock.now())
    assert alert is not None and alert.event == "scheduler-stopped"


@scenario("2026-06-01T10:00Z")
async def test_idle_scheduler_wakes_only_for_heartbeats(h: Harness) -> None:
    """R12: no polling loop: over 10 idle minutes the loop wakes once per heartbeat."""
    await h.start({f"j{i}": {"schedule": f"{i} 3 * * *", "command": "true"} for i in range(50)})
    await h.clock.advance(1)
    before = h.scheduler.wakeups
    await h.clock.advance(600)
    assert h.scheduler.wakeups - before == 600 // 30


@scenario("2026-06-01T10:00:30Z", exit_code=1)
async def test_no_success_alert(h: Harness) -> None:
    """R10: no successful run within ``alerts.no_success`` raises 'no-success'."""
    await h.start(job("*/10 * * * *", alerts={"no_success": "25m", "on": ["no-success"]}))
    await h.clock.advance(24 * 60)
    assert h.alerts == []
    await h.clock.advance(2 * 60)
    assert [a.event for a in h.alerts] == ["no-success"]


@scenario("2026-06-01T10:00:30Z", duration=None)
async def test_manual_run(h: Harness) -> None:
    """query.cron.run: a manual run is recorded as such; with forbid, a second one conflicts."""
    await h.start(job("0 3 * * *"))
    run_id = await h.scheduler.run_now("shop.j")
    await h.clock.advance(1)
    (row,) = h.runs()
    assert row["id"] == run_id and row["reason"] == "manual" and row["slot"] is None
    with pytest.raises(ConflictError, match="overlap policy is 'forbid'"):
        await h.scheduler.run_now("shop.j")
    assert h.launcher.started[0].request.env["CORRAL_CRON_REASON"] == "manual"


@scenario("2026-06-01T10:00Z")
async def test_jitter_delays_the_start_by_the_fixed_offset(h: Harness) -> None:
    """R11: the run starts at slot + the job's fixed jitter; the delay is measured from it."""
    await h.start(job("0 * * * *", jitter="10m"))
    offset = h.scheduler.job("shop.j").jitter
    assert timedelta(0) < offset < timedelta(minutes=10)
    await h.clock.advance(3600 + offset.total_seconds() - 0.5)
    assert h.launcher.started == []
    await h.clock.advance(1)
    assert h.launcher.started[0].started_at == utc("2026-06-01T11:00Z") + offset
    assert h.runs()[0]["slot"] == z("2026-06-01T11:00Z")


@scenario("2026-06-01T10:00Z")
async def test_detach_forgets_everything(h: Harness) -> None:
    """app.detach: the app's jobs leave the schedule, the database and the heap."""
    await h.start(job("* * * * *"))
    await h.clock.advance(61)
    await h.scheduler.remove_app("shop")
    await h.clock.advance(300)
    assert len(h.launcher.started) == 1 and h.store.jobs() == [] and h.runs() == []


@scenario("2026-06-01T10:00:30Z")
async def test_long_downtime_is_summarised_not_listed_slot_by_slot(h: Harness) -> None:
    """R5: two days down with `* * * * *`: one summary record, recent slots listed, one run."""
    await h.start(job("* * * * *"))
    await h.crash()
    await h.clock.advance(2 * 86400 + 30)
    await h.start()
    await h.scheduler.set_app(_ctx(h), _jobs(job("* * * * *")))
    await h.clock.advance(1)
    rows = h.runs()
    assert rows[0]["slot"] is None and "more than 1000 slots" in rows[0]["note"]
    assert all(r["state"] == "skipped" for r in rows[1:-1]) and len(rows) < 200
    assert h.launcher.slots() == [z("2026-06-03T10:01Z")]
    await h.clock.advance(120)
    assert len(h.launcher.started) == 3 and len(h.runs()) == len(rows) + 2
