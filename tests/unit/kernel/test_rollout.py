"""The pieces of a health-gated rollout that need no kernel: the CLI's progress lines and the
all-or-first-failure join."""

from __future__ import annotations

import asyncio
import time

import pytest

from corral.cli._rollout import describe
from corral.deploy import all_or_first_failure
from corral.protocol import Event


def _event(topic: str, **data: object) -> Event:
    return Event(topic=topic, time=time.time(), data=dict(data))


def test_progress_lines_name_the_instance_and_the_step() -> None:
    """A line per step and instance; the app's own lines for the deploy as a whole; events a
    deploy does not show (log records, cron alerts) give no line."""
    assert describe("shop", _event("app.shop.instance.started", instance="shop.web.1",
                                   pid=42)) == "  shop.web.1  started (pid 42)"
    assert describe("shop", _event("app.shop.instance.healthy", instance="shop.web.1",
                                   health="lb: ok")) == "  shop.web.1  healthy (lb: ok)"
    assert describe("shop", _event("app.shop.instance.unhealthy", instance="shop.web.1",
                                   driver="lb", health="http 500")) == (
        "  shop.web.1  unhealthy (lb: http 500)")
    assert describe("shop", _event("app.shop.deploy.failed", generation=3, step="health",
                                   reason="boom", kept=2)) == (
        "shop: deploy of generation 3 failed at health: boom")
    assert describe("shop", _event("app.shop.cron.failed", job="x")) is None
    # a malformed event still gives a line, never an exception
    assert describe("shop", _event("app.shop.instance.started", instance="i")) == "  i  " \
        "instance.started"


def test_join_fails_fast_and_cancels_the_rest() -> None:
    """One instance failing its gate ends the join at once; the others' waits are cancelled,
    not left running for their whole deadline."""
    cancelled: list[str] = []

    async def slow(name: str) -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.append(name)
            raise

    async def bad() -> None:
        await asyncio.sleep(0.01)
        raise RuntimeError("unhealthy")

    async def main() -> float:
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match="unhealthy"):
            await all_or_first_failure([slow("a"), bad(), slow("b")])
        return time.monotonic() - t0

    took = asyncio.run(main())
    assert took < 5 and sorted(cancelled) == ["a", "b"]


def test_join_succeeds_when_all_do() -> None:
    """Every coroutine finishing normally is a pass (and an empty join too)."""
    done: list[int] = []

    async def ok(n: int) -> None:
        await asyncio.sleep(0.01 * n)
        done.append(n)

    asyncio.run(all_or_first_failure([ok(1), ok(2), ok(3)]))
    asyncio.run(all_or_first_failure([]))
    assert sorted(done) == [1, 2, 3]
