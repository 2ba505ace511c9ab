"""max_connections_per_frontend: at the cap a proxy frontend stops accepting (HAProxy's
maxconn); the next client waits in the backlog and is served once a connection closes."""

from __future__ import annotations

import asyncio

import pytest

from corral.testing import free_port, wait_for_async
from corral_lb.balancer import Balancer
from corral_lb.config import load_lb_config
from integration.lb.recording_backend import RecordingBackend

REQUEST = b"GET /x HTTP/1.1\r\nHost: svc.test\r\n\r\n"
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n/x"


async def ask(r: asyncio.StreamReader, w: asyncio.StreamWriter, timeout: float = 3.0) -> bytes:
    w.write(REQUEST)
    return await asyncio.wait_for(r.readexactly(len(ANSWER)), timeout)


@pytest.mark.parametrize("mode", ["http", "tcp"])
def test_frontend_stops_accepting_at_the_cap_and_resumes(mode: str) -> None:
    """With a cap of 2, a third client is not served while two are open (it waits in the
    backlog, not refused), and is served as soon as one closes; metrics count it all."""

    async def main() -> None:
        backend = RecordingBackend()
        port = await backend.start()
        lb = Balancer()
        lb.max_connections = 2
        fe = free_port()
        await lb.attach("svc", load_lb_config(
            {"name": "svc.test", "frontend": f"127.0.0.1:{fe}", "mode": mode,
             "health": {"interval": "100ms"}}, app="svc"))
        try:
            assert await lb.add_backend("svc", "rec", "127.0.0.1", port, wait=5)
            first = [await asyncio.open_connection("127.0.0.1", fe) for _ in range(2)]
            for r, w in first:
                assert await ask(r, w) == ANSWER
            r3, w3 = await asyncio.open_connection("127.0.0.1", fe)  # the backlog takes it
            w3.write(REQUEST)
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(r3.readexactly(len(ANSWER)), 0.5)
            m = lb.metrics("svc")["services"][0]["frontend"]
            assert (m["accepted"], m["active"], m["max_connections"]) == (2, 2, 2)
            assert m["limited"] >= 1
            first[0][1].close()  # one closes: the waiting client is accepted and served
            assert await asyncio.wait_for(r3.readexactly(len(ANSWER)), 3) == ANSWER
            m = lb.metrics("svc")["services"][0]["frontend"]
            assert (m["accepted"], m["active"]) == (3, 2)
            for _, w in (first[1], (r3, w3)):
                w.close()
            await wait_for_async(lambda: lb.metrics("svc")["services"][0]["frontend"]["active"]
                             == 0)
        finally:
            await lb.close()
            await backend.close()

    asyncio.run(main())


def test_no_cap_when_zero() -> None:
    """max_connections 0: no cap (many connections at once are all served)."""

    async def main() -> None:
        backend = RecordingBackend()
        port = await backend.start()
        lb = Balancer()
        lb.max_connections = 0
        fe = free_port()
        await lb.attach("svc", load_lb_config(
            {"name": "svc.test", "frontend": f"127.0.0.1:{fe}", "mode": "http",
             "health": {"interval": "100ms"}}, app="svc"))
        try:
            assert await lb.add_backend("svc", "rec", "127.0.0.1", port, wait=5)
            conns = [await asyncio.open_connection("127.0.0.1", fe) for _ in range(50)]
            answers = await asyncio.gather(*(ask(r, w) for r, w in conns))
            assert answers == [ANSWER] * 50
            m = lb.metrics("svc")["services"][0]["frontend"]
            assert (m["accepted"], m["limited"]) == (50, 0)
            for _, w in conns:
                w.close()
        finally:
            await lb.close()
            await backend.close()

    asyncio.run(main())
