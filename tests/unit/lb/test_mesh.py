"""The lb's routing mesh against a fake kernel on a shared ledger (``_cluster``): what it
publishes of this host's instances, what it learns of the other hosts', and what it serves."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from corral.ledger import Claim, HostView
from corral.protocol import AppAttach, AppDetach, InstanceStarted, InstanceStopped, StateSync
from corral.testing import free_port
from corral_lb.driver import LbDriver
from corral_lb.mesh import LocalBackend, Mesh, RemoteBackend, remote_config
from unit.lb._cluster import Cluster, app_spec, instance, lb_section


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    yield c
    c.close()


def run(main: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(main())  # type: ignore[arg-type]


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def test_each_started_instance_is_published_and_released_when_it_stops(
        cluster: Cluster) -> None:
    """instance.started claims a backend record (key <app>/<instance>@<host>, owner the app on
    this host) with the host, address, port, process and the app's [lb] section, and nothing
    of its config; instance.stopping releases it, app.detach releases the rest."""
    d, _ = cluster.driver("h1")
    fe = free_port()
    lb = lb_section("shop.test", f"127.0.0.1:{fe}")
    shop = app_spec("shop", lb)

    async def main() -> None:
        await d.attach(AppAttach(app=shop))
        for i in (1, 2):
            await d.started(InstanceStarted(app=shop, instance=instance(
                "shop", 8080, address=f"10.231.0.{i}", index=i)))
        records = cluster.backends()
        assert sorted(records) == ["shop/shop.web.1@h1", "shop/shop.web.2@h1"]
        owner, value = records["shop/shop.web.1@h1"]
        assert owner == "shop@h1"
        assert value == {"host": "h1", "app": "shop", "instance": "shop.web.1",
                         "address": "10.231.0.1", "port": 8080, "process": "web", "lb": lb}
        assert "not-for-the-ledger" not in json.dumps(records)

        await d.stopping(InstanceStopped(app="shop", instance_id="shop.web.1"))
        assert sorted(cluster.backends()) == ["shop/shop.web.2@h1"]
        await d.detach(AppDetach(app="shop"))
        assert cluster.backends() == {}
        await d.stop()

    run(main)


def test_state_sync_releases_the_records_of_instances_no_longer_live(
        cluster: Cluster) -> None:
    """A record of this host's that the kernel's state.sync does not list (an instance that
    ended while the lb was away) is released; the live ones are published; a loopback
    address is published as this host's address (its host-alive record's)."""
    d, _ = cluster.driver("h1")
    lb = lb_section("shop.test", f"127.0.0.1:{free_port()}")
    shop = app_spec("shop", lb)
    stale = cluster.publish("h1", "shop", 7, "10.231.0.7", 8080, lb)

    async def main() -> None:
        await d.mesh.tick()  # learns this host's address; a stale record waits for the sync
        assert stale in cluster.backends()
        await d.sync(StateSync(apps=[shop], instances=[instance("shop", 8080)]))
        records = cluster.backends()
        assert sorted(records) == ["shop/shop.web.1@h1"]
        assert records["shop/shop.web.1@h1"][1]["address"] == "10.0.0.1"
        # the backend here stays the instance's own address
        assert d.balancer.service("shop").backends["shop.web.1"].address == ("127.0.0.1",
                                                                              8080)
        await d.stop()

    run(main)


def test_a_local_app_balances_over_the_other_hosts_instances_too(cluster: Cluster) -> None:
    """Another host's instance of an app attached here joins its service as one more backend
    (<instance>@<host>); its record released, it is drained and removed; its host no longer
    alive, it is removed at once; state.sync leaves the other hosts' backends alone; status
    shows each backend's host."""
    d, _ = cluster.driver("h3")
    lb = lb_section("shop.test", f"127.0.0.1:{free_port()}")
    shop = app_spec("shop", lb)

    async def main() -> None:
        await d.attach(AppAttach(app=shop))
        local = instance("shop", 8080)
        await d.started(InstanceStarted(app=shop, instance=local))
        cluster.alive("h1")
        key = cluster.publish("h1", "shop", 1, "10.231.4.2", 8080, lb)
        await d.mesh.tick()
        service = d.balancer.service("shop")
        assert set(service.backends) == {"shop.web.1", "shop.web.1@h1"}
        assert service.backends["shop.web.1@h1"].address == ("10.231.4.2", 8080)
        status = (await d.status({"app": "shop"}))["services"][0]
        assert {b["id"]: b["host"] for b in status["backends"]} == {
            "shop.web.1": "h3", "shop.web.1@h1": "h1"}
        assert "remote" not in status
        assert (await d.stats({}))["apps"]["shop"]["backends_remote"] == 1

        await d.sync(StateSync(apps=[shop], instances=[local]))
        assert set(service.backends) == {"shop.web.1", "shop.web.1@h1"}

        cluster.unpublish("h1", "shop", key)
        await d.mesh.tick()
        for _ in range(100):  # drained (nothing in flight): removed
            if "shop.web.1@h1" not in service.backends:
                break
            await asyncio.sleep(0.01)
        assert set(service.backends) == {"shop.web.1"}

        cluster.publish("h1", "shop", 1, "10.231.4.2", 8080, lb)
        await d.mesh.tick()
        assert "shop.web.1@h1" in service.backends
        cluster.lost("h1")
        await d.mesh.tick()
        assert set(service.backends) == {"shop.web.1"}  # at once, no drain
        await d.stop()

    run(main)


