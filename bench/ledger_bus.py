"""Ledger claim+release round trips through the bus, per second (goal >= 5,000/s).

One client connection (HELLO once) issues `ledger.claim` then `ledger.release` of one key,
sequentially, so each round trip is two full REQUEST/REPLY exchanges through ZeroMQ, the
kernel's dispatch table, pydantic validation and a committed SQLite transaction each.
A second figure uses 8 concurrent requesters on the same connection.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

from _kernel import kernel
from corral import __version__
from corral.bus import Connection
from corral.protocol import PROTOCOL, Hello

SECONDS = float(os.environ.get("BENCH_SECONDS", "5"))


async def rounds(endpoint: str, workers: int) -> tuple[int, float]:
    conn = Connection(endpoint, Hello(role="client", name="bench", version=__version__,
                                      protocols=[PROTOCOL]))
    await conn.connect()
    runner = asyncio.ensure_future(conn.run())
    done = 0
    deadline = time.perf_counter() + SECONDS

    async def worker(w: int) -> None:
        nonlocal done
        i = 0
        while time.perf_counter() < deadline:
            key = f"bench-{w}-{i}"
            await conn.call("ledger.claim", {"owner": "bench",
                                             "claims": [{"kind": "lease", "key": key}]})
            await conn.call("ledger.release", {"owner": "bench", "keys": [["lease", key]]})
            done += 1
            i += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(workers)))
    elapsed = time.perf_counter() - t0
    runner.cancel()
    await conn.bye()
    return done, elapsed


def main() -> int:
    with kernel() as k:
        n, s = asyncio.run(rounds(k.endpoint, 1))
        print(f"ledger_claim_release_sequential: {n / s:.0f}/s (goal >= 5000)")
        for workers in (8, 32):
            n, s = asyncio.run(rounds(k.endpoint, workers))
            print(f"ledger_claim_release_{workers}_concurrent: {n / s:.0f}/s (goal >= 5000)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
