"""The userspace data plane for real: loopback sockets, backend processes, a load loop."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest

from corral.testing import free_port, wait_for_async
from corral_lb.activation import ProcessActivator
from corral_lb.balancer import Balancer
from corral_lb.config import LbConfig, load_lb_config
from integration.lb._harness import (
    HttpClient,
    Load,
    backend_argv,
    backends,
    get,
    start_backend,
    stop,
)

FAST_HEALTH = {"interval": "100ms", "timeout": "500ms", "rise": 1, "fall": 1}


def cfg(port: int, **kw: object) -> LbConfig:
    section = {"name": "svc.test", "frontend": f"127.0.0.1:{port}", "mode": "http",
               "health": FAST_HEALTH, **kw}
    return load_lb_config(section, app="svc")


def test_http_keepalive_framing_and_metrics() -> None:
    """HTTP: keep-alive reuse, chunked and Content-Length bodies both ways, HEAD, 5xx counted."""
    p1, fe = free_port(), free_port()

    async def main() -> None:
        lb = Balancer()
        with backends(("one", p1)):
            await lb.attach("svc", cfg(fe))
            assert await lb.add_backend("svc", "one", "127.0.0.1", p1, wait=5)
            c = await HttpClient.connect(fe)
            for _ in range(3):
                assert (await c.request())[0::2] == (200, b"one")
            assert (await c.request(path="/chunked"))[0::2] == (200, b"one-ok")
            big = b"x" * 200_000
            assert (await c.request("POST", "/echo", body=big))[2] == big
            chunked = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
            status, _, body = await c.request("POST", "/echo", body=chunked,
                                              headers="Transfer-Encoding: chunked\r\n")
            assert (status, body) == (200, b"hello world")
            assert (await c.request("HEAD"))[0] == 200
            assert (await c.request())[0::2] == (200, b"one")  # framing still in step
            assert (await c.request(path="/fail"))[0] == 500
            await c.close()
            m = lb.metrics("svc")["services"][0]["backends"][0]
            assert m["requests"] == 9 and m["errors_5xx"] == 1
            assert m["latency"]["count"] == 9
            # one client connection, one upstream connection reused for all nine requests
            await lb.close()

    asyncio.run(main())


def test_http_routes_by_host_on_a_shared_frontend() -> None:
    """Two names on one port go to their own backends; an unknown Host gets 404."""
    pa, pb, fe = free_port(), free_port(), free_port()

    async def main() -> None:
        lb = Balancer()
        with backends(("alpha", pa), ("beta", pb)):
            await lb.attach("a", load_lb_config({"name": "a.test", "frontend": f"127.0.0.1:{fe}",
                                                 "mode": "http", "health": FAST_HEALTH}, app="a"))
            await lb.attach("b", load_lb_config({"name": "b.test", "frontend": f"127.0.0.1:{fe}",
                                                 "mode": "http", "health": FAST_HEALTH}, app="b"))
            await lb.add_backend("a", "alpha", "127.0.0.1", pa, wait=5)
            await lb.add_backend("b", "beta", "127.0.0.1", pb, wait=5)
            assert await get(fe, host="a.test") == (200, b"alpha")
            assert await get(fe, host=f"b.test:{fe}") == (200, b"beta")
            assert (await get(fe, host="c.test"))[0] == 404
            await lb.close()

    asyncio.run(main())


def test_l4_relay_and_backend_joins_only_when_healthy() -> None:
    """TCP mode relays bytes both ways; a backend not yet listening gets no connection."""
    p1, p2, fe = free_port(), free_port(), free_port()

    async def main() -> None:
        lb = Balancer()
        await lb.attach("svc", cfg(fe, mode="tcp", policy="round-robin"))
        with backends(("one", p1)):
            assert await lb.add_backend("svc", "one", "127.0.0.1", p1, wait=5)
            # p2 has no listener yet: it must stay out of rotation
            await lb.add_backend("svc", "two", "127.0.0.1", p2)
            seen = Counter()
            for _ in range(6):
                r, w = await asyncio.open_connection("127.0.0.1", fe)
                w.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                data = await r.read()
                seen[data.rsplit(b"\r\n\r\n", 1)[1]] += 1
                w.close()
            assert seen == {b"one": 6}
            # each connection's accounting ends when the relay reports it finished
            svc = lb.service("svc")
            await wait_for_async(lambda: svc.connections == 0)
            one = svc.backends["one"]
            assert (one.requests, one.active, one.latency.total) == (6, 0, 6)
            two = start_backend("two", p2)
            try:
                await wait_for_async(lambda: len(lb.service("svc").eligible) == 2)
                bodies = {(await get(fe))[1] for _ in range(6)}
                assert bodies == {b"one", b"two"}
            finally:
                stop(two)
            # "two" died: after `fall` failures it leaves rotation, nothing fails meanwhile...
            await wait_for_async(lambda: len(lb.service("svc").eligible) == 1)
            assert {(await get(fe))[1] for _ in range(4)} == {b"one"}
        await lb.close()

    asyncio.run(main())


def test_l4_drain_waits_for_open_connections() -> None:
    """Draining a TCP backend lets an open connection finish, and takes no new one."""
    p1, p2, fe = free_port(), free_port(), free_port()

    async def main() -> None:
        lb = Balancer()
        await lb.attach("svc", cfg(fe, mode="tcp"))
        with backends(("one", p1), ("two", p2)):
            await lb.add_backend("svc", "one", "127.0.0.1", p1, wait=5)
            r, w = await asyncio.open_connection("127.0.0.1", fe)
            w.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            await r.readuntil(b"one")
            await lb.add_backend("svc", "two", "127.0.0.1", p2, wait=5)
            drain = asyncio.create_task(lb.remove_backend("svc", "one", drain=5))
            await asyncio.sleep(0.2)
            assert not drain.done()
            assert (await get(fe))[1] == b"two"  # new connections avoid the draining backend
            w.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # the old one still works
            await r.readuntil(b"one")
            w.close()
            assert await asyncio.wait_for(drain, 3) is True
        await lb.close()

    asyncio.run(main())


def test_l4_connections_are_cut_when_a_drain_times_out_and_at_close() -> None:
    """A connection outliving its backend's drain is closed (both sides), and so is every
    open connection when the balancer closes; their accounting ends either way."""
    p1, fe = free_port(), free_port()

    async def main() -> None:
        lb = Balancer()
        await lb.attach("svc", cfg(fe, mode="tcp"))
        with backends(("one", p1)):
            await lb.add_backend("svc", "one", "127.0.0.1", p1, wait=5)
            svc = lb.service("svc")
            r, w = await asyncio.open_connection("127.0.0.1", fe)
            w.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            await r.readuntil(b"one")
            one = svc.backends["one"]
            assert (svc.connections, one.active) == (1, 1)
            assert await lb.remove_backend("svc", "one", drain=0.3) is False  # cut, not drained
            assert await asyncio.wait_for(r.read(), 3) == b""  # the client sees the close
            await wait_for_async(lambda: svc.connections == 0)
            assert one.active == 0
            w.close()

            await lb.add_backend("svc", "one", "127.0.0.1", p1, wait=5)
            r, w = await asyncio.open_connection("127.0.0.1", fe)
            w.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            await r.readuntil(b"one")
            await lb.close()
            assert await asyncio.wait_for(r.read(), 3) == b""
            w.close()

    asyncio.run(main())


def test_http_idle_timeout_closes_idle_and_slow_clients_only() -> None:
    """http_idle_timeout: a keep-alive client idle that long is closed, and so is one sending
    its request head too slowly; a client making requests, and a response slower than the
    timeout, are not cut."""
    p1, fe = free_port(), free_port()

    async def closed(r: asyncio.StreamReader, within: float) -> bool:
        try:
            return await asyncio.wait_for(r.read(), within) == b""
        except TimeoutError:
            return False

    async def main() -> None:
        lb = Balancer()
        lb.http_idle_timeout = 0.6
        await lb.attach("svc", cfg(fe))
        with backends(("one", p1)):
            await lb.add_backend("svc", "one", "127.0.0.1", p1, wait=5)
            idle = await HttpClient.connect(fe)
            assert (await idle.request())[0] == 200
            slow_r, slow_w = await asyncio.open_connection("127.0.0.1", fe)
            slow_w.write(b"GET / HTTP/1.1\r\nHo")  # and never the rest
            busy = await HttpClient.connect(fe)
            t0 = time.monotonic()
            while time.monotonic() - t0 < 1.5:  # well past the timeout, busy all along
                assert (await busy.request())[0] == 200
                await asyncio.sleep(0.1)
            assert await closed(idle.reader, 1.0), "an idle keep-alive client was kept"
            assert await closed(slow_r, 1.0), "a client sending its head slowly was kept"
            status, _, body = await busy.request("GET", "/slow?ms=1200")  # slower than 0.6 s
            assert (status, body) == (200, b"one")
            assert (await busy.request())[0] == 200
            await busy.close()
            slow_w.close()
        await lb.close()

    asyncio.run(main())


def test_tcp_idle_timeout_closes_silent_connections() -> None:
    """tcp_idle_timeout: an L4 connection with no bytes either way that long is closed (both
    sides) and its accounting ends; one with traffic stays."""
    p1, fe = free_port(), free_port()

    async def main() -> None:
        lb = Balancer()
        lb.tcp_idle_timeout = 0.6
        await lb.attach("svc", cfg(fe, mode="tcp"))
        with backends(("one", p1)):
            await lb.add_backend("svc", "one", "127.0.0.1", p1, wait=5)
            svc = lb.service("svc")
            quiet = await HttpClient.connect(fe)
            busy = await HttpClient.connect(fe)
            assert (await quiet.request())[0] == 200
            t0 = time.monotonic()
            while time.monotonic() - t0 < 1.5:
                assert (await busy.request())[0] == 200
                await asyncio.sleep(0.1)
            assert await asyncio.wait_for(quiet.reader.read(), 1.0) == b""
            assert svc.connections == 1 and svc.backends["one"].active == 1  # busy only
            assert (await busy.request())[0] == 200
            await busy.close()
            await quiet.close()
            await wait_for_async(lambda: svc.connections == 0)
        await lb.close()

    asyncio.run(main())


@pytest.mark.parametrize("mode", ["http", "tcp"])
def test_rolling_replace_under_load_loses_nothing(mode: str) -> None:
    """Replace every backend (add new, wait healthy, drain old, stop old) under load: 0 errors.
    In tcp mode each request is a connection of its own (the relay cannot move a connection)."""
    old = [free_port(), free_port()]
    new = [free_port(), free_port()]
    fe = free_port()

    async def main() -> None:
        lb = Balancer()
        await lb.attach("svc", cfg(fe, mode=mode))
        olds = [start_backend(f"old{i}", p) for i, p in enumerate(old)]
        news = []
        try:
            for i, p in enumerate(old):
                assert await lb.add_backend("svc", f"old{i}", "127.0.0.1", p, wait=5)
            load = Load(fe, clients=8, per_request=mode == "tcp")
            load.start()
            await asyncio.sleep(0.5)
            for i, p in enumerate(new):  # one at a time, as a rolling deploy does
                news.append(start_backend(f"new{i}", p))
                assert await lb.add_backend("svc", f"new{i}", "127.0.0.1", p, wait=5)
                assert await lb.remove_backend("svc", f"old{i}", drain=5)
                stop(olds[i])
                await asyncio.sleep(0.3)
            await asyncio.sleep(0.5)
            await load.stop()
            assert load.failures == []
            assert load.ok > 200
            assert set(load.last.values()) <= {b"new0", b"new1"}
            assert load.served_by[b"old0"] > 0 and load.served_by[b"new1"] > 0
        finally:
            for p in olds + news:
                stop(p)
            await lb.close()

    asyncio.run(main())


def test_on_demand_starts_on_first_connection_and_stops_when_idle() -> None:
    """No instance until the first request; it is served; the instance stops after idle."""
    fe, port = free_port(), free_port()

    async def main() -> None:
        act = ProcessActivator(backend_argv("lazy", "{port}"), port=port, name="lazy")
        lb = Balancer(activators=lambda app, c: act)
        await lb.attach("svc", cfg(fe, activation="on-demand", idle="300ms"))
        od = lb.service("svc").activation
        assert od is not None and od.instance is None  # type: ignore[attr-defined]
        t0 = time.monotonic()
        assert await get(fe) == (200, b"lazy")
        first = time.monotonic() - t0
        inst = od.instance  # type: ignore[attr-defined]
        assert inst is not None
        proc = inst.handle
        await wait_for_async(lambda: proc.poll() is not None, timeout=5)
        assert od.instance is None  # type: ignore[attr-defined]
        assert lb.service("svc").backends == {}
        assert await get(fe) == (200, b"lazy")  # and it comes back
        assert od.starts == 2  # type: ignore[attr-defined]
        await lb.close()
        assert first < 5

    asyncio.run(main())


def test_on_demand_socket_activation_hands_over_the_listening_socket() -> None:
    """A LISTEN_FDS app gets the socket: the first request waits in the backlog, not on probes."""
    fe = free_port()

    async def main() -> None:
        act = ProcessActivator(backend_argv("sock", "0", "--delay-start", "0.3"), name="sock")
        lb = Balancer(activators=lambda app, c: act)
        await lb.attach("svc", cfg(fe, activation="on-demand", idle="5s", socket_activation=True))
        assert await get(fe) == (200, b"sock")
        od = lb.service("svc").activation
        assert od.instance is not None  # type: ignore[attr-defined]
        await lb.close()
        assert od.instance is None  # type: ignore[attr-defined]

    asyncio.run(main())