def test_instances_of_hosts_not_alive_are_not_served(cluster: Cluster) -> None:
    """A record whose host has no host-alive record (its lease expired) is ignored: its app
    is not served here until the host is alive again."""
    d, _ = cluster.driver("h3")
    fe = free_port()
    lb = lb_section("blog.test", f"127.0.0.1:{fe}")
    cluster.publish("h2", "blog", 1, "10.231.8.2", 8080, lb)

    async def main() -> None:
        await d.mesh.tick()
        assert d.balancer.services == {}
        assert refused(fe)
        cluster.alive("h2")
        await d.mesh.tick()
        assert set(d.balancer.service("blog").backends) == {"blog.web.1@h2"}
        assert not refused(fe)
        await d.stop()

    run(main)


def test_another_hosts_app_is_served_here_and_dropped_with_its_last_record(
        cluster: Cluster) -> None:
    """An app not attached here is served from its records' [lb] section on its frontend
    (recorded as an lb-frontend of this host, never as a port an app of this host could not
    then have), status says it is remote, with its backends' hosts; state.sync leaves it;
    once its last record is gone the frontend closes and its record is released."""
    d, kernel = cluster.driver("h3")
    fe = free_port()
    lb = lb_section("shop.test", f"127.0.0.1:{fe}")
    cluster.alive("h1")
    cluster.alive("h2")
    k1 = cluster.publish("h1", "shop", 1, "10.231.4.2", 8080, lb)
    k2 = cluster.publish("h2", "shop", 2, "10.231.8.2", 8080, lb)

    async def main() -> None:
        await d.mesh.tick()
        service = d.balancer.service("shop")
        assert set(service.backends) == {"shop.web.1@h1", "shop.web.2@h2"}
        assert service.config.frontend == f"127.0.0.1:{fe}" and service.name == "shop.test"
        assert cluster.frontends("h3") == {str(fe): ("driver:lb", {
            "address": "127.0.0.1", "apps": {"shop": ["h1", "h2"]}})}
        assert cluster.ports("h3") == {}
        assert not refused(fe)
        status = await d.status({})
        assert status["services"][0]["remote"] is True and status["host"] == "h3"
        assert sorted(b["host"] for b in status["services"][0]["backends"]) == ["h1", "h2"]

        claims = kernel.calls.count("ledger.claim")
        await d.mesh.tick()  # nothing changed: nothing claimed again
        assert kernel.calls.count("ledger.claim") == claims
        await d.sync(StateSync(apps=[], instances=[]))  # no local app: the mesh's stays
        assert set(d.balancer.service("shop").backends) == {"shop.web.1@h1", "shop.web.2@h2"}

        cluster.unpublish("h1", "shop", k1)
        await d.mesh.tick()
        assert "shop" in d.balancer.services
        cluster.unpublish("h2", "shop", k2)
        await d.mesh.tick()
        assert d.balancer.services == {} and not d.mesh.serves("shop")
        assert cluster.frontends("h3") == {}
        assert refused(fe)
        await d.stop()

    run(main)


