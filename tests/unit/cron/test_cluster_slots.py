"""A cron slot runs once in a cluster: two schedulers (two hosts) sharing one slot ledger.

Each host has its own scheduler, store and launcher on one FakeClock; ``Slots`` stands for
the kernel's ledger (``ClusterSlots`` there: a ``cron-slot`` record per slot, the cluster's,
owned by the app, moved with it when another host adopts it). ``ClusterSlots`` itself is
tested against a stand-in kernel below.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from pathlib import Path
from typing import Any

from corral.errors import ConflictError, CorralError, ErrorCode
from corral_cron import AppContext, ClusterSlots, CronJob, load_jobs
from corral_cron._cluster import KEEP, PRUNE_EVERY, slot_key
from corral_cron._store import iso
from corral_cron.testing import FakeClock, RecordingLauncher, settle
from unit.cron._harness import Harness, utc

JOB = {"j": {"schedule": "* * * * *", "command": "true", "duration": "30s"}}


class Slots:
    """The cluster's slot records: (job key, slot) -> (host, fingerprint)."""

    def __init__(self) -> None:
        self.held: dict[tuple[str, datetime], tuple[str, str]] = {}
        self.down = False

    def on(self, host: str) -> HostSlots:
        return HostSlots(self, host)

    def adopt(self, by: str) -> None:
        """The app's records pass to host ``by`` (corral.failover.transfer)."""
        self.held = {k: (by, fp) for k, (_h, fp) in self.held.items()}


class HostSlots:
    def __init__(self, slots: Slots, host: str) -> None:
        self.slots, self.host = slots, host

    async def claim(self, job: CronJob, slot: datetime) -> str | None:
        if self.slots.down:
            raise CorralError("the etcd ledger is unavailable", code=ErrorCode.UNAVAILABLE)
        holder = self.slots.held.setdefault((job.key, slot), (self.host, job.fingerprint))[0]
        return None if holder == self.host else f"held by app 'shop' on host {holder}"

    async def newest(self, job: CronJob) -> datetime | None:
        return max((s for (k, s), (_h, fp) in self.slots.held.items()
                    if k == job.key and fp == job.fingerprint), default=None)


def two_hosts(tmp_path: Path, start: str) -> tuple[FakeClock, Slots, Harness, Harness]:
    clock = FakeClock(utc(start))
    slots = Slots()
    hosts = []
    for name in ("h1", "h2"):
        home = tmp_path / name
        home.mkdir()
        h = Harness(home, clock, RecordingLauncher(clock, duration=30.0))
        h.scheduler.slots = slots.on(name)
        hosts.append(h)
    return clock, slots, hosts[0], hosts[1]


async def attach(h: Harness) -> None:
    await h.scheduler.set_app(AppContext("shop", str(h.home), {"PATH": "/bin"}),
                              load_jobs("shop", {"j": {"schedule": "* * * * *",
                                                       "command": "true"}}))
    if h.task is None:
        h.task = asyncio.ensure_future(h.scheduler.run())
    await settle()


def run(tmp_path: Path, start: str, body: Any) -> None:
    async def main() -> None:
        clock, slots, h1, h2 = two_hosts(tmp_path, start)
        try:
            await body(clock, slots, h1, h2)
        finally:
            for h in (h1, h2):
                if h.task is not None and not h.task.done():
                    h.task.cancel()
                    await asyncio.gather(h.task, return_exceptions=True)
                h.store.close()
    asyncio.run(main())


def test_a_slot_scheduled_on_two_hosts_starts_on_one(tmp_path: Path) -> None:
    async def body(clock: FakeClock, slots: Slots, h1: Harness, h2: Harness) -> None:
        await attach(h1)
        await attach(h2)
        await clock.advance(3 * 60)  # 10:01, 10:02, 10:03
        started = h1.launcher.slots() + h2.launcher.slots()
        assert sorted(started) == [iso(utc(f"2026-06-01T10:0{m}Z")) for m in (1, 2, 3)]
        skipped = [r for h in (h1, h2) for r in h.runs() if r["state"] == "skipped"]
        assert len(skipped) == 3
        assert all("claimed in the cluster (held by app 'shop' on host h" in r["note"]
                   for r in skipped), skipped
    run(tmp_path, "2026-06-01T10:00:30Z", body)


