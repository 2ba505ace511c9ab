"""A synchronous client of the kernel for the CLI and scripts: ``KernelClient().call(op, args)``."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

import zmq.asyncio

from corral import __version__
from corral.bus import Connection, decode_event, subscribe
from corral.errors import CorralError, ErrorCode
from corral.host import bus_endpoint, events_endpoint, runtime_dir
from corral.protocol import PROTOCOL, Event, Hello

T = TypeVar("T")


KEY_ENV = "CORRAL_SSH_KEY"
"""Set by the SSH gateway (``corral-ssh``): the key it speaks for. The kernel takes role
``remote`` only from the gateway's account, and only that role from it."""


class KernelClient:
    """One request per call; each call connects, says HELLO, asks, says BYE."""

    def __init__(self, endpoint: str | None = None, *, name: str = "cli") -> None:
        self.endpoint = endpoint or os.environ.get("CORRAL_BUS") or bus_endpoint()
        self.name = name

    def _hello(self) -> Hello:
        key = os.environ.get(KEY_ENV)
        if key:
            return Hello(role="remote", name=key, version=__version__, protocols=[PROTOCOL])
        return Hello(role="client", name=self.name, version=__version__, protocols=[PROTOCOL])

    async def acall(self, op: str, args: dict[str, Any] | None = None, *,
                    timeout: float = 60.0) -> dict[str, Any]:
        """Async form of ``call``."""
        path = self.endpoint.removeprefix("ipc://")
        if self.endpoint.startswith("ipc://") and not os.path.exists(path):
            raise CorralError(f"the kernel is not running (no socket at {path}); "
                              "start it with `corral daemon`", code=ErrorCode.UNAVAILABLE)
        ctx = zmq.asyncio.Context()
        conn = Connection(self.endpoint, self._hello(), ctx=ctx)
        try:
            await conn.connect(timeout=5.0)
            runner = asyncio.ensure_future(conn.run())
            try:
                return await conn.call(op, args, timeout=timeout)
            finally:
                runner.cancel()
                await conn.bye()
        finally:
            conn.close()
            ctx.term()

    def call(self, op: str, args: dict[str, Any] | None = None, *,
             timeout: float = 60.0) -> dict[str, Any]:
        """Send one request to the kernel and return its result; raises CorralError."""
        return _run(self.acall(op, args, timeout=timeout))


async def events(prefix: str, endpoint: str | None = None) -> AsyncIterator[Event]:
    """Events from the kernel's PUB socket whose topic starts with ``prefix``."""
    ep = endpoint or os.environ.get("CORRAL_EVENTS") or events_endpoint(runtime_dir())
    ctx = zmq.asyncio.Context()
    sock = await subscribe(ep, prefix, ctx)
    try:
        while True:
            yield decode_event(await sock.recv_multipart())
    finally:
        sock.close(0)
        ctx.term()


def _run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)
