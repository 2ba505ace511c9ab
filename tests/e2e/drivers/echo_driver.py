"""A minimal real driver for supervisor tests: serves state.sync and query.cron.echo.

Behaviour switches come from the environment so one file covers the cases:
ECHO_MODE=crash  exits at once (flapping); ECHO_MODE=badops declares an op of another
capability (its HELLO must be refused).
"""

from __future__ import annotations

import os
import sys
from typing import Any

from corral.sdk import Driver, op, run


class EchoDriver(Driver):
    """Answers state.sync and echoes queries."""

    name = "echo"
    capability = "cron"
    version = "0.0.1"
    synced: dict[str, Any] = {}

    @op("state.sync")
    async def sync(self, args: Any) -> dict[str, Any]:
        EchoDriver.synced = {"apps": len(args.apps), "instances": len(args.instances)}
        return {}

    @op("query.cron.echo")
    async def echo(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"echo": args, "pid": os.getpid(), "synced": EchoDriver.synced}


class BadOpsDriver(EchoDriver):
    """Declares a query of another capability."""

    @op("query.net.stats")
    async def stats(self, args: dict[str, Any]) -> dict[str, Any]:
        return {}


if __name__ == "__main__":
    mode = os.environ.get("ECHO_MODE", "")
    if mode == "crash":
        sys.exit(3)
    run(BadOpsDriver if mode == "badops" else EchoDriver)