def test_a_frontend_held_here_by_another_app_is_said_once_and_taken_when_free(
        cluster: Cluster) -> None:
    """Another host's app whose frontend port is held on this host (a local TCP app's, or
    an app's port in the ledger) is not served: logged and published once with the holder,
    the other apps go on; once the port is free, the next round serves it."""
    d, kernel = cluster.driver("h3")
    fe, other = free_port(), free_port()
    news = app_spec("news", lb_section("news.test", f"127.0.0.1:{fe}", mode="tcp"))
    cluster.alive("h1")
    cluster.publish("h1", "shop", 1, "10.231.4.2", 8080, lb_section("shop.test",
                                                                   f"127.0.0.1:{fe}"))
    cluster.publish("h1", "wiki", 1, "10.231.4.3", 8080, lb_section("wiki.test",
                                                                   f"127.0.0.1:{other}"))
    h3 = HostView(cluster.ledger, "h3")

    async def main() -> None:
        h3.claim("news", [Claim("port", str(fe), {"app": "news", "name": "lb"})])  # the kernel
        await d.attach(AppAttach(app=news))
        for _ in range(2):
            await d.mesh.tick()
        assert set(d.balancer.services) == {"news", "wiki"}
        unserved = [e for e in kernel.events if e[0] == "app.shop.lb.unserved"]
        assert len(unserved) == 1, kernel.events
        assert unserved[0][1]["holder"] == "news"
        assert f"port {fe} on host h3 is held by app 'news'" in unserved[0][1]["reason"]
        assert (await d.status({}))["unserved"] == {"shop": unserved[0][1]["reason"]}

        # held in the ledger by an app that is no lb app (its own [ports])
        await d.detach(AppDetach(app="news"))
        h3.release("news")
        h3.claim("cron-ui", [Claim("port", str(fe), {"app": "cron-ui", "name": "http"})])
        await d.mesh.tick()
        assert "shop" not in d.balancer.services
        assert d.mesh.unserved["shop"] == f"port {fe} on host h3 is held by app 'cron-ui'"
        assert kernel.events[-1] == ("app.shop.lb.unserved", {
            "host": "h3", "reason": d.mesh.unserved["shop"], "holder": "cron-ui"})

        h3.release("cron-ui")
        await d.mesh.tick()
        assert set(d.balancer.service("shop").backends) == {"shop.web.1@h1"}
        assert "shop" not in d.mesh.unserved
        await d.stop()

    run(main)


def test_http_apps_of_other_hosts_share_one_frontend_port(cluster: Cluster) -> None:
    """Two other hosts' HTTP apps on one frontend port (routed by Host) are both served on
    one frontend, recorded once for both; it stays open while one of them is served."""
    d, _ = cluster.driver("h3")
    fe = free_port()
    cluster.alive("h1")
    cluster.alive("h2")
    shop = cluster.publish("h1", "shop", 1, "10.231.4.2", 8080,
                           lb_section("shop.test", f"127.0.0.1:{fe}"))
    blog = cluster.publish("h2", "blog", 1, "10.231.8.2", 8080,
                           lb_section("blog.test", f"127.0.0.1:{fe}"))

    async def main() -> None:
        await d.mesh.tick()
        assert set(d.balancer.services) == {"shop", "blog"}
        assert cluster.frontends("h3")[str(fe)][1]["apps"] == {"blog": ["h2"], "shop": ["h1"]}
        cluster.unpublish("h2", "blog", blog)
        await d.mesh.tick()
        assert set(d.balancer.services) == {"shop"}
        assert cluster.frontends("h3")[str(fe)][1]["apps"] == {"shop": ["h1"]}
        assert not refused(fe)
        cluster.unpublish("h1", "shop", shop)
        await d.mesh.tick()
        assert cluster.frontends("h3") == {} and refused(fe)
        await d.stop()

    run(main)


def test_other_hosts_apps_that_cannot_share_a_port_are_served_one(cluster: Cluster) -> None:
    """A TCP app and an HTTP app of other hosts on one port: the first (by name) is served,
    the other is not, naming it."""
    d, _ = cluster.driver("h3")
    fe = free_port()
    cluster.alive("h1")
    cluster.publish("h1", "mail", 1, "10.231.4.2", 25, lb_section("mail.test",
                                                                 f"127.0.0.1:{fe}", mode="tcp"))
    cluster.publish("h1", "shop", 1, "10.231.4.3", 8080, lb_section("shop.test",
                                                                   f"127.0.0.1:{fe}"))

    async def main() -> None:
        await d.mesh.tick()
        assert set(d.balancer.services) == {"mail"}
        assert d.mesh.unserved == {
            "shop": f"port {fe} on host h3 is served for app 'mail' of another host"}
        await d.stop()

    run(main)


