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


def raw_pipelined(endpoint: str, in_flight: int) -> tuple[int, float]:
    """Kernel capacity: a lean client (blocking pyzmq, pre-built JSON) keeping ``in_flight``
    requests outstanding, so the figure is the kernel's and the bus's, not our client's."""
    import json

    import zmq

    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    s.connect(endpoint)
    s.send_multipart([b"CDP1", b"HELLO", json.dumps(
        {"role": "client", "name": "bench-raw", "version": "0", "protocols": ["CDP/1"]}).encode()])
    assert s.recv_multipart()[1] == b"WELCOME"
    seq = 0

    def send_pair_step(i: int, release: bool) -> None:
        nonlocal seq
        seq += 1
        key = f"raw-{i}"
        if release:
            body = {"id": seq, "op": "ledger.release",
                    "args": {"owner": "bench", "keys": [["lease", key]]}}
        else:
            body = {"id": seq, "op": "ledger.claim",
                    "args": {"owner": "bench", "claims": [{"kind": "lease", "key": key}]}}
        s.send_multipart([b"CDP1", b"REQUEST", json.dumps(body).encode()])

    state: dict[int, tuple[int, bool]] = {}  # request id -> (pair number, was release)
    pairs = 0
    nxt = 0
    for _ in range(in_flight):
        send_pair_step(nxt, False)
        state[seq] = (nxt, False)
        nxt += 1
    t0 = time.perf_counter()
    deadline = t0 + SECONDS
    while time.perf_counter() < deadline:
        frames = s.recv_multipart()
        if frames[1] != b"REPLY":
            continue
        rid = json.loads(frames[2])["id"]
        i, was_release = state.pop(rid)
        if was_release:
            pairs += 1
            send_pair_step(nxt, False)
            state[seq] = (nxt, False)
            nxt += 1
        else:
            send_pair_step(i, True)
            state[seq] = (i, True)
    elapsed = time.perf_counter() - t0
    s.close(0)
    ctx.term()
    return pairs, elapsed


def main() -> int:
    try:  # the Python client runs on uvloop too when it is installed, like the kernel
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    with kernel() as k:
        n, s = asyncio.run(rounds(k.endpoint, 1))
        print(f"ledger_claim_release_sequential: {n / s:.0f}/s (goal >= 5000)")
        for workers in (8, 32):
            n, s = asyncio.run(rounds(k.endpoint, workers))
            print(f"ledger_claim_release_{workers}_concurrent: {n / s:.0f}/s (goal >= 5000)")
        n, s = raw_pipelined(k.endpoint, 32)
        print(f"ledger_claim_release_lean_client_32_in_flight: {n / s:.0f}/s (goal >= 5000)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
