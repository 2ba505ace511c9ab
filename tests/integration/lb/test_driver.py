"""The driver's CDP/1 operations, called as the kernel calls them, on real sockets."""

from __future__ import annotations

import asyncio

import pytest

from corral.errors import CorralError
from corral.protocol import (
    AppAttach,
    AppSpec,
    InstanceRecord,
    InstanceSpec,
    InstanceStarted,
    InstanceStopped,
    StateSync,
    Welcome,
)
from corral.testing import free_port
from corral_lb.driver import LbDriver
from integration.lb._harness import backends, get


def test_driver_declares_the_lb_operations() -> None:
    """HELLO declares the lifecycle ops, the queries, and the [lb] section it checks."""
    assert set(LbDriver.operations) == {
        "app.attach", "instance.started", "instance.stopping", "instance.stopped", "app.detach",
        "state.sync", "manifest.check",
        "query.lb.status", "query.lb.stats", "query.lb.metrics", "query.lb.certs",
        "query.lb.renew"}
    assert LbDriver().hello(None).sections == ["lb"]


def test_driver_lifecycle_attach_started_stopped_detach() -> None:
    """attach opens the frontend; started adds a healthy backend; stopped drains it."""
    fe, port = free_port(), free_port()
    manifest = {"lb": {"name": "shop.test", "frontend": fe, "mode": "http", "plane": None,
                       "health": {"tcp": True, "interval": 0.1, "timeout": 0.5, "rise": 1,
                                  "fall": 1}, "idle": None, "process": "web"}}
    app = AppSpec(name="shop", directory="/tmp", manifest=manifest)
    spec = InstanceSpec(id="shop.web.1", app="shop", process="web", index=1, argv=["x"],
                        env={}, cwd="/tmp", port=port)
    rec = InstanceRecord(spec=spec, pid=1, start_time=0.0, state="ready")

    async def main() -> None:
        d = LbDriver()
        with backends(("web1", port)):
            assert (await d.attach(AppAttach(app=app)))["lb"] is True
            # a rollout's join: the answer waits for the verdict, with the last check
            assert await d.started(InstanceStarted(app=app, instance=rec, join_within_s=5)
                                   ) == {"backend": True, "healthy": True, "health": "ok"}
            assert await get(fe, host="shop.test") == (200, b"web1")
            status = await d.status({"app": "shop"})
            assert status["services"][0]["backends"][0]["state"] == "healthy"
            metrics = await d.metrics({})
            assert metrics["services"][0]["backends"][0]["requests"] == 1
            # state.sync without the instance removes it; with the app gone, the service goes
            await d.sync(StateSync(apps=[app], instances=[]))
            assert d.balancer.service("shop").backends == {}
            await d.sync(StateSync(apps=[app], instances=[rec]))
            assert "shop.web.1" in d.balancer.service("shop").backends
            assert await d.stopped(InstanceStopped(app="shop", instance_id="shop.web.1")) == {
                "drained": True}
            await d.sync(StateSync(apps=[], instances=[]))
            assert d.balancer.services == {}
            await d.stop()

    asyncio.run(main())


def test_started_in_a_rollout_answers_unhealthy_with_the_last_check() -> None:
    """A backend that never passes its checks: with join_within_s the answer comes when the
    time is up, healthy false and the last check's result (the kernel then stops it);
    without it (a restart) the answer does not wait for health at all."""
    fe, port = free_port(), free_port()  # nothing listens on port
    manifest = {"lb": {"name": "sick.test", "frontend": fe, "mode": "http", "policy": "p2c",
                       "activation": "always", "plane": "proxy",
                       "health": {"tcp": True, "interval": 0.1, "timeout": 0.5, "rise": 1,
                                  "fall": 1}, "idle": None, "process": "web"}}
    app = AppSpec(name="sick", directory="/tmp", manifest=manifest)
    spec = InstanceSpec(id="sick.web.1", app="sick", process="web", index=1, argv=["x"],
                        env={}, cwd="/tmp", port=port)
    rec = InstanceRecord(spec=spec, pid=1, start_time=0.0, state="ready")

    async def main() -> None:
        d = LbDriver()
        await d.attach(AppAttach(app=app))
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        reply = await d.started(InstanceStarted(app=app, instance=rec, join_within_s=0.6))
        assert 0.5 <= loop.time() - t0 < 3
        assert reply == {"backend": True, "healthy": False, "health": "connection refused"}
        t0 = loop.time()
        reply = await d.started(InstanceStarted(app=app, instance=rec))
        assert loop.time() - t0 < 0.2 and reply["healthy"] is False
        await d.stop()

    asyncio.run(main())


def test_welcome_sets_the_proxy_timeouts_from_the_host_config() -> None:
    """[drivers.lb] config's tcp_idle_timeout / http_idle_timeout reach the balancer; a bad
    one is refused naming the key, before any operation runs."""
    d = LbDriver()
    d.welcomed(Welcome(peer_id="lb", heartbeat_ms=1000,
                       config={"tcp_idle_timeout": "2m", "http_idle_timeout": "10s"}))
    assert (d.balancer.tcp_idle_timeout, d.balancer.http_idle_timeout) == (120.0, 10.0)
    d.welcomed(Welcome(peer_id="lb", heartbeat_ms=1000, config={}))
    assert (d.balancer.tcp_idle_timeout, d.balancer.http_idle_timeout) == (3600.0, 75.0)
    with pytest.raises(CorralError, match=r"\[drivers.lb\] config: http_idle_timeout"):
        d.welcomed(Welcome(peer_id="lb", heartbeat_ms=1000,
                           config={"http_idle_timeout": "whenever"}))