def test_an_adopted_job_goes_on_from_the_newest_slot_claimed_elsewhere(
        tmp_path: Path) -> None:
    """h2 runs 10:01 and 10:02, then dies in the middle of 10:02's run; h1 adopts the app at
    10:04:20: 10:02 never runs again, 10:03 is recorded missed (missed = once: only the
    newest missed slot runs), 10:04 runs, then 10:05: each slot started once in the
    cluster, and the gap visible in h1's history."""
    async def body(clock: FakeClock, slots: Slots, h1: Harness, h2: Harness) -> None:
        await attach(h2)
        await clock.advance(95)  # 10:01 and 10:02 started on h2 (10:02's run still going)
        assert h2.launcher.slots() == [iso(utc("2026-06-01T10:01Z")),
                                       iso(utc("2026-06-01T10:02Z"))]
        assert h2.task is not None
        h2.task.cancel()  # h2 is lost
        await asyncio.gather(h2.task, return_exceptions=True)
        await clock.advance(125)  # 10:04:20
        slots.adopt("h1")
        await attach(h1)
        await clock.advance(60)  # 10:05:20
        assert h1.launcher.slots() == [iso(utc("2026-06-01T10:04Z")),
                                       iso(utc("2026-06-01T10:05Z"))]
        rows = [(r["slot"], r["reason"], r["state"]) for r in h1.runs()]
        assert (iso(utc("2026-06-01T10:03Z")), "missed", "skipped") in rows, rows
        # 20 s late: within the on-time window, so it runs as scheduled
        assert (iso(utc("2026-06-01T10:04Z")), "scheduled", "succeeded") in rows, rows
        assert not [r for r in rows if r[0] <= iso(utc("2026-06-01T10:02Z"))], rows
    run(tmp_path, "2026-06-01T10:00:30Z", body)


def test_a_slot_the_ledger_cannot_record_does_not_run(tmp_path: Path) -> None:
    async def body(clock: FakeClock, slots: Slots, h1: Harness, h2: Harness) -> None:
        await attach(h1)
        slots.down = True
        await clock.advance(40)  # 10:01 due
        assert h1.launcher.slots() == []
        (row,) = h1.runs()
        assert row["state"] == "skipped" and "did not record the slot" in row["note"], row
        assert [a.event for a in h1.alerts] == ["missed"]
        slots.down = False
        await clock.advance(60)
        assert h1.launcher.slots() == [iso(utc("2026-06-01T10:02Z"))]
    run(tmp_path, "2026-06-01T10:00:30Z", body)


class Kernel:
    """A stand-in for the kernel's ledger ops, with another host's claim on one key."""

    def __init__(self) -> None:
        self.records: dict[str, dict[str, Any]] = {}
        self.calls: list[str] = []

    async def call(self, op: str, args: dict[str, Any] | None = None, *,
                   timeout: float = 30.0) -> dict[str, Any]:
        args = args or {}
        self.calls.append(op)
        if op == "ledger.claim":
            (claim,) = args["claims"]
            held = self.records.get(claim["key"])
            if held is not None and held["owner"] != args["owner"]:
                raise ConflictError(f"cron-slot {claim['key']} is held by {held['owner']}",
                                    kind="cron-slot", key=claim["key"], holder=held["owner"])
            self.records[claim["key"]] = {"owner": args["owner"], "key": claim["key"],
                                          "kind": claim["kind"], "value": claim["value"]}
            return {"revision": 1}
        if op == "ledger.list":
            return {"records": [r for r in self.records.values()
                                if r["owner"] == args["owner"] and r["kind"] == args["kind"]]}
        if op == "ledger.release":
            for _kind, key in args["keys"]:
                self.records.pop(key, None)
            return {"revision": 2}
        raise AssertionError(op)


def test_cluster_slots_claims_names_the_holder_finds_the_newest_and_prunes() -> None:
    async def main() -> None:
        kernel = Kernel()
        slots = ClusterSlots(kernel)
        (job,) = load_jobs("shop", {"j": {"schedule": "* * * * *", "command": "true"}})
        first = utc("2026-06-01T10:01Z")
        assert slot_key(job, first) == "shop.j/20260601T100100Z"
        assert await slots.newest(job) is None
        assert await slots.claim(job, first) is None
        assert await slots.claim(job, first) is None  # its own already: fine
        kernel.records["shop.j/20260601T100200Z"] = {
            "owner": "shop@h9", "key": "shop.j/20260601T100200Z", "kind": "cron-slot",
            "value": {"slot": iso(utc("2026-06-01T10:02Z")), "fingerprint": "x"}}
        held = await slots.claim(job, utc("2026-06-01T10:02Z"))
        assert held is not None and "held by shop@h9" in held
        assert await slots.newest(job) == first
        for minute in range(3, 3 + KEEP + PRUNE_EVERY):
            assert await slots.claim(job, utc(f"2026-06-01T{10 + minute // 60}:"
                                                  f"{minute % 60:02d}Z")) is None
        await settle()
        mine = [k for k, r in kernel.records.items() if r["owner"] == "shop"]
        assert KEEP <= len(mine) < KEEP + PRUNE_EVERY, len(mine)
        assert "shop.j/20260601T100100Z" not in mine  # the oldest went
        assert await slots.newest(job) == utc(f"2026-06-01T10:{2 + KEEP + PRUNE_EVERY:02d}Z")
    asyncio.run(main())
