"""A tiny SDK driver for the conformance tests; ``argv[1]`` picks a way to misbehave.

Modes: ``good``; ``wrong-token`` (HELLO carries another token); ``bad-capability`` (capability
"dns"); ``crash-on-sync`` (the process dies in state.sync); ``mute`` (never heartbeats);
``no-reconnect`` (never notices a silent kernel).
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

from corral.bus import Connection
from corral.protocol import Hello, StateSync
from corral.sdk import Driver, op, run

MODE = sys.argv[1] if len(sys.argv) > 1 else "good"


class Tiny(Driver):
    """Serves state.sync, instance.prepare (an empty fragment) and query.log.hello."""

    name = "tiny"
    capability = "log"
    version = "0.0.1"

    @op("state.sync")
    async def sync(self, args: StateSync) -> dict[str, Any]:
        """Nothing to re-apply: count what the kernel sent."""
        if MODE == "crash-on-sync":
            os._exit(7)
        return {"apps": len(args.apps), "instances": len(args.instances)}

    @op("instance.prepare")
    async def prepare(self, args: Any) -> dict[str, Any]:
        """A log driver must contribute to launch plans; this one adds nothing."""
        return {}

    @op("query.log.hello")
    async def hello_query(self, args: dict[str, Any]) -> dict[str, Any]:
        """A greeting."""
        return {"hello": args.get("name", "world")}

    def hello(self, token: str | None) -> Hello:
        """The SDK's HELLO, bent by the mode."""
        hello = super().hello(token)
        if MODE == "wrong-token":
            return hello.model_copy(update={"token": "0" * 32})
        if MODE == "bad-capability":
            return hello.model_copy(update={"capability": "dns"})
        return hello


async def _no_heartbeat(self: Connection) -> None:
    await asyncio.Event().wait()


async def _run_without_silence_check(self: Connection) -> bool:
    beat = asyncio.create_task(self._heartbeat())
    try:
        return await self._receive()
    finally:
        beat.cancel()


if MODE == "mute":
    Connection._heartbeat = _no_heartbeat  # type: ignore[method-assign]
if MODE == "no-reconnect":
    Connection.run = _run_without_silence_check  # type: ignore[method-assign]

if __name__ == "__main__":
    run(Tiny)