def test_an_app_served_for_another_host_becomes_this_hosts_own(cluster: Cluster) -> None:
    """Adopted here (the kernel claims its port here first), the app is served on as it was
    until it is attached as a local one: the mesh no longer serves it or records its
    frontend, the kernel's port claim stays, and the other host's instance stays one of its
    backends."""
    d, _ = cluster.driver("h3")
    fe = free_port()
    lb = lb_section("shop.test", f"127.0.0.1:{fe}")
    cluster.alive("h1")
    cluster.publish("h1", "shop", 1, "10.231.4.2", 8080, lb)
    h3 = HostView(cluster.ledger, "h3")

    async def main() -> None:
        await d.mesh.tick()
        assert d.mesh.serves("shop")
        service = d.balancer.service("shop")
        h3.claim("shop", [Claim("port", str(fe), {"app": "shop", "name": "lb"})])  # adopt
        await d.mesh.tick()  # its own port: not taken from it
        assert d.mesh.serves("shop") and "shop" not in d.mesh.unserved
        await d.attach(AppAttach(app=app_spec("shop", lb)))
        assert not d.mesh.serves("shop")
        await d.mesh.tick()
        assert cluster.ports("h3") == {str(fe): ("shop", {"app": "shop", "name": "lb"})}
        assert cluster.frontends("h3") == {}
        assert d.balancer.service("shop") is service  # same config: kept, never closed
        assert set(service.backends) == {"shop.web.1@h1"}
        await d.stop()

    run(main)


def test_a_previous_process_frontend_records_are_released(cluster: Cluster) -> None:
    """An lb-frontend record an earlier lb process left for an app no longer served is
    released in the new process's first round; the kernel's port claims are left alone."""
    d, _ = cluster.driver("h3")
    h3 = HostView(cluster.ledger, "h3")
    stale, kernels = free_port(), free_port()
    h3.claim("driver:lb", [Claim("lb-frontend", str(stale), {"apps": {"blog": ["h2"]}})])
    h3.claim("news", [Claim("port", str(kernels), {"app": "news", "name": "lb"})])

    async def main() -> None:
        await d.mesh.tick()
        assert cluster.frontends("h3") == {}
        assert set(cluster.ports("h3")) == {str(kernels)}
        await d.stop()

    run(main)


def test_this_hosts_own_apps_win_its_ports(cluster: Cluster) -> None:
    """A port the mesh serves another host's app on never stops a deploy here: an HTTP app
    deployed on it shares the frontend; a TCP one takes it (the other host's app leaves it,
    said once); so does an app's own port claimed in the ledger (within a round)."""
    d, kernel = cluster.driver("h3")
    fe, other = free_port(), free_port()
    h3 = HostView(cluster.ledger, "h3")
    cluster.alive("h1")
    cluster.publish("h1", "shop", 1, "10.231.4.2", 8080, lb_section("shop.test",
                                                                   f"127.0.0.1:{fe}"))
    cluster.publish("h1", "wiki", 1, "10.231.4.3", 8080, lb_section("wiki.test",
                                                                   f"127.0.0.1:{other}"))
    blog = app_spec("blog", lb_section("blog.test", f"127.0.0.1:{fe}"))
    news = app_spec("news", lb_section("news.test", f"127.0.0.1:{fe}", mode="tcp"))

    async def main() -> None:
        await d.mesh.tick()
        assert set(d.balancer.services) == {"shop", "wiki"}
        # the kernel claims the port for a local HTTP app: no conflict; until its attach the
        # mesh serves on, then they share it
        h3.claim("blog", [Claim("port", str(fe), {"app": "blog", "name": "lb"})])
        await d.mesh.tick()
        assert set(d.balancer.services) == {"shop", "wiki"}
        await d.attach(AppAttach(app=blog))
        await d.mesh.tick()
        assert set(d.balancer.services) == {"shop", "wiki", "blog"}
        assert not d.mesh.unserved
        await d.detach(AppDetach(app="blog"))
        h3.release("blog")

        # a local TCP app on that port: the other host's app leaves it
        h3.claim("news", [Claim("port", str(fe), {"app": "news", "name": "lb"})])
        await d.attach(AppAttach(app=news))
        assert set(d.balancer.services) == {"wiki", "news"}
        assert d.mesh.unserved == {"shop": f"port {fe} on host h3 is held by app 'news'"}
        await d.mesh.tick()
        assert [e for e in kernel.events if e[0] == "app.shop.lb.unserved"] == [
            ("app.shop.lb.unserved", {"host": "h3", "reason": d.mesh.unserved["shop"],
                                      "holder": "news"})]

        # an app's own [ports] on the port of a served app: it leaves at the next round
        h3.claim("cron-ui", [Claim("port", str(other), {"app": "cron-ui", "name": "http"})])
        await d.mesh.tick()
        assert set(d.balancer.services) == {"news"} and refused(other)
        assert "held by app 'cron-ui'" in d.mesh.unserved["wiki"]
        await d.stop()

    run(main)


