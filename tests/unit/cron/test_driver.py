"""The driver's operations, called as the kernel would, with the local launcher."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from corral.errors import ManifestError, NotFoundError
from corral.protocol import AppAttach, AppDetach, AppSpec, StateSync
from corral_cron import DRIVER
from corral_cron.driver import CronDriver


def test_description_is_cheap_and_names_the_module() -> None:
    """The entry point target describes the driver without importing it."""
    assert (DRIVER.name, DRIVER.capability, DRIVER.module) == ("cron", "cron", "corral_cron")


def test_attach_query_run_detach(tmp_path: Path) -> None:
    """attach schedules, queries answer, a manual run is recorded, detach forgets."""

    async def main() -> None:
        driver = CronDriver()
        driver.home = tmp_path
        driver.config = {"launcher": "local"}
        await driver.start()
        app = AppSpec(name="shop", directory=str(tmp_path), manifest={"cron": {
            "hello": {"schedule": "30 1 * * *", "timezone": "America/New_York",
                      "command": "echo hi from $CORRAL_CRON_JOB"}}})
        try:
            reply = await driver.attach(AppAttach(app=app))
            assert reply["jobs"] == ["shop.hello"]
            assert "repeats" in reply["warnings"]["shop.hello"][0]
            ls = await driver.ls({})
            assert ls["jobs"][0]["next_utc"] and ls["jobs"][0]["timezone"] == "America/New_York"
            nxt = await driver.next({"job": "hello", "n": 2, "from": "2026-10-31T12:00:00.000Z"})
            assert [r["utc"] for r in nxt["runs"]] == ["2026-11-01T05:30:00.000Z",
                                                       "2026-11-02T06:30:00.000Z"]
            run = await driver.run_now({"job": "shop.hello"})
            assert driver.scheduler is not None
            await driver.scheduler.wait_run(run["run"])
            (row,) = (await driver.runs({"job": "hello"}))["runs"]
            assert row["reason"] == "manual" and row["output_tail"] == "hi from hello\n"
            show = await driver.show({"job": "hello"})
            assert show["cwd"] == str(tmp_path) and show["timeout"] == "1h"
            with pytest.raises(ManifestError, match=r"cron\.bad\.schedule"):
                bad = app.model_copy(update={"manifest": {"cron": {"bad": {
                    "schedule": "@reboot", "command": "x"}}}})
                await driver.attach(AppAttach(app=bad))
            await driver.sync(StateSync(apps=[], instances=[]))
            with pytest.raises(NotFoundError):
                await driver.runs({"job": "hello"})
            await driver.attach(AppAttach(app=app))
            await driver.detach(AppDetach(app="shop"))
            assert (await driver.ls({}))["jobs"] == []
        finally:
            await driver.stop()

    asyncio.run(main())


def test_next_from_without_an_offset_is_read_in_the_jobs_zone(tmp_path: Path) -> None:
    """`corral cron next JOB --from TIME`: a time with Z or an offset is that instant; one
    without is a wall-clock time in the job's zone (New York here), not UTC. In the hour a
    DST change repeats it is the first of the two; in the hour it skips it lands just after."""

    async def main() -> None:
        driver = CronDriver()
        driver.home = tmp_path
        driver.config = {"launcher": "local"}
        await driver.start()
        app = AppSpec(name="shop", directory=str(tmp_path), manifest={"cron": {
            "tick": {"schedule": "0 * * * *", "timezone": "America/New_York",
                     "command": "true"}}})
        try:
            await driver.attach(AppAttach(app=app))

            async def first(when: str) -> str:
                nxt = await driver.next({"job": "tick", "n": 1, "from": when})
                return str(nxt["runs"][0]["utc"])

            # 06:30 in New York (EDT, UTC-4) is 10:30Z: the next hour is 11:00Z; read as
            # UTC (the old behaviour) it would be 07:00Z
            assert await first("2026-07-01T06:30:00") == "2026-07-01T11:00:00.000Z"
            assert await first("2026-07-01T06:30:00Z") == "2026-07-01T07:00:00.000Z"
            assert await first("2026-07-01T06:30:00+02:00") == "2026-07-01T05:00:00.000Z"
            # 01:30 on 1 November 2026 happens twice in New York: the first (EDT, 05:30Z)
            assert await first("2026-11-01T01:30:00") == "2026-11-01T06:00:00.000Z"
            # 02:30 on 8 March 2026 never happens: read with EST it is 07:30Z (03:30 EDT)
            assert await first("2026-03-08T02:30:00") == "2026-03-08T08:00:00.000Z"
            with pytest.raises(Exception, match="read in the job's zone"):
                await first("yesterday")
        finally:
            await driver.stop()

    asyncio.run(main())
