"""A REPLY answers the request only when it comes from the session the request was sent on."""

from __future__ import annotations

import asyncio
import os
import secrets
import tempfile
from pathlib import Path
from typing import Any

import zmq.asyncio

from corral.bus import BusServer, Connection, Peer
from corral.errors import CorralError
from corral.protocol import PROTOCOL, Hello, Reply, Request, Welcome, encode


async def _forge() -> dict[str, Any]:
    runtime = Path(tempfile.mkdtemp(prefix="corral-forge-")) / "run"

    async def on_hello(identity: bytes, uid: int, hello: Hello) -> Welcome:
        return Welcome(peer_id=secrets.token_hex(4), heartbeat_ms=1000)

    async def dispatch(peer: Peer, req: Request) -> dict[str, Any]:
        raise CorralError("no kernel operations here")

    async def on_lost(peer: Peer) -> None:
        return None

    bus = BusServer(runtime, admit=lambda uid: uid in {0, os.getuid()}, on_hello=on_hello,
                    dispatch=dispatch, on_lost=on_lost)
    await bus.start()
    serving = asyncio.ensure_future(bus.serve())
    ctx = zmq.asyncio.Context()
    slow = asyncio.Event()

    async def prepare(args: dict[str, Any]) -> dict[str, Any]:
        await slow.wait()
        return {"root": "/the/real/driver's/answer"}

    driver = Connection(bus.endpoint, Hello(role="driver", name="fs", version="1",
                                            protocols=[PROTOCOL], capability="fs",
                                            ops=["instance.prepare"]),
                        handlers={"instance.prepare": prepare}, ctx=ctx)
    other = Connection(bus.endpoint, Hello(role="client", name="intruder", version="1",
                                           protocols=[PROTOCOL]), ctx=ctx)
    try:
        await driver.connect()
        await other.connect()
        running = asyncio.ensure_future(driver.run())
        await asyncio.sleep(0.2)
        peer = next(p for p in bus.peers.values() if p.name == "fs")
        call = asyncio.ensure_future(bus.call(peer, "instance.prepare", {}, timeout=5.0))
        await asyncio.sleep(0.2)
        # Kernel request ids are sequential: the first call has id 1. Forge its answer.
        for rid in range(1, 4):
            await other.send(Reply(id=rid, result={"root": "/forged"}))
        await asyncio.sleep(0.2)
        slow.set()
        result = await call
        running.cancel()
        return result
    finally:
        driver.close()
        other.close()
        serving.cancel()
        bus.close()
        ctx.term()


def test_reply_from_another_session_is_ignored() -> None:
    """A peer cannot answer a request the kernel sent to a driver (known weakness, §15)."""
    assert encode(Reply(id=1))  # the forged message is plain, valid CDP/1
    result = asyncio.run(_forge())
    assert result == {"root": "/the/real/driver's/answer"}, f"forged reply accepted: {result}"
