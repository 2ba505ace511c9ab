"""``KernelLink``: a driver's requests wait for the kernel's WELCOME."""

from __future__ import annotations

import asyncio

import pytest

from corral.bus._peer import Connection
from corral.errors import CorralError, ErrorCode
from corral.protocol import Hello, Welcome
from corral.sdk import KernelLink


def test_no_request_goes_before_the_kernels_welcome() -> None:
    """A connection whose HELLO is not answered yet carries no request: the kernel would
    refuse the driver for it ("HELLO first"). UNAVAILABLE, retry; once welcomed, it goes."""
    link = KernelLink()
    assert not link.welcomed
    sent: list[str] = []

    class Conn(Connection):
        async def call(self, op: str, args: object = None, *, timeout: float = 30.0
                       ) -> dict[str, object]:
            sent.append(op)
            return {"ok": True}

    hello = Hello(role="driver", name="t", capability="t", version="0", ops=[], token="x",
                  protocols=["CDP/1"])
    conn = Conn("ipc:///nonexistent", hello)
    link._conn = conn
    with pytest.raises(CorralError) as err:
        asyncio.run(link.call("kernel.status"))
    assert err.value.code == ErrorCode.UNAVAILABLE and err.value.retry and sent == []
    conn.welcome = Welcome(peer_id="p", heartbeat_ms=1000)
    assert link.welcomed
    assert asyncio.run(link.call("kernel.status")) == {"ok": True} and sent == ["kernel.status"]
    conn.close()