def test_a_ledger_that_does_not_answer_changes_nothing(cluster: Cluster) -> None:
    """While the ledger cannot be read, what is served stays as it was."""
    d, kernel = cluster.driver("h3")
    cluster.alive("h1")
    cluster.publish("h1", "shop", 1, "10.231.4.2", 8080,
                    lb_section("shop.test", f"127.0.0.1:{free_port()}"))

    async def main() -> None:
        await d.mesh.tick()
        kernel.unavailable = True
        await d.mesh.tick()
        assert set(d.balancer.service("shop").backends) == {"shop.web.1@h1"}
        await d.stop()

    run(main)


def test_on_one_host_the_mesh_does_nothing(cluster: Cluster) -> None:
    """A kernel whose ledger is its own: nothing is published, listed or served."""
    d, kernel = cluster.driver("h1", shared=False)
    lb = lb_section("shop.test", f"127.0.0.1:{free_port()}")
    shop = app_spec("shop", lb)
    cluster.alive("h2")
    cluster.publish("h2", "blog", 1, "10.231.8.2", 8080,
                    lb_section("blog.test", f"127.0.0.1:{free_port()}"))

    async def main() -> None:
        await d.attach(AppAttach(app=shop))
        await d.started(InstanceStarted(app=shop, instance=instance("shop", 8080)))
        await d.mesh.tick()
        await d.sync(StateSync(apps=[shop], instances=[instance("shop", 8080)]))
        assert set(kernel.calls) == {"kernel.status"}
        assert set(d.balancer.services) == {"shop"}
        assert "host" not in await d.status({})
        await d.stop()

    run(main)


def test_remote_config_keeps_what_another_host_can_serve() -> None:
    """Served for another host: no on-demand start, the program policy's fallback; the rest
    as the app's own host reads it, tls included (served with its home's certificate)."""
    section = lb_section("shop.test", None, domains=["shop.example.com"], tls="auto",
                         activation="on-demand", policy={"exec": ["./pick"], "fallback":
                                                         "least-conn"})
    cfg = remote_config(section, app="shop", default_plane="proxy")
    assert cfg.tls == "auto" and cfg.activation == "always" and cfg.policy == "least-conn"
    assert cfg.domains == ["shop.example.com"] and cfg.name == "shop.test"
    assert cfg.health.interval == 0.1


@pytest.mark.parametrize("change", [
    {"owner": "shop@h2"},  # claimed by another host than the one it names
    {"owner": "blog@h1"},  # by another app
    {"value": {"port": "8080"}},
    {"value": {"port": 0}},
    {"value": {"address": ""}},
    {"value": {"lb": None}},
])
def test_a_record_not_of_its_owner_or_malformed_is_ignored(change: dict[str, object]
                                                            ) -> None:
    """Only a well-formed record of the app on the host it names is a backend."""
    value = {"host": "h1", "app": "shop", "instance": "shop.web.1", "address": "10.0.0.1",
             "port": 8080, "process": "web", "lb": {}}
    rec: dict[str, object] = {"owner": "shop@h1", "revision": 3, "value": value}
    good = RemoteBackend.from_record(rec)
    assert good is not None and good.id == "shop.web.1@h1"
    bad = dict(rec, **{k: v for k, v in change.items() if k != "value"})
    if "value" in change:
        bad["value"] = {**value, **change["value"]}  # type: ignore[dict-item]
    assert RemoteBackend.from_record(bad) is None


def test_nothing_is_sent_before_the_kernel_welcomed_the_link(cluster: Cluster) -> None:
    """The kernel refuses a driver whose request comes before its HELLO is answered: the
    mesh's rounds send nothing on a link without WELCOME (the SDK's connection while it
    connects or reconnects)."""
    d = LbDriver()
    assert d._welcomed_link() is False  # no connection yet

    class Connecting:
        welcome: object = None

    d.kernel._conn = Connecting()  # type: ignore[assignment]
    assert d._welcomed_link() is False
    Connecting.welcome = object()
    assert d._welcomed_link() is True

    _, kernel = cluster.driver("h3")
    mesh = Mesh(lambda: kernel, d.balancer, {}, default_plane=lambda: "proxy",
                ready=lambda: False)

    async def main() -> None:
        await mesh.tick()
        await mesh.started(LocalBackend("shop", "shop.web.1", "10.231.0.1", 8080, "web", {}))
        assert kernel.calls == []

    run(main)
