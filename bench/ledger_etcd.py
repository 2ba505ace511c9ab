"""Ledger claim+release round trips per second on etcd (goal >= 1,000/s), beside SQLite.

Two ways of keeping 32 claim+release pairs in flight, each claiming one key then releasing
it, over and over:

- through the kernel's group commit (the figure the goal applies to): 32 requests on one
  event loop, committed as corrald commits the claims drivers send over the bus
  (``corral.ledger.GroupCommit``: what arrives in one loop pass is committed together, in a
  worker thread for etcd, where a run of disjoint claims is one etcd transaction);
- 32 threads calling one ledger object directly, each commit on its own (for context).

Each backend runs each way for ``BENCH_SECONDS`` (default 10) in the same run, so the
ratio compares like with like:

- etcd: a 3-member cluster on this machine (loopback, data in /dev/shm, started with the
  tests' harness ``tests/etcdcluster.py``), through ``etcd://`` URL of all three members;
  a commit whose guess of the keys is right is one etcd transaction (one raft round);
- SQLite: ``SqliteLedger`` in a temporary directory (WAL, synchronous=NORMAL, the default),
  every call serialised by its lock.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from _kernel import exit_on_sigterm

from corral.ledger import Claim, GroupCommit, Ledger, SqliteLedger, Txn, open_ledger
from etcdcluster import ETCD, etcd_cluster

SECONDS = float(os.environ.get("BENCH_SECONDS", "10"))
THREADS = 32
GOAL = 1000


def claim_release(ledger: Ledger, threads: int, seconds: float) -> tuple[int, float]:
    """Claim+release pairs done by ``threads`` threads in ``seconds``: (pairs, elapsed)."""
    counts = [0] * threads
    errors: list[BaseException] = []
    start = threading.Barrier(threads + 1)
    deadline = 0.0

    def worker(w: int) -> None:
        start.wait()
        i = 0
        try:
            while time.perf_counter() < deadline:
                key = f"bench-{w}-{i}"
                ledger.claim("bench", [Claim("lease", key)])
                ledger.release("bench", [("lease", key)])
                counts[w] += 1
                i += 1
        except BaseException as exc:  # reported by the caller
            errors.append(exc)

    pool = [threading.Thread(target=worker, args=(w,)) for w in range(threads)]
    for t in pool:
        t.start()
    t0 = time.perf_counter()
    deadline = t0 + seconds
    start.wait()
    for t in pool:
        t.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} workers failed; first: {errors[0]!r}")
    return sum(counts), elapsed


def claim_release_grouped(ledger: Ledger, requests: int, seconds: float) -> tuple[int, float]:
    """Claim+release pairs done by ``requests`` coroutines through the kernel's group commit
    in ``seconds``: (pairs, elapsed)."""
    async def run() -> tuple[int, float]:
        group = GroupCommit(ledger)
        counts = [0] * requests
        t0 = time.perf_counter()
        deadline = t0 + seconds

        async def worker(w: int) -> None:
            i = 0
            while time.perf_counter() < deadline:
                key = f"group-{w}-{i}"
                await group.commit(Txn().claim("bench", "lease", key))
                await group.commit(Txn().release("bench", "lease", key))
                counts[w] += 1
                i += 1

        await asyncio.gather(*(worker(w) for w in range(requests)))
        return sum(counts), time.perf_counter() - t0

    return asyncio.run(run())


def main() -> int:
    exit_on_sigterm()
    if not os.access(ETCD, os.X_OK):
        print(f"skipped: needs etcd at {ETCD}")
        return 0
    home = Path(tempfile.mkdtemp(prefix="corral-bench-ledger-"))
    try:
        with etcd_cluster(3) as cluster:
            etcd = open_ledger(cluster.url, home)
            claim_release(etcd, THREADS, 1.0)  # warm up: connections, leader settled
            n, s = claim_release_grouped(etcd, THREADS, SECONDS)
            etcd_rate = n / s
            print(f"etcd_claim_release_per_s: {etcd_rate:.0f}/s (group commit, {THREADS} in "
                  f"flight, 3 members, {n} pairs in {s:.1f} s)")
            n, s = claim_release(etcd, THREADS, SECONDS)
            etcd_threads = n / s
            print(f"etcd_claim_release_per_s_one_by_one: {etcd_threads:.0f}/s ({THREADS} "
                  f"threads, each commit on its own, {n} pairs in {s:.1f} s)")
            etcd.close()

        sqlite = SqliteLedger(home / "ledger.sqlite3")
        claim_release(sqlite, THREADS, 1.0)
        n, s = claim_release_grouped(sqlite, THREADS, SECONDS)
        sqlite_rate = n / s
        print(f"sqlite_claim_release_per_s: {sqlite_rate:.0f}/s (group commit, {THREADS} in "
              f"flight, {n} pairs in {s:.1f} s)")
        n, s = claim_release(sqlite, THREADS, SECONDS)
        sqlite.close()
        print(f"sqlite_claim_release_per_s_one_by_one: {n / s:.0f}/s ({THREADS} threads, "
              f"{n} pairs in {s:.1f} s)")
        print(f"etcd_vs_sqlite_ratio: {etcd_rate / sqlite_rate:.2f} (group commit); "
              f"{etcd_threads / (n / s):.2f} (one by one)")
        print(f"goal: etcd >= {GOAL}/s ({'met' if etcd_rate >= GOAL else 'NOT met'})")
    finally:
        import shutil

        shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
