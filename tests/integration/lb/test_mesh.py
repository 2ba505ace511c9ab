"""The routing mesh on real sockets: other hosts' instances (real backend processes on
loopback, published in a shared ledger as another host's lb would) served through this
host's lb, next to its own, and no longer once their records or their host are gone."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from corral.protocol import AppAttach, InstanceStarted
from corral.testing import free_port
from corral_lb.backend import BackendState
from corral_lb.driver import LbDriver
from integration.lb._harness import backends, get
from unit.lb._cluster import Cluster, app_spec, instance, lb_section

Run = Callable[[Callable[[], Awaitable[None]]], None]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    yield c
    c.close()


async def healthy(d: LbDriver, app: str, ids: set[str]) -> None:
    """Wait until exactly ``ids`` are ``app``'s healthy backends."""
    for _ in range(300):
        service = d.balancer.services.get(app)
        if service is not None and {b for b, be in service.backends.items()
                                    if be.state is BackendState.HEALTHY} == ids:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{app}: healthy backends are not {ids}")


async def answers(port: int, host: str, n: int = 12) -> Counter[bytes]:
    """Who answers ``n`` GETs for ``host`` on ``port``."""
    return Counter([(await get(port, host=host))[1] for _ in range(n)])


def test_other_hosts_apps_are_served_here_by_name_and_dropped(
        cluster: Cluster, run: Run) -> None:
    """Two other hosts' instances of shop and one of blog, all HTTP on one frontend port:
    requests for each name reach that app's instances (round robin over shop's two hosts);
    shop's record on h1 released, only h2's instance answers; h2 lost, its apps are no
    longer served here and the frontend closes."""
    d, _ = cluster.driver("h3")
    fe, p1, p2, p3 = free_port(), free_port(), free_port(), free_port()
    shop = lb_section("shop.test", fe, policy="round-robin")
    blog = lb_section("blog.test", fe)
    cluster.alive("h1")
    cluster.alive("h2")

    async def main() -> None:
        with backends(("shop-h1", p1), ("shop-h2", p2), ("blog-h2", p3)):
            k1 = cluster.publish("h1", "shop", 1, "127.0.0.1", p1, shop)
            cluster.publish("h2", "shop", 2, "127.0.0.1", p2, shop)
            cluster.publish("h2", "blog", 1, "127.0.0.1", p3, blog)
            await d.mesh.tick()
            await healthy(d, "shop", {"shop.web.1@h1", "shop.web.2@h2"})
            await healthy(d, "blog", {"blog.web.1@h2"})
            assert await answers(fe, "shop.test") == {b"shop-h1": 6, b"shop-h2": 6}
            assert await answers(fe, "blog.test", 3) == {b"blog-h2": 3}

            cluster.unpublish("h1", "shop", k1)
            await d.mesh.tick()
            await healthy(d, "shop", {"shop.web.2@h2"})
            assert await answers(fe, "shop.test") == {b"shop-h2": 12}

            cluster.lost("h2")
            await d.mesh.tick()
            assert d.balancer.services == {}
            with pytest.raises(ConnectionRefusedError):
                await get(fe, host="shop.test")
        await d.stop()

    run(main)


def test_a_local_app_balances_over_its_instances_here_and_on_another_host(
        cluster: Cluster, run: Run) -> None:
    """A local app's service takes another host's instance as one more backend: requests go
    round robin over this host's instance and the other host's."""
    d, _ = cluster.driver("h3")
    fe, here, there = free_port(), free_port(), free_port()
    lb = lb_section("shop.test", fe, policy="round-robin")
    shop = app_spec("shop", lb)
    cluster.alive("h1")

    async def main() -> None:
        with backends(("here", here), ("there", there)):
            await d.attach(AppAttach(app=shop))
            await d.started(InstanceStarted(app=shop, instance=instance("shop", here),
                                            join_within_s=5))
            cluster.publish("h1", "shop", 1, "127.0.0.1", there, lb)
            await d.mesh.tick()
            await healthy(d, "shop", {"shop.web.1", "shop.web.1@h1"})
            assert await answers(fe, "shop.test") == {b"here": 6, b"there": 6}
            # and this host's instance is published for the others
            assert cluster.backends()["shop/shop.web.1@h3"][1]["address"] == "10.0.0.3"
        await d.stop()

    run(main)
